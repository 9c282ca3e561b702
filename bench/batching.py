"""Padding per batching mode and the tokenization cache, on the main job's data and tokenizer
(SmolLM2-135M, E2E devset, data.max_length and micro-batch size from jobs/smollm2-e2e.yaml):

    python bench/batching.py [--batches 200]

For each data.batching mode: the share of computed positions that are padding, and real tokens
per micro-batch, over the run's first micro-batches. Then the time to the tokenized splits with
an empty cache (tokenize and write) and with a warm one (memory-map), in one run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=200)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from lora_dist.data import BatchPlan, tokenized
    from lora_dist.model import resolve_base
    from lora_dist.spec import load_spec

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


if __name__ == "__main__":
    main()
