"""Padding per batching mode and the tokenization cache, on the main job's data and tokenizer
(SmolLM2-135M, E2E devset, data.max_length and micro-batch size from jobs/smollm2-e2e.yaml):

    python bench/batching.py [--batches 200] [--first-step]

For each data.batching mode: the share of computed positions that are padding, and real tokens
per micro-batch, over the run's first micro-batches. Then the time to the tokenized splits with
an empty cache (tokenize and write) and with a warm one (memory-map), in one run.

--first-step: also the time from `lora-dist submit` of the main job (embedded default, one
step) to its first step's progress line, with an empty tokenization cache and then a warm one
(a private LORA_DIST_CACHE; the converted base model is linked in, so only the data differs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--first-step", action="store_true", help="also time submit to the first step, cold and warm")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from lora_dist.data import BatchPlan, tokenized
    from lora_dist.base import resolve_base
    from lora_dist.spec import load_spec
    from lora_dist.store import cache_root

    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [f"data.path={REPO / 'jobs/data/e2e/devset.csv'}"])
    tok = AutoTokenizer.from_pretrained(resolve_base(spec.model.base))
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.time()
        cold = tokenized(spec.data, tok, Path(cache))
        t1 = time.time()
        warm = tokenized(spec.data, tok, Path(cache))
        t2 = time.time()
        assert (cold.cache, warm.cache) == ("miss", "hit")
        lengths = warm.train.lengths()
        size, n = spec.train.micro_batch_size, args.batches
        print(f"{spec.name}: {len(lengths)} training examples, data.max_length {spec.data.max_length}, "
              f"micro-batches of {size}, the first {n}")
        print(f"  {'data.batching':<14} {'padding':>8} {'real tokens/micro-batch':>24}")
        for mode in ("padded", "grouped", "packed"):
            plan = BatchPlan(len(lengths), size, spec.train.seed, lengths=lengths, mode=mode,
                             capacity=spec.data.max_length)
            real = positions = 0
            for b in range(n):
                rows = plan.rows(b)
                real += sum(lengths[j] for row in rows for j in row)
                positions += len(rows) * max(sum(lengths[j] for j in row) for row in rows)
            print(f"  {mode:<14} {100 * (1 - real / positions):>7.1f}% {real / n:>24.0f}")
    print(f"tokenized splits ready: empty cache {t1 - t0:.2f} s (tokenize + write), warm cache {t2 - t1:.3f} s "
          f"(memory-map)")
    if args.first_step:
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            (cache / "models").mkdir(parents=True)
            (cache / "models" / "smollm2-135m").symlink_to(resolve_base("smollm2-135m"))
            known = cache_root() / "fingerprints.json"  # the base's fingerprint too: only the data differs
            if known.is_file():
                shutil.copy(known, cache / "fingerprints.json")
            for state in ("empty", "warm"):
                seconds, line = first_step(cache, Path(tmp) / f"runs-{state}")
                print(f"submit to first step, {state} tokenization cache: {seconds:.1f} s ({line})")


def first_step(cache: Path, out: Path) -> tuple[float, str]:
    """Seconds from starting `lora-dist submit` (the main job, one step) to its step-1 line."""
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "LORA_DIST_CACHE": str(cache)}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "submit", str(REPO / "jobs" / "smollm2-e2e.yaml"),
                             f"--set=output.dir={out}", "--set=train.max_steps=1", "--set=train.eval_batches=1",
                             f"--set=data.path={REPO / 'jobs/data/e2e/devset.csv'}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds, data_line = None, ""
    for line in proc.stdout:
        if "tokenization cache" in line:
            data_line = line.split("data: ", 1)[-1].strip()
        if "step 1/1" in line and seconds is None:
            seconds = time.time() - t0
    if proc.wait() != 0 or seconds is None:
        raise SystemExit(f"the job failed (exit {proc.returncode})")
    return seconds, data_line


if __name__ == "__main__":
    main()
