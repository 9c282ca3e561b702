"""Distributed figures on SmolLM2-135M (issue 3), every run on the same spec and batches:

  1. int8 LoRA ZeRO-3 at N = 1, 2, 4 workers: per-rank peak memory and int8 base partition bytes;
  2. int8 LoRA ZeRO-3 against full fine-tuning ZeRO-3 (float base, every weight trains) at the
     same N: seconds per step and tokens/s, side by side in one run.

    python bench/distributed.py [--steps 4] [--workers 1 2 4] [--compare-at 2]

Each worker is pinned to one CPU thread, so N workers need N cores' worth of Ray CPUs; this
script starts Ray with as many logical CPUs as the largest N (on a 2-core machine, N=4 shares
cores: its step time is not a scaling figure, its memory figures are).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ray

from lora_dist.store import METRICS_FILE, read_manifest
from lora_dist.launch import run_job
from lora_dist.spec import load_spec

REPO = Path(__file__).resolve().parents[1]


def one(job: Path, out: Path, workers: int, steps: int, extra: list[str]) -> dict:
    spec = load_spec(job, [f"cluster.workers={workers}", f"train.max_steps={steps}", f"output.dir={out}",
                           "train.micro_batch_size=4", "data.max_length=64", "train.eval_batches=1",
                           "train.log_every=1", f"data.path={REPO / 'jobs' / 'data' / 'e2e' / 'devset.csv'}", *extra])
    artifact = run_job(spec)
    manifest = read_manifest(artifact)
    recs = [json.loads(x) for x in (artifact / METRICS_FILE).read_text().splitlines()]
    steps_recs = [r for r in recs if "loss" in r][1:]  # step 1 includes one-time warm-up
    return {
        "workers": workers, "method": manifest.method or "lora", "quantization": manifest.quantization,
        "trainable_params": manifest.trainable_params,
        "s_per_step": statistics.mean(r["step_s"] for r in steps_recs),
        "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steps_recs),
        "peak_memory_gib": [round(b / 2**30, 2) for b in steps_recs[-1]["peak_memory_bytes"]],
        "int8_partition_bytes": steps_recs[-1]["int8_partition_bytes"],
        "losses": [round(r["loss"], 4) for r in recs if "loss" in r],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--compare-at", type=int, default=2)
    ap.add_argument("--job", default=str(REPO / "jobs" / "smollm2-e2e.yaml"))
    args = ap.parse_args()
    ray.init(num_cpus=max(args.workers + [args.compare_at]), runtime_env={"env_vars": {
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.workers:
            rows.append(one(Path(args.job), Path(tmp) / f"lora{n}", n, args.steps, []))
        lora_cmp = next(r for r in rows if r["workers"] == args.compare_at)
        full = one(Path(args.job), Path(tmp) / "full", args.compare_at, args.steps,
                   ["train.method=full", "model.quantization=none", "train.lr=1e-5"])
    ray.shutdown()

    print("\nint8 LoRA, ZeRO-3, SmolLM2-135M (micro-batch 4 x <=64 tokens per worker)")
    print(f"{'N':>3} {'peak mem/rank GiB':>24} {'int8 base bytes/rank':>34} {'s/step':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['workers']:>3} {str(r['peak_memory_gib']):>24} {str(r['int8_partition_bytes']):>34} "
              f"{r['s_per_step']:>8.2f} {r['tokens_per_s']:>8.0f}")
    print(f"\nside by side at N={args.compare_at}, same batches:")
    for name, r in (("int8 LoRA ZeRO-3", lora_cmp), ("full fine-tuning ZeRO-3", full)):
        print(f"  {name:<26} trainable {r['trainable_params']:>12,}  {r['s_per_step']:6.2f} s/step  "
              f"{r['tokens_per_s']:6.0f} tok/s  peak mem/rank {max(r['peak_memory_gib']):.2f} GiB")
    print(f"  ratio LoRA/full: tokens/s x{lora_cmp['tokens_per_s'] / full['tokens_per_s']:.2f}, "
          f"peak memory x{max(lora_cmp['peak_memory_gib']) / max(full['peak_memory_gib']):.2f}")
    print(json.dumps({"lora": rows, "full": full}))


if __name__ == "__main__":
    main()
