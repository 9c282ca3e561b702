"""Planner against measurement (issue 12): real jobs through `lora-dist submit`, each worker's
measured peak memory against `lora-dist plan` of the same job and N.

    python bench/plan_vs_measured.py [--steps 3] [--only main llama-1b gpt3-slice] [--save runs.json]
    python bench/plan_vs_measured.py --measured runs.json      # re-plan saved measurements, no runs

Rows (target: every row within 10%):

* the main job (SmolLM2-135M, int8, LoRA r=8 on every linear, micro-batch 8 x 96) at N = 1, 2, 4;
* a Llama-shaped ~1B model with random weights (written once to safetensors), the main job's
  LoRA settings, micro-batch 2 x 96, at N = 1, 2, 4;
* the 1-block GPT-3-width slice (bench/gpt3_slice.py), LoRA r=4 on Wq, Wv, micro-batch 1 x 64,
  at N = 1, 2 (or, with --slice-runs, the rows that `bench/gpt3_slice.py --save` measured).

CPU workers, fp32 compute, peak RSS per rank. The plan's per-process overhead
(plan.OVERHEAD_BYTES["cpu"]) is measured on its own: each rank's resident memory before its model
is built, which this script prints beside it. Every rank is also planned at the largest micro-batch
it ran (metrics.jsonl's ``batch_shape``: grouped batches are padded to their longest example, so a
rank's activations are those of its own shape, not the job's largest): the target is that table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpt3_slice import DATA, REPO, cli, write_slice  # noqa: E402

from lora_dist.base import resolve_base  # noqa: E402
from lora_dist.store import cache_root  # noqa: E402

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048)
CASES = {"main": [1, 2, 4], "llama-1b": [1, 2, 4], "gpt3-slice": [1, 2]}


def llama_1b_dir() -> Path:
    """A Llama-shaped model of about 1B parameters with random weights, SmolLM2's tokenizer."""
    d = cache_root() / "bench" / "llama-1b-random"
    if (d / "config.json").is_file():
        return d
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_base("smollm2-135m")).save_pretrained(tmp)
    del model
    os.rename(tmp, d)
    return d


def overrides(case: str, workers: int, steps: int, out: Path) -> list[str]:
    common = [f"cluster.workers={workers}", f"cluster.cpus_per_worker={max(1, 2 // workers)}",
              f"train.max_steps={steps}", "train.eval_batches=1", "train.log_every=1", f"output.dir={out}",
              f"data.path={DATA}"]
    if case == "main":
        return common
    if case == "llama-1b":
        return common + [f"model.base={llama_1b_dir()}", "train.micro_batch_size=2"]
    base = write_slice(1)
    return common + [f"model.base={base}", "lora.r=4", "lora.alpha=4", "lora.dropout=0.0", "lora.targets=[c_attn]",
                     "data.max_length=64", "train.micro_batch_size=1", "train.lr=1e-4", "train.warmup_steps=0",
                     "output.adapter_dtype=float16"]


def measure(case: str, workers: int, steps: int, work: Path) -> dict:
    out = work / f"{case}-{workers}"
    out.mkdir(parents=True)
    sets = [a for o in overrides(case, workers, steps, out) for a in ("--set", o)]
    env = {**os.environ, "LORA_DIST_OUTPUT_ROOT": str(work), "TOKENIZERS_PARALLELISM": "false"}
    job = str(REPO / "jobs" / "smollm2-e2e.yaml")
    artifact = Path(cli("submit", job, *sets, env=env).strip().splitlines()[-1])
    recs = [json.loads(x) for x in (artifact / "metrics.jsonl").read_text().splitlines() if '"peak_memory_bytes"' in x]
    manifest = json.loads((artifact / "manifest.json").read_text())
    shutil.rmtree(artifact, ignore_errors=True)
    # each rank's largest micro-batch over the steps its peak covers: the plan is also made at it
    shapes = [max((r["batch_shape"][k] for r in recs), key=lambda rs: rs[0] * rs[1]) for k in range(workers)]
    return {"case": case, "workers": workers, "measured": recs[-1]["peak_memory_bytes"], "sets": sets,
            "shapes": shapes, "process": manifest.get("process_bytes_before_model")}


def planned(run: dict, work: Path, shape: list[int] | None = None) -> dict:
    """`lora-dist plan` of the run's job: the main job's file with the run's --set overrides, or
    the spec a gpt3_slice.py run trained; with ``shape`` ([rows, positions]), planned at that
    micro-batch instead of the job's largest (train.micro_batch_size x data.max_length)."""
    import yaml

    env = {**os.environ, "LORA_DIST_OUTPUT_ROOT": str(work)}
    if "spec" in run:
        job, sets = work / f"planned-{run['case']}-{run['workers']}.yaml", []
        job.write_text(yaml.safe_dump(run["spec"]))
    else:
        job, sets = REPO / "jobs" / "smollm2-e2e.yaml", run["sets"]
    if shape is not None:
        sets = [*sets, "--set", f"train.micro_batch_size={shape[0]}", "--set", f"data.max_length={shape[1]}"]
    plan = json.loads(cli("plan", str(job), *sets, "--gpus", str(run["workers"]), "--device", "cpu", "--json",
                          env=env))
    return {"bytes": plan["per_worker_bytes"], "terms": plan["methods"]["lora_int8_zero3"]["terms"]}


