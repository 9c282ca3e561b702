"""Choose the quality job's learning rate and schedule by validation (issue 16, item 3).

Each candidate (lr, schedule) trains the job's LoRA on a float base in one process with gradient
accumulation 2 (the same examples in the same order as the job's 2 workers: the `float` row of
bench/e2e_quality.py), for the job's steps, and is scored by its validation loss on the job's
held-out side (``data.split: name``: restaurants it never saw). The product's own path (int8,
ZeRO-3 x 2, Ray) takes about 55 minutes a run here; the float row matched its validation loss
(1.2538 against 1.2540 at lr 2e-3, seed 42), so it stands in for it when ranking candidates.

    python bench/lr_sweep.py [--job jobs/smollm2-e2e-quality.yaml] [--lr 1e-3,2e-3,4e-3]
                             [--schedule cosine,linear] [--set KEY=VALUE ...]

Prints each candidate's validation losses as they come and a table at the end, best first.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from e2e_quality import DATA, REPO, float_row  # the stand-in is exactly the quality benchmark's float row

JOB = REPO / "jobs" / "smollm2-e2e-quality.yaml"
VAL_LINE = re.compile(r"step (\d+)\s+val_loss ([0-9.]+|nan)")


class Tee(io.TextIOBase):
    """The training's progress lines, shown and kept (the validation losses are read back)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.lines.append(text)
        return len(text)

    def val_losses(self) -> dict[int, float]:
        return {int(m[1]): float(m[2]) for m in VAL_LINE.finditer("".join(self.lines))}


def floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,2e-3; got {text!r}")
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"learning rates must be in (0, 1]; got {text!r}")
    return values


def schedules(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in ("linear", "cosine")]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of linear,cosine; got {text!r}")
    return values


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", type=Path, default=JOB)
    ap.add_argument("--lr", type=floats, default=[1e-3, 2e-3, 4e-3], help="comma-separated learning rates")
    ap.add_argument("--schedule", type=schedules, default=["cosine"], help="comma-separated: linear,cosine")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the job's settings for every candidate (as lora-dist --set)")
    args = ap.parse_args()

    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    job = args.job.resolve()
    base = load_spec(job, [f"data.path={DATA}", *args.set])
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORA_DIST_OUTPUT_ROOT"] = tmp
        for schedule in args.schedule:
            for lr in args.lr:
                name = f"lr {lr:g} {schedule}"
                print(f"\n=== {name}", flush=True)
                spec = load_spec(job, [f"data.path={DATA}", *float_row(base), f"train.lr={lr}",
                                       f"train.schedule={schedule}",
                                       f"output.dir={Path(tmp) / name.replace(' ', '_')}", *args.set])
                tee = Tee()
                t0 = time.time()
                artifact = train_local(spec, stream=tee)
                manifest = json.loads((Path(artifact) / "manifest.json").read_text())
                results.append({"lr": lr, "schedule": schedule, "val_loss": tee.val_losses(),
                                "best_step": manifest.get("best_step"),
                                "best_val_loss": manifest.get("val_loss_after"),
                                "stopped_at": manifest.get("stopped_at"), "seconds": round(time.time() - t0)})
    print(f"\n{job.name}: float base, 1 process, {' '.join(float_row(base))}, {base.train.max_steps} steps, "
          f"seed {base.train.seed}, warmup {base.train.warmup_steps}; validation loss on data.split "
          f"{base.data.split} (best first)")
    steps = sorted({s for r in results for s in r["val_loss"]})
    print(f"  {'lr':>8} {'schedule':>8} " + " ".join(f"{'@' + str(s):>7}" for s in steps)
          + f" {'best':>7} {'step':>5} {'s':>6}")
    for r in sorted(results, key=lambda r: r["best_val_loss"]):
        cells = " ".join(f"{r['val_loss'][s]:>7.4f}" if s in r["val_loss"] else f"{'-':>7}" for s in steps)
        print(f"  {r['lr']:>8g} {r['schedule']:>8} {cells} {r['best_val_loss']:>7.4f} {r['best_step']!s:>5} "
              f"{r['seconds']:>6}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
