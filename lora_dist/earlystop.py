"""train.early_stop_patience: the best validation loss so far, its adapter, and how many
validations since it improved; what a checkpoint carries of it. No distributed code: the caller
hands in a runner whose ``gather_lora`` is the collective."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lora_dist.lora import LoraTensors
from lora_dist.records import EarlyStopState, LoraShape
from lora_dist.spec import JobSpec

BEST_PREFIX = "best/"  # a checkpoint's tensors of the best adapter so far: best/<module>/A, best/<module>/B


@dataclass
class EarlyStop:
    """train.early_stop_patience: the best validation loss so far, its adapter, and how many
    validations since it improved. Every rank holds the same figures (validation losses are
    summed over all ranks), so every rank decides alike; the adapter is on the main process."""
    patience: int
    min_delta: float
    best_step: int | None = None
    best_val: float = math.inf
    since: int = 0  # validations since the best
    stopped_at: int | None = None
    last_val: float | None = None
    lora: dict[str, LoraTensors] | None = None  # the best adapter, on the main process

    def observe(self, step: int, value: float, runner, last: bool = False) -> bool:
        """Count the validation loss of ``step``; keep the adapter when it is the best by more than
        min_delta (``runner.gather_lora``: a collective). Returns whether training stops early
        here (never at the ``last`` step: that run went to max_steps)."""
        self.last_val = value
        if value < self.best_val - self.min_delta:
            self.best_step, self.best_val, self.since = step, value, 0
            self.lora = runner.gather_lora()
        else:
            self.since += 1
            if self.since >= self.patience and not last:
                self.stopped_at = step
        return self.stopped_at is not None

    def state(self) -> EarlyStopState:
        """What a checkpoint carries, besides the adapter's tensors (:meth:`tensors`)."""
        shapes = {name: LoraShape(r=t.r, slices=t.slices, out_features=t.out_features)
                  for name, t in (self.lora or {}).items()}
        return EarlyStopState(best_step=self.best_step, best_val=self.best_val, since=self.since,
                              stopped_at=self.stopped_at, last_val=self.last_val, modules=shapes)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in (self.lora or {}).items():
            out[f"{BEST_PREFIX}{name}/A"], out[f"{BEST_PREFIX}{name}/B"] = t.A, t.B
        return out

    def restore(self, state: EarlyStopState, tensors: dict[str, torch.Tensor], main: bool) -> None:
        """Take up a checkpoint's :meth:`state` and best-adapter tensors (kept on the main process)."""
        self.best_step, self.best_val, self.since = state.best_step, state.best_val, state.since
        self.stopped_at, self.last_val = state.stopped_at, state.last_val
        self.lora = {name: LoraTensors(tensors[f"{BEST_PREFIX}{name}/A"], tensors[f"{BEST_PREFIX}{name}/B"], m.r,
                                       list(m.slices), m.out_features)
                     for name, m in state.modules.items()} if main else None

    def fields(self) -> dict[str, Any]:
        """The manifest's record of it."""
        return {"best_step": self.best_step, "best_val_loss": self.best_val, "stopped_at": self.stopped_at,
                "val_loss_last": self.last_val}


def early_stop(spec: JobSpec) -> EarlyStop | None:
    """The early stop of a JobSpec with train.early_stop_patience; None without."""
    t = spec.train
    return EarlyStop(t.early_stop_patience, float(t.early_stop_min_delta)) if t.early_stop_patience else None


def split_best(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A checkpoint's tensors as (training state, best adapter)."""
    best = {k: v for k, v in tensors.items() if k.startswith(BEST_PREFIX)}
    return {k: v for k, v in tensors.items() if k not in best}, best