def planned_per_rank(run: dict, work: Path) -> list[dict]:
    """Each rank's plan at the micro-batch it ran (runs saved before batch_shape was recorded:
    the job's largest, for every rank)."""
    shapes = run.get("shapes") or [None] * len(run["measured"])
    by_shape = {tuple(s): planned(run, work, s) for s in shapes if s is not None}
    return [by_shape[tuple(s)] if s is not None else run["plan"] for s in shapes]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=sorted(CASES), default=list(CASES))
    ap.add_argument("--save", default=None, help="write the measurements to this JSON file")
    ap.add_argument("--measured", default=None, help="re-plan measurements saved by --save (no runs)")
    ap.add_argument("--resume", default=None, help="keep the runs saved in this file and measure the rest")
    ap.add_argument("--slice-runs", default=None,
                    help="take the gpt3-slice rows from `bench/gpt3_slice.py --save FILE` instead of running them")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-vs-measured-") as tmp:
        work = Path(tmp)
        if args.measured:
            runs = json.loads(Path(args.measured).read_text())
        else:
            runs = json.loads(Path(args.resume).read_text()) if args.resume else []
            if args.slice_runs:  # the same jobs and the same `lora-dist plan`, run by gpt3_slice.py
                runs += [{"case": "gpt3-slice", "workers": r["workers"], "measured": r["measured_peak"],
                          "spec": r["spec"]} for r in json.loads(Path(args.slice_runs).read_text())]
            done = {(r["case"], r["workers"]) for r in runs}
            for case in args.only:
                for n in CASES[case]:
                    if (case, n) in done:
                        continue
                    print(f"measuring {case} at N={n} ...", flush=True)
                    runs.append(measure(case, n, args.steps, work))
                    if args.save:
                        Path(args.save).write_text(json.dumps(runs, indent=1))
        for r in runs:
            r["plan"] = planned(r, work)
            r["rank_plans"] = planned_per_rank(r, work)

    GiB = 1 << 30
    first = runs[0]
    print("\nplanned at the job's largest micro-batch (train.micro_batch_size x data.max_length):")
    print(f"\n{'job':<12} {'N':>2} {'predicted GiB':>14} {'measured GiB per rank':>30} {'worst error':>12}")
    worst_all = 0.0
    for r in runs:
        predicted = r["plan"]["bytes"]
        worst = max(abs(predicted - m) / m for m in r["measured"])
        worst_all = max(worst_all, worst)
        print(f"{r['case']:<12} {r['workers']:>2} {predicted / GiB:>14.3f} "
              f"{str([round(m / GiB, 3) for m in r['measured']]):>30} {100 * worst:>11.1f}%")
    print(f"\nlargest error: {100 * worst_all:.1f}% (an upper bound where the batches ran shorter)")
    print("\neach rank planned at the largest micro-batch it ran ([rows, positions]; the job's is its "
          "train.micro_batch_size x data.max_length):")
    print(f"{'job':<12} {'N':>2} {'shape per rank':>34} {'planned GiB per rank':>28} {'measured':>28} {'worst':>7}")
    worst_all = 0.0
    for r in runs:
        plans = [p["bytes"] for p in r["rank_plans"]]
        worst = max(abs(p - m) / m for p, m in zip(plans, r["measured"]))
        worst_all = max(worst_all, worst)
        print(f"{r['case']:<12} {r['workers']:>2} {str(r.get('shapes')):>34} "
              f"{str([round(p / GiB, 3) for p in plans]):>28} {str([round(m / GiB, 3) for m in r['measured']]):>28} "
              f"{100 * worst:>6.1f}%")
    print(f"\nlargest error at the shapes run: {100 * worst_all:.1f}% (target: every row within 10%)")
    print("\neach rank's resident memory before its model was built (the manifest's process_bytes_before_model), "
          f"against the plan's overhead term, {first['plan']['terms']['overhead'] / GiB:.3f} GiB:")
    for r in runs:
        if r.get("process"):
            print(f"{r['case']:<12} {r['workers']:>2} {str([round(b / GiB, 3) for b in r['process']]):>34}")
    for r in runs:
        print(f"terms {r['case']} N={r['workers']} (MiB):",
              json.dumps({k: round(v / 2**20, 1) for k, v in r["plan"]["terms"].items()}))


if __name__ == "__main__":
    main()
