"""Throughput and memory on the same model and batches, side by side in one run (issue 6):

  * this project: int8 LoRA at N = 1 and 2 workers (Ray Train + DeepSpeed) with the defaults
    (data.batching grouped, cluster.zero_stage auto) and with the main job's ZeRO-3; at N = 1
    also padded and packed batches under ZeRO-3 (issue 15);
  * PEFT LoRA over a bitsandbytes 8-bit base (load_in_8bit) in one process, the usual path, with
    the Hugging Face Trainer's default batching (shuffled examples, each batch padded to its
    longest);
  * our model (int8 base, LoRA) in PEFT's single-process loop, without ZeRO-3 or Ray;
  * full fine-tuning with ZeRO-3 (float base, every weight trains) at N = 1.

Then a profile of one int8 LoRA ZeRO-3 step (world size 1) by operator: where the time goes.

    python bench/throughput.py [--steps 10]
    python bench/throughput.py --before 4eee545 [--after HEAD] [--steps 10]
    python bench/throughput.py --allocator --threads 2 --steps 5 [--rounds 2] \
        --set train.micro_batch_size=8 --set data.max_length=96

With ``--before``: the main job in one process, through ``submit`` on the embedded default and at
N=2, on both commits alternated, with real tokens/s, MFU and peak memory per row, against PEFT +
bitsandbytes 8-bit at this machine's cores (bench/throughput_ab.py); nothing else runs.

With ``--allocator``: a worker's step (ZeRO-3, world size 1) in fp32 and bf16 under each glibc
mmap threshold (``MALLOC_MMAP_THRESHOLD_``: glibc's dynamic default, the fixed 128 KiB every Ray
process of a job gets from ``jobs.WORKER_ENV``, 1 MiB, 8 MiB): real tokens/s and peak RSS.

Tokens/s counts real (non-padding) tokens of all workers; padding is the share of computed
positions that hold padding; step 1 (warm-up) is left out. Peak memory is
each worker's peak RSS (CPU). Every configuration runs in its own processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
COMMON = ["train.micro_batch_size=4", "data.max_length=64", "train.eval_batches=1", "train.log_every=1",
          f"data.path={DATA}", "lora.dropout=0.0"]


def spec_for(steps: int, out: Path, *extra: str):
    from lora_dist.spec import load_spec

    return load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [f"train.max_steps={steps}", f"output.dir={out}",
                                                          *COMMON, *extra])


def ours(steps: int, workers: int, out: Path, *extra: str) -> dict:
    from lora_dist.launch import run_job
    from lora_dist.store import MANIFEST_FILE, METRICS_FILE

    artifact = run_job(spec_for(steps, out, f"cluster.workers={workers}", *extra))
    recs = [json.loads(x) for x in (artifact / METRICS_FILE).read_text().splitlines() if '"loss"' in x][1:]
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in recs),
            "s_per_step": statistics.mean(r["step_s"] for r in recs),
            "peak_gib": max(recs[-1]["peak_memory_bytes"]) / 2**30,
            "pad_fraction": sum(r["pad_tokens"] for r in recs) / sum(r["pad_tokens"] + r["tokens"] for r in recs),
            "zero_stage": json.loads((artifact / MANIFEST_FILE).read_text())["zero_stage"]}


def single_process_worker(steps: int, kind: str, threads: int = 1) -> None:
    """One process, no Ray, no DeepSpeed, the same batches as one of our workers at N=1:

    * ``peft``: PEFT + bitsandbytes 8-bit base (what most users run today);
    * ``ours``: this project's model (int8 base, LoRA modules) in the same loop, which separates
      the model's own cost from what ZeRO-3 and the Ray worker add per step.
    """
    import logging

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from lora_dist.data import BatchPlan
    from lora_dist.base import resolve_base
    from lora_dist.lora import trainable_parameters
    from lora_dist.model import load_model
    from lora_dist.spec import LINEAR_TARGET_ALL
    from lora_dist.train import make_schedule, micro_batch, prepare_data

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    torch.set_num_threads(threads)  # as one of our workers (1: cpus_per_worker 1)
    spec = spec_for(steps, Path(tempfile.gettempdir()))
    d = resolve_base("smollm2-135m")
    lo = spec.lora  # the main job's LoRA settings, as ours uses them
    if kind == "ours":
        model = load_model(spec.model.base, lo, spec.model.quantization, seed=spec.train.seed).model
    else:
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                     dtype=torch.float32, device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        targets = "all-linear" if lo.targets == (LINEAR_TARGET_ALL,) else list(lo.targets)
        model = get_peft_model(model, LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    data = prepare_data(spec, AutoTokenizer.from_pretrained(d))
    # padded batches of shuffled examples: what the Hugging Face Trainer does by default
    # (group_by_length off, the collator padding each batch to its longest)
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed)
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    sched = make_schedule(opt, spec)
    model.train()
    rates, losses, real, positions = [], [], 0, 0
    for step in range(1, steps + 1):
        t0 = time.time()  # from collating the batch, as our workers' step time counts
        batch = micro_batch(data, plan, step - 1)
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
        if step > 1:
            rates.append(int(batch["attention_mask"].sum()) / (time.time() - t0))
            real += int(batch["attention_mask"].sum())
            positions += batch["attention_mask"].numel()
    print(json.dumps({"tokens_per_s": statistics.mean(rates), "s_per_step": None, "threads": threads,
                      "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "losses": losses,
                      "pad_fraction": 1 - real / positions}))


def worker_step(threads: int = 1, dtype: str = "fp32"):
    """A worker's int8 LoRA ZeRO-3 training step at world size 1, built as the worker builds it,
    with ``threads`` torch threads and compute dtype ``dtype``: step(i) trains batch i and returns
    its real tokens."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from lora_dist import engine as eng
    from lora_dist.data import BatchPlan
    from lora_dist.device import worker_placement
    from lora_dist.base import resolve_base
    from lora_dist.counting import count_model
    from lora_dist.plan import zero_settings
    from lora_dist.train import make_schedule, micro_batch, prepare_data

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"})
    torch.set_num_threads(threads)
    spec = spec_for(4, Path(tempfile.gettempdir()), f"train.dtype={dtype}")
    eng.init_distributed(cuda=False)
    d = resolve_base(spec.model.base)
    placement = worker_placement(spec)
    zero = zero_settings(count_model(spec.model.base, spec.injected_lora, spec.model.quantization))
    cfg = eng.ds_config(spec, 1, placement, zero, 3)
    model, injection = eng.build_sharded(AutoConfig.from_pretrained(d), spec, cfg, placement)
    eng.stream_weights(model, d, injection, 0, 1)
    eng.init_lora_sharded(model, 0, 0)
    engine = eng.initialize(model, cfg, lambda opt: make_schedule(opt, spec))
    data = prepare_data(spec, AutoTokenizer.from_pretrained(d))
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, 0)

    def step(i: int) -> int:
        batch = micro_batch(data, plan, i)
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        return int(batch["attention_mask"].sum())

    return step


