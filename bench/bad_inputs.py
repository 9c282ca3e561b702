"""The bad-input table: each case through `lora-dist submit --address <unreachable>`, which must
refuse it with exit code 2 and one message naming the field, before contacting any cluster.

    python bench/bad_inputs.py            # print the table
    python bench/bad_inputs.py --check    # exit 1 unless every case gets its expected message
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

from lora_dist.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
GOOD = f"name: ok\ndata: {{path: {DATA}}}\n"

# (case, YAML, --set overrides, expected text in the message)
CASES = [
    ("unknown key", GOOD + "trian: {max_steps: 5}\n", [], "trian: unknown key"),
    ("unknown nested key", GOOD + "lora: {rank: 8}\n", [], "lora.rank: unknown key"),
    ("negative lr", GOOD + "train: {lr: -0.001}\n", [], "train.lr: must be in (0, 1]"),
    ("r = 0", GOOD + "lora: {r: 0}\n", [], "lora.r: must be from 1 to 4096"),
    ("r above the layer's dimensions", GOOD + "lora: {r: 1000}\n", [], "lora.r: 1000 exceeds the dimensions"),
    ("target matching no module", GOOD + "lora: {targets: [qkv_proj]}\n", [], "lora.targets: ['qkv_proj'] match no"),
    ("path traversal in name", GOOD.replace("name: ok", "name: ../../etc"), [], "name: must be"),
    ("'..' in output.dir", GOOD + "output: {dir: runs/../../x}\n", [], "output.dir: must not contain '..'"),
    ("non-finite LoRA alpha", GOOD + "lora: {alpha: .inf}\n", [], "lora.alpha: must be a finite number"),
    ("missing data file", "name: ok\ndata: {path: /nonexistent/e2e.csv}\n", [], "data.path: file not found"),
    ("YAML with a Python tag", "name: !!python/object/apply:os.system ['id']\n", [], "YAML tags are not allowed"),
    ("absurd micro-batch", GOOD + "train: {micro_batch_size: 100000000}\n", [],
     "train.micro_batch_size: must be from 1 to 65536"),
    ("absurd sequence length", GOOD + "data: {max_length: 10000000, path: %s}\n" % DATA, [],
     "data.max_length: must be from 8 to 131072"),
    ("override with a wrong type", GOOD, ["train.max_steps=ten"], "train.max_steps: expected an integer"),
    ("runtime_env key off the allow-list", GOOD + "cluster: {runtime_env: {working_dir: /}}\n", [],
     "cluster.runtime_env: keys ['working_dir'] are not allowed"),
    ("full fine-tuning on an int8 base", GOOD + "train: {method: full}\n", [], "train.method: 'full' trains every"),
]


def run_case(yaml_text: str, overrides: list[str], workdir: Path) -> tuple[int, str]:
    job = workdir / "job.yaml"
    job.write_text(yaml_text)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["submit", str(job), "--address", "http://127.0.0.1:9",
                         *[f"--set={o}" for o in overrides]])
    return code, err.getvalue().strip()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for name, text, overrides, expected in CASES:
            code, message = run_case(text, overrides, Path(tmp))
            ok = code == 2 and expected in message
            failures += not ok
            lines = [ln.strip(" -") for ln in message.splitlines() if ln.strip() and not ln.startswith("error: invalid")]
            shown = (lines[-1] if lines else message).removeprefix("error: ")
            print(f"{'ok ' if ok else 'BAD'} | {name:<45} | exit {code} | {shown}")
    print(f"{len(CASES) - failures} passed, {failures} failed")
    return 1 if (args.check and failures) else 0


if __name__ == "__main__":
    sys.exit(main())
