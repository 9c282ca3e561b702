"""Loading a base model into N ZeRO-3 ranks, this tree against an earlier commit, side by side.

    python bench/load.py [--models llama-1b slice] [--world 1 2 4] [--before REV] [--first-step]
                         [--end-of-job]

For each model and N, N fresh processes (gloo, as Ray Train's CPU workers) each build the sharded
skeleton and stream the weights with this tree's code ("after") and with the code of commit REV
("before", a git worktree; default: the commit before issue 13's loader). Per rank it prints:

* ``load_s``: from the start of building the skeleton to the weights being in;
* ``to_step_s``: from process start to the end of the first training step (``--first-step``:
  LoRA init, ``deepspeed.initialize``, one micro-batch of the E2E job);
* ``peak_rss``: the rank's peak resident set up to the end of loading (ru_maxrss), and
  ``rss_before`` (after imports, before the skeleton);
* ``read``: bytes the process read from files while loading (/proc/self/io rchar: the loader,
  plus, after the change, the rank's share of the fingerprint, which the cold cache here makes
  it compute), and ``loader``: the loader's own bytes (after the change).

``--end-of-job`` runs a 1-step job through the worker code (worker.run_worker) with a cold
fingerprint cache and times the export (gathering LoRA, the fingerprint, writing the artifact):
the time between the last step and the artifact.

Models: ``llama-1b`` is bench/plan_vs_measured.py's random ~1B Llama, re-saved here as a sharded
bf16 checkpoint with an index (as 1B-scale Llamas are published); ``slice`` is
bench/gpt3_slice.py's one-block GPT-3-width slice (fp16, one file, GPT-2 Conv1D layout).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
BEFORE = "7c2f95e"  # main before issue 13: rank 0 reads every tensor and broadcasts it
SHARD_BYTES = 512 << 20


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


class Timeline:
    """Where a rank's resident memory goes during its first step: a thread samples VmRSS every
    millisecond under the label of the phase running (set by forward hooks on the embedding, each
    block, the final norm and the head, by tensor hooks on their outputs as backward reaches them,
    then "optimizer step"); each phase's row is the RSS when it began, its peak, and the bytes of
    ZeRO-3 parameters gathered (AVAILABLE, beyond their partitions) when it began."""

    def __init__(self, model) -> None:
        import threading

        self.model, self.rows, self.label = model, [], None
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.lock, self.done = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def gathered(self) -> int:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return sum(p.ds_numel * p.element_size() for p in self.model.parameters()
                   if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE
                   and p.ds_tensor is not None and p.ds_tensor.numel() < p.ds_numel)  # not at N=1: views

    def mark(self, label: str) -> None:
        rss = self._rss()
        with self.lock:
            if self.rows and self.rows[-1]["phase"] == label:
                return
            self.rows.append({"phase": label, "rss_start": rss, "rss_peak": rss, "gathered": self.gathered()})

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            rss = self._rss()
            with self.lock:
                if self.rows and rss > self.rows[-1]["rss_peak"]:
                    self.rows[-1]["rss_peak"] = rss

    def hook(self) -> None:
        named = [(n, m) for n, m in self.model.named_modules()
                 if n.endswith(("wte", "wpe", "ln_f", "lm_head")) or (n.split(".")[-2:-1] == ["h"])]
        for name, module in named:
            short = name.removeprefix("base_model.model.").removeprefix("transformer.")
            module.register_forward_pre_hook(lambda m, a, short=short: self.mark(f"forward {short}"))

            def after(m, a, out, short=short):
                t = out[0] if isinstance(out, tuple) else out
                if getattr(t, "requires_grad", False):
                    t.register_hook(lambda g: self.mark(f"backward {short}"))
            module.register_forward_hook(after)
        self.thread.start()

    def stop(self) -> list[dict]:
        self.done.set()
        self.thread.join()
        return self.rows


def rank_main(rank: int, world: int, port: int, cfg: dict) -> None:
    """One rank: build, stream (and step) with whatever lora_dist is on the path; print JSON."""
    t_start = cfg["launched"]
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import inspect

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from lora_dist import engine as eng
    from lora_dist.device import worker_placement
    from lora_dist.base import resolve_base
    from lora_dist.counting import count_model
    from lora_dist.plan import zero_settings
    from lora_dist.spec import spec_from_dict

    spec = spec_from_dict(cfg["spec"])
    if cfg.get("end_of_job"):
        return _job(rank, world, cfg)
    eng.init_distributed(False)
    torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))
    placement = worker_placement(spec)
    d = resolve_base(spec.model.base)
    zero = zero_settings(count_model(spec.model.base, spec.injected_lora, spec.model.quantization))
    ds_cfg = eng.ds_config(spec, world, placement, zero, 3)
    rss_before, read0, t0 = _rss_now(), _rchar(), time.time()
    model, injection = eng.build_sharded(AutoConfig.from_pretrained(d), spec, ds_cfg, placement)
    per_rank = "world" in inspect.signature(eng.stream_weights).parameters
    if per_rank:
        loader_read = eng.stream_weights(model, d, injection, rank, world).bytes_read
    else:
        eng.stream_weights(model, d, injection, rank)
        loader_read = None  # rank 0 read everything; rchar says so
    torch.distributed.barrier()
    out = {"rank": rank, "load_s": time.time() - t0, "rss_before": rss_before, "peak_rss": _rss_peak(),
           "read": _rchar() - read0, "loader_read": loader_read}
    print("RESULT " + json.dumps(out), flush=True)  # kept should the step run out of memory
    if cfg.get("first_step"):
        from lora_dist.train import make_schedule, prepare_data

        eng.init_lora_sharded(model, spec.train.seed, rank)
        engine = eng.initialize(model, ds_cfg, lambda opt: make_schedule(opt, spec))
        data = prepare_data(spec, AutoTokenizer.from_pretrained(d))
        from lora_dist.data import collate

        batch = collate(data.train[rank * spec.train.micro_batch_size:(rank + 1) * spec.train.micro_batch_size],
                        data.pad_id)
        timeline = Timeline(engine.module) if cfg.get("timeline") else None
        if timeline is not None:
            timeline.hook()
        if cfg.get("validate_first"):  # as a job does (its step-0 validation): ZeRO-3 traces this forward
            engine.eval()
            if timeline is not None:
                timeline.mark("validation")
            with torch.no_grad():
                engine(**batch)
            engine.train()
        if timeline is not None:
            timeline.mark("start of step")
        loss = engine(**batch).loss
        if timeline is not None:
            timeline.mark("loss")
        engine.backward(loss)
        if timeline is not None:
            timeline.mark("optimizer step")
        engine.step()
        out.update(to_step_s=time.time() - t_start, step_peak_rss=_rss_peak())
        if timeline is not None:
            timeline.mark("after the step")
            out["timeline"] = timeline.stop()
    print("RESULT " + json.dumps(out), flush=True)


def _job(rank: int, world: int, cfg: dict) -> None:
    """A 1-step job through the worker code, its export timed (the last step to the artifact)."""
    sys.path.insert(0, str(REPO / "tests"))
    import zero_run

    from lora_dist import worker

    timed: dict[str, float] = {}
    export = worker.export

    def timed_export(*args, **kwargs):
        t0 = time.time()
        try:
            return export(*args, **kwargs)
        finally:
            timed["export_s"] = time.time() - t0

    worker.export = timed_export
    job = {"spec": cfg["spec"], "job_id": "bench", "work_dir": cfg["work_dir"]}
    Path(job["work_dir"]).mkdir(parents=True, exist_ok=True)
    worker.run_worker(job, zero_run.LocalIO(Path(job["work_dir"]) / f"reports{rank}.jsonl"))
    print("RESULT " + json.dumps({"rank": rank, **timed}), flush=True)


def run(cfg: dict, world: int, pythonpath: Path, cache: Path, timeout: float = 3000) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = {**cfg, "launched": time.time()}
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "LORA_DIST_CACHE": str(cache),
           "MALLOC_MMAP_THRESHOLD_": "131072"}  # as Ray's workers run (jobs.WORKER_ENV)
    procs = [subprocess.Popen([sys.executable, __file__, "--rank-entry", json.dumps(cfg), str(r), str(world), str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=pythonpath)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0] + "\n(timed out)")
    results = []
    for p, out in zip(procs, outs):
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if not lines:
            results.append({"failed": p.returncode, "tail": out[-1500:]})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
            if p.returncode != 0:
                results[-1]["step_failed"] = p.returncode
    return results


def llama_1b_sharded() -> Path:
    """bench/plan_vs_measured.py's random 1B Llama as bf16 shards of 512 MiB with an index,
    converted one tensor at a time."""
    from plan_vs_measured import llama_1b_dir
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lora_dist.store import cache_root

    d = cache_root() / "bench" / "llama-1b-bf16-sharded"
    if (d / "model.safetensors.index.json").is_file():
        return d
    src = llama_1b_dir()
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    weight_map: dict[str, str] = {}
    shard: dict = {}

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard.clear()

    for key in keys:
        with safe_open(str(src / "model.safetensors"), "pt") as f:  # reopened: pages read are dropped
            t = f.get_tensor(key).bfloat16()
        if shard and sum(v.numel() * 2 for v in shard.values()) + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key] = t
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (tmp / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, tmp / f.name)
    os.rename(tmp, d)
    return d


def spec_for(model: str, world: int, out: Path, width: int | None = None) -> dict:
    from gpt3_slice import D, slice_spec, write_slice

    if model == "slice":
        spec = slice_spec(write_slice(1, width or D), world, 1, 64, out)
    else:
        spec = slice_spec(llama_1b_sharded(), world, 1, 64, out)
        spec["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "targets": "all-linear"}
        spec["name"] = f"llama-1b-n{world}"
    spec["cluster"]["cpus_per_worker"] = max(1, 2 // world)
    return spec


def worktree(rev: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"lora-dist-before-{rev}"
    if not (path / "lora_dist").is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), rev], check=True,
                       capture_output=True)
    return path


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-entry":
        rank_main(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-1b", "slice"], choices=["llama-1b", "slice"])
    ap.add_argument("--world", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--before", default=BEFORE, help="the commit to compare against (git rev)")
    ap.add_argument("--only", choices=["before", "after"], help="run one side only")
    ap.add_argument("--first-step", action="store_true", help="also run deepspeed.initialize and one step")
    ap.add_argument("--end-of-job", action="store_true", help="time the export of a 1-step job instead")
    ap.add_argument("--timeline", action="store_true",
                    help="with --first-step: each rank's resident memory by phase of its first step")
    ap.add_argument("--validate-first", action="store_true",
                    help="with --timeline: one no-grad forward before the step, as a job's step-0 validation")
    ap.add_argument("--width", type=int, default=None,
                    help="the slice's d_model (default GPT-3's 12288; GPT-3's vocabulary and context kept)")
    ap.add_argument("--warm", action="store_true",
                    help="start with the model's fingerprint cached (a re-run), not a cold cache")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "bench"))
    sides = {"before": worktree(args.before), "after": REPO}
    if args.only:
        sides = {args.only: sides[args.only]}
    print(f"before = {args.before} ({sides.get('before', '-')}), after = this tree; fingerprint cache "
          f"{'warm' if args.warm else 'cold'}", flush=True)
    for model in args.models:
        warm = Path(tempfile.mkdtemp(prefix="lora-dist-load-warm-")) if args.warm else None
        if warm is not None:  # one fingerprint computed here, copied into each run's cache
            from lora_dist.base import fingerprint

            os.environ["LORA_DIST_CACHE"] = str(warm)
            fingerprint(Path(spec_for(model, 1, warm)["model"]["base"]))
            os.environ.pop("LORA_DIST_CACHE")
        for world in args.world:
            for side, path in sides.items():
                with tempfile.TemporaryDirectory(prefix="lora-dist-load-") as tmp:
                    cfg = {"spec": spec_for(model, world, Path(tmp) / "runs", args.width),
                           "first_step": args.first_step or args.timeline, "timeline": args.timeline,
                           "validate_first": args.validate_first,
                           "end_of_job": args.end_of_job, "work_dir": str(Path(tmp) / "work")}
                    cache = Path(tmp) / "cache"  # cold unless --warm
                    if warm is not None:
                        shutil.copytree(warm, cache)
                    rows = run(cfg, world, path, cache)
                for r in rows:
                    if "failed" in r:
                        print(f"{model:<9} N={world} {side:<6} FAILED ({r['failed']}): {r['tail'][-600:]}", flush=True)
                    elif args.end_of_job:
                        print(f"{model:<9} N={world} {side:<6} rank {r['rank']}: last step to artifact "
                              f"{r['export_s']:.1f} s", flush=True)
                    else:
                        step = (f"  to_step_s {r['to_step_s']:.1f}  step_peak_rss {gib(r['step_peak_rss'])} GiB"
                                if "to_step_s" in r else "")
                        if "step_failed" in r:
                            step = f"  first step FAILED (exit {r['step_failed']}: killed for memory if -9)"
                        loader = f" (loader {gib(r['loader_read'])})" if r.get("loader_read") is not None else ""
                        print(f"{model:<9} N={world} {side:<6} rank {r['rank']}: load_s {r['load_s']:.1f}  "
                              f"rss_before {gib(r['rss_before'])} GiB  peak_rss {gib(r['peak_rss'])} GiB  "
                              f"read {gib(r['read'])} GiB{loader}{step}", flush=True)
                        for row in r.get("timeline", []):
                            print(f"    {row['phase']:<28} rss at start {gib(row['rss_start'])}  peak "
                                  f"{gib(row['rss_peak'])} GiB  gathered {gib(row['gathered'])} GiB", flush=True)
        if warm is not None:
            shutil.rmtree(warm, ignore_errors=True)


if __name__ == "__main__":
    main()
