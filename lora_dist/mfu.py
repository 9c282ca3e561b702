"""Model FLOPs utilization: the FLOPs a step's tokens need by the architecture, per second, over
what this device's GEMMs reach in the compute dtype.

FLOPs per token (:func:`flop_count`, from ``counting.count_model``'s exact counts): a weight
matrix of ``n`` parameters costs ``2n`` forward; backward ``2n`` more for the input gradient of a
frozen weight and ``4n`` for a trained one (input and weight gradients); under activation
checkpointing the blocks' forward runs again (``2n``). Attention costs, per layer and per pair of
positions of one sequence, ``4 w`` forward (``Q K^T`` and ``A V``, ``w`` = query heads x head
dim) and ``8 w`` backward (+``4 w`` recomputed), counted over the full square of each example's
length as PaLM's appendix B counts it (Chowdhery et al. 2022). Padding computes nothing useful
and is not counted: only real tokens and each example's own length.

The peak (:func:`gemm_peak`) is measured, not looked up: the job's own linear shapes (a
micro-batch of tokens through each distinct layer shape), on the process's device, dtype and
threads, the best of them; remembered per machine (the best seen there) like the base's
fingerprint.
"""

from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from lora_dist.plan import ModelCounts
from lora_dist.store import atomic_file, cache_root

PROBE_SECONDS = 0.8  # all shapes of one probe together, after a warm-up call each
PROBE_CAP = {"cpu": (4096, 1 << 24), "cuda": (16384, 1 << 27)}  # rows, in x out elements per probe GEMM


@dataclass(frozen=True)
class FlopCount:
    """A step's model FLOPs: ``per_token`` x real tokens + ``per_token_sq`` x the sum over
    examples of their length squared (attention)."""

    per_token: float
    per_token_sq: float

    def of(self, tokens: int, tokens_sq: int) -> float:
        return self.per_token * tokens + self.per_token_sq * tokens_sq


def flop_count(counts: ModelCounts, full: bool, checkpointing: bool) -> FlopCount:
    """The FLOPs of training one token of a model counted by ``counting.count_model``: LoRA
    (``full`` False: the base frozen, its LoRA pairs trained) or full fine-tuning."""
    base, lora, blocks = counts.matmul_params, counts.lora_params, counts.block_matmul_params
    if full:
        dense = 6.0 * base
    else:
        dense = 2.0 * (base + lora) + 2.0 * base + 4.0 * lora
    attention = 12.0 * counts.layers * counts.attention_width
    if checkpointing:
        dense += 2.0 * (blocks + (0 if full else lora))
        attention += 4.0 * counts.layers * counts.attention_width
    return FlopCount(dense, attention)


def probe_shapes(counts: ModelCounts, micro_batch: int, max_length: int) -> list[tuple[int, int, int]]:
    """(rows, in, out) of the job's GEMMs: a micro-batch of positions through each layer shape."""
    return [(micro_batch * max_length, k, n) for k, n in counts.linear_shapes]


def gemm_peak(device: torch.device, dtype: torch.dtype, shapes: Sequence[tuple[int, int, int]],
              cache: bool = True) -> float:
    """FLOP/s of this process's best GEMM among ``shapes`` (``F.linear``, as the layers run) on
    ``device`` in ``dtype`` with its current torch threads, measured now (under a second) and
    remembered per machine, device, dtype, threads, torch version and shapes
    (``$LORA_DIST_CACHE/gemm_peak.json``): the best this machine has shown, so that a probe that
    ran while the machine was busy does not lower the peak that MFU is measured against."""
    rows_cap, elems_cap = PROBE_CAP["cuda" if device.type == "cuda" else "cpu"]
    probes = sorted({_capped(m, k, n, rows_cap, elems_cap) for m, k, n in shapes})
    peak = max((_flops_per_s(device, dtype, m, k, n, PROBE_SECONDS / len(probes)) for m, k, n in probes),
               default=0.0)
    if not cache:
        return peak
    key = json.dumps([_machine(device), str(dtype), torch.get_num_threads(), torch.__version__, probes])
    path = cache_root() / "gemm_peak.json"
    try:
        table = json.loads(path.read_text())
        best = table.get(key) if isinstance(table, dict) else None
    except (OSError, ValueError):
        table, best = {}, None
    if isinstance(best, (int, float)) and best >= peak:
        return float(best)
    try:
        atomic_file(path, json.dumps({**(table if isinstance(table, dict) else {}), key: peak}).encode())
    except OSError:
        pass  # a read-only cache remembers nothing: each job's own probe is its peak
    return peak


def _capped(m: int, k: int, n: int, rows_cap: int, elems_cap: int) -> tuple[int, int, int]:
    """The shape cut to a probe's bounds: fewer rows, and fewer outputs where in x out is larger
    than a probe's weight (a 12288 x 49152 head is measured on a slice of its columns)."""
    return max(1, min(m, rows_cap)), k, max(1, min(n, elems_cap // max(1, k)))


def _flops_per_s(device: torch.device, dtype: torch.dtype, m: int, k: int, n: int, seconds: float) -> float:
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        torch.nn.functional.linear(x, w)  # warm-up: kernels chosen, pages touched
        sync()
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < seconds:
            torch.nn.functional.linear(x, w)
            reps += 1
            if reps % 4 == 0 or reps == 3:
                sync()
        sync()
        elapsed = time.perf_counter() - t0
    return 2.0 * m * k * n * reps / elapsed


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{socket.gethostname()}|{torch.cuda.get_device_name(device)}"
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{socket.gethostname()}|{model}"


def mean_mfu(records: Sequence[dict]) -> float | None:
    """The manifest's ``mfu``: the mean over the recorded steps after each start's first (its
    warm-up), None where none is left."""
    values, warm = [], True
    for rec in records:
        if "resumed_from" in rec:
            warm = True
        elif "mfu" in rec:
            if not warm:
                values.append(rec["mfu"])
            warm = False
    return sum(values) / len(values) if values else None
