"""Memory and checkpoint planner: exact counts from the architecture, bytes per worker by method.

Counts (:class:`ModelCounts`) come from ``model.count_model``, which builds the model on the
meta device (no weights allocated) with the same quantization and LoRA injection the job would
apply, so parameter numbers are exact; this module is the arithmetic on them. Bytes are
arithmetic on those counts; the terms that must be modelled (the gathered working set,
activations, a fixed per-process overhead) are stated here and checked against measured runs in
``bench/plan_vs_measured.py``. This module imports no torch, ray or deepspeed, and nothing else of the package.

Methods compared on the same model:

* ``full``: full fine-tuning, mixed-precision AdamW, ZeRO-3 (16 bytes per parameter sharded:
  16-bit weight and gradient, fp32 master, two fp32 Adam moments).
* ``lora_fp16``: LoRA on a replicated fp16 base, the paper's setup (every GPU holds the base).
* ``lora_int8_zero3``: this project: int8 base (1 byte per weight + fp32 row scale) and float
  embeddings/norms sharded by ZeRO-3; LoRA weights, gradients and AdamW state only for A and B.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

GiB = 1 << 30
METHODS = ("full", "lora_fp16", "lora_int8_zero3")
# DeepSpeed ZeRO-3 defaults (deepspeed/runtime/zero/config.py): parameters smaller than this
# stay whole on every rank after their first gather; at most this many elements are live.
PERSISTENCE_THRESHOLD = 100_000
MAX_LIVE_PARAMETERS = 1_000_000_000
# Fixed per-worker overhead, calibrated once (bench/plan_vs_measured.py, SmolLM2 at N=1 on CPU):
# the Python process with torch, transformers, deepspeed and ray imported, allocator slack, the
# tokenizer and data. On CUDA the CUDA context and NCCL buffers take its place (assumed, not
# measured here: no GPU on the calibration machine).
OVERHEAD_BYTES = {"cpu": int(1.064 * GiB), "cuda": int(1.5 * GiB)}


@dataclass(frozen=True)
class ModelCounts:
    """Exact parameter counts of a model as a job would build it."""

    architecture: str
    layers: int
    hidden: int
    heads: int
    vocab: int
    total_params: int  # base model, each tied tensor once, LoRA excluded
    quantized_linear_params: int  # decoder-block linear weights (int8 in ours)
    quantized_rows: int  # their output rows: one fp32 scale each
    float_params: int  # everything else: embeddings, norms, head, biases
    lora_params: int
    lora_tensors_persistent: bool  # every LoRA tensor below the persistence threshold
    largest_block_params: int  # one decoder block
    largest_linear_params: int
    small_float_params: int  # float tensors below the persistence threshold (kept whole)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure arithmetic ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What the job runs with: workers, batch, sequence, device."""

    workers: int
    micro_batch: int
    seq_len: int
    device: str = "cuda"  # cuda: bf16 compute; cpu: fp32 compute
    activation_checkpointing: bool = False
    adapter_bytes_per_param: int = 2  # fp16/bf16 adapter (the paper's 35 MB); 4 for float32

    @property
    def compute_bytes(self) -> int:
        return 2 if self.device == "cuda" else 4


def activation_bytes(c: ModelCounts, s: Setup) -> int:
    """Activations kept for backward, for one micro-batch.

    Per layer, s·b·h·(34 + 5·a·s/h) bytes in 16-bit (Korthikanti et al., 2022), scaled to the
    compute dtype; with activation checkpointing only each layer's input is kept, plus one
    layer's full set during its recomputation. Logits in fp32 and their gradient: 2·b·s·V·4.
    """
    per_layer_16bit = s.seq_len * s.micro_batch * c.hidden * (34 + 5 * c.heads * s.seq_len / c.hidden)
    per_layer = per_layer_16bit * s.compute_bytes / 2
    if s.activation_checkpointing:
        layers = c.layers * s.seq_len * s.micro_batch * c.hidden * s.compute_bytes + per_layer
    else:
        layers = c.layers * per_layer
    logits = 2 * s.micro_batch * s.seq_len * c.vocab * 4
    return int(layers + logits)


