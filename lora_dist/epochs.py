"""``train.epochs`` made optimizer steps, and where a step is in epochs. No torch.

One epoch is one pass over the training examples: ``data.BatchPlan.micro_batches(n)`` micro-batches
(n / micro_batch_size, or packed: the rows the examples pack into, micro_batch_size rows each).
An optimizer step takes ``workers x grad_accum`` micro-batches, so E epochs are

    steps = ceil(E x micro_batches_per_epoch / (workers x grad_accum))

(the last step may run into the next epoch: BatchPlan's sequence is endless). The number is fixed
at the job's first start (the manifest and every checkpoint record it as ``epoch_plan``): a job
resumed at another worker count keeps its steps and its learning-rate schedule.
"""

from __future__ import annotations

import math

from lora_dist.records import EpochPlan


def epoch_steps(epochs: float, micro_batches_per_epoch: float, workers: int, grad_accum: int) -> int:
    """The optimizer steps that ``epochs`` passes take (at least 1)."""
    return max(1, math.ceil(epochs * micro_batches_per_epoch / (workers * grad_accum) - 1e-9))


def planned_steps(spec, plan, workers: int) -> tuple[int, EpochPlan | None]:
    """(max steps, the epoch plan) of a job on ``workers`` ranks whose batches ``plan`` (a
    data.BatchPlan) makes: ``train.max_steps`` with no plan, or the steps of ``train.epochs``."""
    t = spec.train
    if t.epochs is None:
        return t.max_steps, None
    per_epoch = plan.micro_batches(plan.n)
    steps = epoch_steps(t.epochs, per_epoch, workers, t.grad_accum)
    return steps, EpochPlan(epochs=t.epochs, steps=steps, micro_batches_per_epoch=per_epoch, workers=workers,
                            micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum)


def plan_line(p: EpochPlan, batching: str, resumed: bool = False) -> str:
    """``train.epochs: 3 = 123 steps at 2 workers x 8 x 1`` and what one epoch is."""
    unit = "rows" if batching == "packed" else "examples"
    return (f"train.epochs: {p.epochs:g} = {p.steps} steps at {p.workers} workers x {p.micro_batch_size} x "
            f"{p.grad_accum} (workers x {unit} per micro-batch x grad_accum; {p.micro_batches_per_epoch:.1f} "
            f"micro-batches per epoch, {batching})" + (", as the job's first start fixed them" if resumed else ""))


def epoch_at(next_index: int, micro_batches_per_epoch: float) -> float:
    """Epochs done once the run reaches BatchPlan index ``next_index``."""
    return next_index / micro_batches_per_epoch if micro_batches_per_epoch > 0 else 0.0