def profile_step(threads: int = 1, dtype: str = "fp32") -> list[tuple[str, float]]:
    """One int8 LoRA ZeRO-3 step at world size 1 (:func:`worker_step`), by operator (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    step = worker_step(threads, dtype)
    step(0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(1, 3):
            step(i)
    rows = [(e.key, e.self_cpu_time_total / 1e6 / 2) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[1])


def time_worker(threads: int, dtype: str, steps: int) -> dict[str, float]:
    """:func:`worker_step`'s real tokens/s over ``steps`` steps after one to warm up, and this
    process's peak RSS (the figure a worker's metrics record)."""
    step = worker_step(threads, dtype)
    step(0)
    t0, tokens = time.time(), 0
    for i in range(1, steps + 1):
        tokens += step(i)
    return {"tok_s": tokens / (time.time() - t0),
            "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


ALLOCATOR = {"dynamic (glibc default)": None, "fixed 128 KiB (jobs.WORKER_ENV)": "131072",
             "fixed 1 MiB": "1048576", "fixed 8 MiB": "8388608"}


def allocator_table(args: argparse.Namespace) -> None:
    """The worker's step under each glibc mmap threshold and both compute dtypes, each in a
    process of its own (the threshold is read at start), the rounds interleaved."""
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for dtype in ("fp32", "bf16"):
            for name, value in ALLOCATOR.items():
                env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
                if value:
                    env["MALLOC_MMAP_THRESHOLD_"] = value
                out = subprocess.run([sys.executable, __file__, "--time-worker", "--threads", str(args.threads),
                                      "--dtype", dtype, "--steps", str(args.steps),
                                      *[f"--set={o}" for o in args.set]], env=env, capture_output=True, text=True,
                                     check=True)
                results.setdefault((dtype, name), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nA worker's ZeRO-3 step (world size 1), {args.threads} threads, {args.steps} steps, "
          f"best of {args.rounds} round(s)")
    print(f"  {'dtype':<6} {'mmap threshold':<32} {'real tokens/s':>14} {'peak RSS GiB':>13}")
    for (dtype, name), runs in results.items():
        best = max(runs, key=lambda r: r["tok_s"])
        print(f"  {dtype:<6} {name:<32} {best['tok_s']:>14.1f} {best['peak_gib']:>13.2f}")


def before_after(args: argparse.Namespace) -> None:
    """The main job's rows on two commits side by side, and PEFT at this machine's cores."""
    sys.path.insert(0, str(Path(__file__).parent))
    from throughput_ab import SHAPE, compare

    from lora_dist.launch import usable_cores

    out = subprocess.run([sys.executable, __file__, "--single-process-worker", "peft", "--steps", str(args.steps),
                          "--threads", str(usable_cores()), *[f"--set={o}" for o in [*SHAPE, *args.set]]],
                         capture_output=True, text=True, check=True)
    peft = json.loads(out.stdout.strip().splitlines()[-1])
    compare(args.before, args.after, args.rounds, args.steps, args.set, peft=peft)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the bench's job settings for every row (e.g. train.micro_batch_size=8 "
                         "data.max_length=96: the main job's batch shape)")
    ap.add_argument("--single-process-worker", choices=["peft", "ours"])
    ap.add_argument("--profile-worker", action="store_true")
    ap.add_argument("--time-worker", action="store_true", help="a worker's step: real tokens/s and peak RSS")
    ap.add_argument("--allocator", action="store_true",
                    help="--time-worker under each glibc mmap threshold (ALLOCATOR) and dtype, side by side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of --single-process-worker and "
                    "--profile-worker")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of --profile-worker")
    ap.add_argument("--before", help="a commit: compare the main job's rows on it and on --after (throughput_ab)")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    if args.before:
        return before_after(args)
    if args.allocator:
        return allocator_table(args)
    COMMON.extend(args.set)  # every row, and the processes started below, run with them
    if args.time_worker:
        print(json.dumps(time_worker(args.threads, args.dtype, args.steps)))
        return
    if args.single_process_worker:
        return single_process_worker(args.steps, args.single_process_worker, args.threads)
    if args.profile_worker:
        rows = profile_step(args.threads, args.dtype)
        print(json.dumps(rows[:40]))
        return

    import ray

    ray.init(num_cpus=2, runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                   "TOKENIZERS_PARALLELISM": "false"}})
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        # the defaults: data.batching grouped, cluster.zero_stage auto (the main job says 3)
        res["ours N=1, auto"] = ours(args.steps, 1, Path(tmp) / "a1", "cluster.zero_stage=auto")
        res["ours N=1"] = ours(args.steps, 1, Path(tmp) / "o1")  # ZeRO-3, as the main job
        res["ours N=1, padded"] = ours(args.steps, 1, Path(tmp) / "o1p", "data.batching=padded")
        res["ours N=1, packed"] = ours(args.steps, 1, Path(tmp) / "o1k", "data.batching=packed")
        res["ours N=2, auto"] = ours(args.steps, 2, Path(tmp) / "a2", "cluster.zero_stage=auto")
        res["ours N=2"] = ours(args.steps, 2, Path(tmp) / "o2")
        res["full FT ZeRO-3 N=1"] = ours(args.steps, 1, Path(tmp) / "f1", "train.method=full",
                                         "model.quantization=none", "train.lr=1e-5")
    ray.shutdown()

    def sub(*flags: str):
        out = subprocess.run([sys.executable, __file__, *flags, "--steps", str(args.steps),
                              *[f"--set={o}" for o in args.set]], capture_output=True,
                             text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    res["PEFT + bnb 8-bit, 1 process"] = sub("--single-process-worker", "peft")
    res["ours, model only, 1 process"] = sub("--single-process-worker", "ours")
    prof = sub("--profile-worker")

    shape = spec_for(args.steps, Path(tempfile.gettempdir()))
    print(f"\nSmolLM2-135M, micro-batch {shape.train.micro_batch_size} x <={shape.data.max_length} tokens per worker, "
          f"1 CPU thread per worker, E2E batches")
    print(f"  {'configuration':<30} {'real tokens/s':>14} {'padding':>8} {'peak mem/worker':>16}")
    for k, v in res.items():
        pad = "-" if v.get("pad_fraction") is None else f"{100 * v['pad_fraction']:.1f}%"
        print(f"  {k:<30} {v['tokens_per_s']:>14.0f} {pad:>8} {v['peak_gib']:>13.2f} GiB")
    o1, peft, full = res["ours N=1"], res["PEFT + bnb 8-bit, 1 process"], res["full FT ZeRO-3 N=1"]
    auto = res["ours N=1, auto"]
    print(f"\n  ours N=1, defaults (grouped, zero_stage auto: ZeRO-{auto['zero_stage']}) / PEFT 8-bit (Trainer "
          f"defaults: padded) real tokens/s: x{auto['tokens_per_s'] / peft['tokens_per_s']:.2f} (target >= 1.3)")
    print(f"  ours N=1, ZeRO-3 (grouped) / PEFT 8-bit real tokens/s: x{o1['tokens_per_s'] / peft['tokens_per_s']:.2f}")
    for mode in ("padded", "packed"):
        print(f"  ours N=1, ZeRO-3, {mode} / PEFT 8-bit real tokens/s: "
              f"x{res[f'ours N=1, {mode}']['tokens_per_s'] / peft['tokens_per_s']:.2f}")
    a2 = res["ours N=2, auto"]
    print(f"  ours N=2, auto (ZeRO-{a2['zero_stage']}) / ours N=2, ZeRO-3 real tokens/s: "
          f"x{a2['tokens_per_s'] / res['ours N=2']['tokens_per_s']:.2f}")
    print(f"  ours N=1 / full FT tokens/s:    x{o1['tokens_per_s'] / full['tokens_per_s']:.2f} (target >= 1.5)")
    print(f"  ours N=1 / full FT memory:      x{o1['peak_gib'] / full['peak_gib']:.2f} (target <= 0.5)")
    bare = res["ours, model only, 1 process"]
    print(f"  ours model only / PEFT tokens/s: x{bare['tokens_per_s'] / peft['tokens_per_s']:.2f} (same loop: the model "
          f"itself; ours N=1 / model only x{o1['tokens_per_s'] / bare['tokens_per_s']:.2f}: what ZeRO-3 and Ray add)")
    total = sum(t for _, t in prof)
    print(f"\nwhere one int8 LoRA ZeRO-3 step's CPU time goes ({total:.2f} s of operator self time):")
    for name, t in prof[:15]:
        print(f"  {name:<48} {t:7.3f} s  {100 * t / total:5.1f}%")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