def memory_terms(c: ModelCounts, method: str, s: Setup) -> dict[str, int]:
    """Bytes per worker, term by term, for ``method`` on ``s.workers`` workers."""
    n, cb = s.workers, s.compute_bytes
    # AdamW state per trainable parameter besides the compute-dtype weight: gradient (cb), fp32
    # master copy when computing in 16-bit (4), two fp32 moments (8).
    state = cb + (4 if cb == 2 else 0) + 8
    terms: dict[str, int] = {}
    if method == "full":
        terms["base_weights"] = math.ceil(c.total_params * cb / n)
        terms["optimizer_and_gradients"] = math.ceil(c.total_params * state / n)
        terms["persistent_small_params"] = int(c.small_float_params * cb * (1 - 1 / n))
        terms["gathered_working_set"] = min(c.total_params, MAX_LIVE_PARAMETERS) * cb
    elif method == "lora_fp16":
        terms["base_weights"] = c.total_params * 2  # replicated: the whole fp16 base on every GPU
        terms["lora_weights"] = c.lora_params * cb
        terms["optimizer_and_gradients"] = c.lora_params * state
    elif method == "lora_int8_zero3":
        terms["base_weights"] = math.ceil((c.quantized_linear_params + c.quantized_rows * 4) / n)
        terms["float_weights"] = math.ceil(c.float_params * cb / n)
        lora_whole = c.lora_tensors_persistent  # small LoRA tensors stay whole on every rank
        terms["lora_weights"] = c.lora_params * cb if lora_whole else math.ceil(c.lora_params * cb / n)
        terms["optimizer_and_gradients"] = math.ceil(c.lora_params * state / n)
        terms["persistent_small_params"] = int((c.small_float_params * cb + c.quantized_rows * 4) * (1 - 1 / n))
        # Gathered parameters stay live until DeepSpeed's max_live_parameters (1e9 elements by
        # default; max_reuse_distance is as large), so a model below that stays gathered after
        # its first forward: its whole int8 base and float parameters, on every rank. Above the
        # cap, the live share is cap / total (DeepSpeed gathers into buffers of its own even at
        # N=1). Plus the dequantized copy of the largest weight that the int8 matmul makes in the
        # compute dtype.
        live = min(1.0, MAX_LIVE_PARAMETERS / c.total_params)
        stored = c.quantized_linear_params + c.quantized_rows * 4 + c.float_params * cb
        terms["gathered_working_set"] = int(live * stored) + c.largest_linear_params * cb
    else:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    terms["activations"] = activation_bytes(c, s)
    terms["overhead"] = OVERHEAD_BYTES[s.device]
    return terms


def per_worker_bytes(c: ModelCounts, method: str, s: Setup) -> int:
    return sum(memory_terms(c, method, s).values())


def min_workers(c: ModelCounts, method: str, s: Setup, memory: int, limit: int = 65536) -> int | None:
    """The fewest workers of ``memory`` bytes each that fit ``method``; None if none do."""
    lo = 1
    if per_worker_bytes(c, method, _with(s, workers=limit)) > memory:
        return None
    hi = limit
    while lo < hi:  # per-worker bytes only fall as workers are added
        mid = (lo + hi) // 2
        if per_worker_bytes(c, method, _with(s, workers=mid)) <= memory:
            hi = mid
        else:
            lo = mid + 1
    return lo


def checkpoint_bytes(c: ModelCounts, method: str, s: Setup) -> dict[str, int]:
    """What a run writes: the deliverable and a resumable checkpoint."""
    if method == "full":
        return {"deliverable": c.total_params * 2, "resumable": c.total_params * (2 + 12)}
    # LoRA: the adapter, and LoRA fp32 weights plus their two AdamW moments
    return {"deliverable": c.lora_params * s.adapter_bytes_per_param, "resumable": c.lora_params * 12}


def _with(s: Setup, **kw: Any) -> Setup:
    return Setup(**{**asdict(s), **kw})


@dataclass
class Plan:
    counts: ModelCounts
    setup: Setup
    gpu_memory: int
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ours = self.methods["lora_int8_zero3"]
        return {
            "model": self.counts.to_dict(),
            "setup": asdict(self.setup),
            "gpu_memory_bytes": self.gpu_memory,
            "trainable_params": self.counts.lora_params,
            "adapter_bytes": ours["checkpoint_bytes"]["deliverable"],
            "base_bytes": self.counts.quantized_linear_params + self.counts.quantized_rows * 4
            + self.counts.float_params * self.setup.compute_bytes,
            "base_bytes_fp16": self.counts.total_params * 2,
            "per_worker_bytes": ours["per_worker_bytes"],
            "min_gpus": ours["min_gpus"],
            "methods": self.methods,
        }


def make_plan(c: ModelCounts, s: Setup, gpu_memory: int) -> Plan:
    plan = Plan(c, s, gpu_memory)
    for method in METHODS:
        terms = memory_terms(c, method, s)
        plan.methods[method] = {
            "terms": terms,
            "per_worker_bytes": sum(terms.values()),
            "fits": sum(terms.values()) <= gpu_memory,
            "min_gpus": min_workers(c, method, s, gpu_memory),
            "trainable_params": c.total_params if method == "full" else c.lora_params,
            "checkpoint_bytes": checkpoint_bytes(c, method, s),
        }
    return plan


def parse_bytes(text: str) -> int:
    """'80GiB', '80GB', '512MiB', '1e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise ValueError(f"--gpu-memory: {text!r} is not a size like 80GiB, 80GB or 512MiB")
    value = float(num) * units[unit]
    if value <= 0:
        raise ValueError(f"--gpu-memory: must be positive, got {text!r}")
    return int(value)


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
