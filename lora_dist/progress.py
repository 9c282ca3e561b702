"""A run's history on its main process: ``metrics.jsonl`` (one JSON record per line), the
progress lines, and each record handed to experiment tracking (lora_dist.tracking). No torch."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from lora_dist.tracking import Tracker


class Metrics:
    """``metrics.jsonl`` and the progress lines, on the main process (elsewhere it writes nothing).

    ``total`` is the run's last step (train.max_steps, or the steps of train.epochs: the loop sets
    it); ``tracker`` gets every record written (a silent one by default)."""

    def __init__(self, path: Path, spec, main: bool, stream=sys.stdout, tracker: Tracker | None = None) -> None:
        self.path, self.spec, self.main, self.stream = path, spec, main, stream
        self.tracker = tracker
        self.total = spec.train.max_steps or 0
        self.t0, self.first_step = time.time(), 1

    def record(self, rec: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.tracker is not None:
                self.tracker.log(rec)

    def say(self, text: str) -> None:
        if self.main:
            print(text, file=self.stream, flush=True)

    def step(self, rec: dict[str, Any]) -> None:
        self.record(rec)
        total, step = self.total, rec["step"]
        if step % self.spec.train.log_every == 0 or step == total:
            eta = (time.time() - self.t0) / (step - self.first_step + 1) * (total - step)
            pad = rec.get("pad_tokens", 0) / max(1, rec.get("tokens", 0) + rec.get("pad_tokens", 0))
            epoch = f"  epoch {rec['epoch']:.2f}" if "epoch" in rec else ""
            self.say(f"step {step}/{total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}{epoch}  "
                     f"real tok/s {rec['tokens_per_s']:.0f} (pad {100 * pad:.0f}%)  "
                     f"{'MFU %.0f%%  ' % (100 * rec['mfu']) if 'mfu' in rec else ''}"
                     f"mem/rank {max(rec['peak_memory_bytes']) / 2**30:.2f} GiB  eta {eta:.0f}s")

    def text(self) -> str:
        """The history so far (main process; a checkpoint carries it, so that a job resumed on
        another node keeps it)."""
        return self.path.read_text() if self.main and self.path.is_file() else ""

    def start(self) -> None:
        """A run from step 1: drop what an earlier attempt that left no checkpoint recorded, so
        that the history holds each step once."""
        if self.main:
            self.path.write_text("")

    def resumed(self, step: int, history: str) -> None:
        """Continue after ``step`` with ``history`` (the checkpoint's records up to it), marked."""
        self.first_step = step + 1
        if self.main:
            kept = [line for line in history.splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
            kept.append(json.dumps({"step": step, "resumed_from": step}))
            self.path.write_text("\n".join(kept) + "\n")
