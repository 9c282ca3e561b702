"""The main job's throughput on two commits, alternated in one session (this machine drifts by
10-20% between runs, so a before/after pair of whole `bench/throughput.py` runs can mislead):

    python bench/throughput_ab.py --before e2d1fff [--after HEAD] [--rounds 2] [--steps 10]

Each commit is checked out into a temporary git worktree; each round runs the main job's row of
`bench/throughput.py` (ours N=1, ZeRO-3, micro-batch 8 x <=96 tokens, step 1 left out) once per
commit, in a fresh process that imports that commit's code. Prints real tokens/s and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROW = """
import json, sys, tempfile
from pathlib import Path
sys.path.insert(0, 'bench')
import ray
import throughput as t
t.COMMON.extend(['train.micro_batch_size=8', 'data.max_length=96'])
ray.init(num_cpus=2, runtime_env={'env_vars': {'RAY_TRAIN_ENABLE_PRINT_PATCH': '0', 'TOKENIZERS_PARALLELISM': 'false'}})
with tempfile.TemporaryDirectory() as d:
    print('RESULT ' + json.dumps(t.ours(int(sys.argv[1]), 1, Path(d) / 'o')))
"""


def row(checkout: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", ROW, str(steps)], cwd=checkout, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))[7:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a commit (the baseline)")
    ap.add_argument("--after", default="HEAD", help="a commit (default HEAD)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name in ("before", "after"):
            rev = getattr(args, name)
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(trees[name]), rev],
                           check=True)
        try:
            for r in range(1, args.rounds + 1):
                for name, tree in trees.items():
                    res = row(tree, args.steps)
                    print(f"round {r}  {name:<6} {getattr(args, name):<10} real tokens/s {res['tokens_per_s']:7.1f}  "
                          f"peak {res['peak_gib']:.2f} GiB", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)


if __name__ == "__main__":
    main()
