"""Memory and checkpoint planner: exact counts from the architecture, bytes per worker by method.

Counts (:class:`ModelCounts`) come from ``counting.count_model``, which builds the model on the
meta device (no weights allocated) with the same quantization and LoRA injection the job would
apply, so parameter numbers are exact. Activation bytes (:class:`Activations`) come from
``counting.count_activations``: what autograd saves when a 1- and a 2-block model of the job's
shape run forward on the meta device (docs/design.md decision 10). This module is the arithmetic on
them, with the ZeRO-3 settings a job runs with (:func:`zero_settings`); the per-process overhead is
measured once per device kind, and ``bench/plan_vs_measured.py`` checks the sum against measured peaks.
It imports no torch, ray or deepspeed (of the package, only ``spec``).

Methods compared on the same model:

* ``full``: full fine-tuning, mixed-precision AdamW, ZeRO-3 (16 bytes per parameter sharded:
  16-bit weight and gradient, fp32 master, two fp32 Adam moments).
* ``lora_fp16``: LoRA on a replicated fp16 base, the paper's setup (every GPU holds the base).
* ``lora_int8_zero3``: this project: int8 base (1 byte per weight + fp32 row scale) and float
  embeddings/norms sharded by ZeRO-3; LoRA weights, gradients and AdamW state only for A and B.

Every method's terms can also be had under ZeRO stage 1 or 2 (``memory_terms(..., stage=)``):
the base replicated whole on every worker, only the optimizer state (and at stage 2 the
gradients) partitioned. :func:`choose_zero_stage` is ``cluster.zero_stage: auto``: the cheapest
stage whose plan fits a worker.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from lora_dist.spec import DTYPE_BYTES, resolve_dtype

GiB = 1 << 30
METHODS = ("full", "lora_fp16", "lora_int8_zero3")
METHOD_NAMES = {"full": "full fine-tuning, ZeRO-3", "lora_fp16": "LoRA, replicated fp16 base (paper)",
                "lora_int8_zero3": "LoRA, int8 base, ZeRO-3 (ours)"}
STAGES = (1, 2, 3)  # cheapest first: 1 and 2 never gather a parameter, 3 gathers every block twice a step
# cluster.zero_stage: auto replicates the base only where the plan needs at most this share of a
# worker's memory (the per-process overhead is measured on one machine; plan_vs_measured.py shows
# how far the sum can be off)
AUTO_MEMORY_SHARE = 0.9
# DeepSpeed ZeRO-3: parameters smaller than this stay whole on every rank after their first gather
# (its default, kept).
PERSISTENCE_THRESHOLD = 100_000
# Elements dequantized at once by the int8 matmul (quant.DEQUANT_BLOCK_ELEMENTS, repeated here so
# that the planner imports no torch; tests/test_plan.py checks the two agree).
DEQUANT_BLOCK_ELEMENTS = 1 << 26
# On CPU (gloo) a ZeRO-3 gather goes in slices through a buffer of this many bytes
# (engine.GATHER_BUFFER_BYTES, repeated here; tests/test_plan.py checks the two agree).
GATHER_BUFFER_BYTES = 64 << 20
# Fixed per-worker overhead, measured once per device kind: on CPU a Ray worker's resident memory
# with torch, transformers, deepspeed and ray imported, the tokenizer and the data in, before its
# model is built (the manifest's process_bytes_before_model; the main job at N=1, 2026-12-07,
# bench/RESULTS.md: every rank of its N = 1, 2, 4 runs within 0.2% of it). It is measured as a term
# of its own, not fitted to a peak. On CUDA the CUDA context and NCCL buffers take its place (not
# measured: no GPU has been lent; bench/gpu_check.sh prints the figure).
OVERHEAD_BYTES = {"cpu": 612_667_392, "cuda": int(1.5 * GiB)}


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
    largest_block_params: int  # one decoder block (base parameters)
    largest_linear_params: int
    small_float_params: int  # float tensors below the persistence threshold (kept whole)
    block_quantized_params: int = 0  # of the largest block: int8 linear weights,
    block_rows: int = 0  # their rows (fp32 scales),
    block_float_params: int = 0  # and float parameters (norms, biases, float linears)
    # LoRA parameters in the PEFT-format adapter file: more than lora_params where LoRA covers
    # output slices of a fused projection (GPT-2's c_attn: q and v), whose B PEFT stores full
    # width with zero rows (adapter.py)
    lora_export_params: int = 0
    outside_params: int = 0  # every base parameter outside the blocks (embeddings, untied head, final norm)
    largest_outside_params: int = 0  # the largest of them (the embedding, or an untied head)
    # what a token costs in FLOPs (mfu.flop_count): the weights every token multiplies, a tied head
    # counted as a matmul (not the embedding lookup), those inside the blocks, the attention width
    # (query heads x head dim), and the distinct (in, out) shapes of one block's linears and the head
    matmul_params: int = 0
    block_matmul_params: int = 0
    attention_width: int = 0
    linear_shapes: tuple[tuple[int, int], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Activations:
    """Bytes autograd saves for backward for one micro-batch, counted (not modelled) by
    ``counting.count_activations``: a 1- and a 2-block model of the job's shape run forward on the
    meta device under ``torch.autograd.graph.saved_tensors_hooks``."""

    per_block: int  # one decoder block, no activation checkpointing
    per_block_checkpointed: int  # one decoder block under activation checkpointing (its input)
    head: int  # outside the blocks: embeddings, final norm, logits, loss
    logits: int  # one fp32 (batch, seq, vocab) tensor: the loss's backward holds two (see activation_bytes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- pure arithmetic ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setup:
    """What the job runs with: workers, batch, sequence, device, compute dtype."""

    workers: int
    micro_batch: int
    seq_len: int
    device: str = "cuda"
    dtype: str = "auto"  # train.dtype: auto is bf16 on cuda, fp32 on cpu
    activation_checkpointing: bool = False
    adapter_bytes_per_param: int = 2  # fp16/bf16 adapter (the paper's 35 MB); 4 for float32

    @property
    def dtype_name(self) -> str:
        return resolve_dtype(self.dtype, self.device)

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype_name]


def block_bytes(c: ModelCounts, cb: int, quantized: bool = True) -> int:
    """One decoder block as stored: int8 weights and fp32 scales (or float), float rest."""
    if quantized:
        return c.block_quantized_params + c.block_rows * 4 + c.block_float_params * cb
    return (c.block_quantized_params + c.block_float_params) * cb


def zero_settings(c: ModelCounts, method: str = "lora_int8_zero3") -> dict[str, int]:
    """DeepSpeed ZeRO-3 settings derived from the model (defaults do not fit it).

    * ``stage3_prefetch_bucket_size``: one whole decoder block (elements), so that the next
      block's all-gather overlaps this block's compute (DeepSpeed's 5e7 is less than one
      GPT-3 block of 1.8e9).
    * ``stage3_max_live_parameters``: two blocks, the one computing and the one prefetched; and
      ``stage3_max_reuse_distance``: one block, so a block is released after its forward and
      gathered again for its backward. With the defaults (1e9 each) a model below a billion
      parameters stays gathered whole on every rank, and memory does not fall with N.
    * ``reduce_bucket_size``: the trainable parameters (LoRA: a few million) up to 5e8, instead
      of DeepSpeed's 5e8 elements whatever is trained.
    * ``stage3_param_persistence_threshold``: DeepSpeed's default (1e5): norms and LoRA pairs
      below it stay whole on every rank.
    * ``allgather_bucket_size`` (stages 1 and 2: the updated partitions gathered after a step):
      the same as ``reduce_bucket_size``.
    """
    block = max(1, c.largest_block_params + c.block_rows)
    trainable = c.total_params if method == "full" else c.lora_params
    bucket = int(min(max(trainable, 1), 500_000_000))
    return {"stage3_prefetch_bucket_size": block, "stage3_max_live_parameters": 2 * block,
            "stage3_max_reuse_distance": block, "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD,
            "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}


def gather_buffer_bytes(c: ModelCounts, s: Setup, quantized: bool, stage: int) -> int:
    """What a ZeRO-3 gather holds beside the parameter it gathers, on CPU: gloo's all-gather keeps a
    second buffer the size of its whole output while it runs, so a parameter gathered whole costs
    its size again, and one larger than the slice buffer goes through it in slices (the buffer and
    gloo's copy of it: engine.sliced_all_gather_into_tensor). The largest gathered parameter is the
    larger of a block's largest linear weight (int8 in ours) and the embedding. NCCL on GPUs
    gathers in place; at N=1 and stages 1 and 2 nothing is gathered."""
    if s.device != "cpu" or s.workers == 1 or stage != 3:
        return 0
    cb = s.compute_bytes
    largest = max(c.largest_linear_params * (1 if quantized else cb), c.vocab * c.hidden * cb)
    return largest if largest <= GATHER_BUFFER_BYTES else 2 * GATHER_BUFFER_BYTES


def activation_bytes(c: ModelCounts, a: Activations, s: Setup) -> int:
    """Activations for one micro-batch: what autograd saves (counted per block and for the head),
    plus what the loss's backward allocates while everything saved is still alive: the gradient
    of the log-softmax and the gradient of the logits, two fp32 (batch, seq, vocab) tensors. With
    activation checkpointing each block keeps its checkpointed input, and one block's full set
    lives again while it is recomputed."""
    if s.activation_checkpointing:
        blocks = c.layers * a.per_block_checkpointed + a.per_block
    else:
        blocks = c.layers * a.per_block
    return a.head + blocks + 2 * a.logits


def memory_terms(c: ModelCounts, method: str, s: Setup, acts: dict[str, Activations],
                 stage: int = 3) -> dict[str, int]:
    """Bytes per worker, term by term, for ``method`` on ``s.workers`` workers under ZeRO ``stage``.

    ``acts`` holds the counted activations: ``"lora"`` (a frozen base with LoRA) and ``"full"``
    (every weight trains). ``stage`` applies to ``full`` and ``lora_int8_zero3`` (``lora_fp16`` is
    the paper's replicated setup whatever it is): at 1 and 2 the base is whole on every worker and
    only the optimizer state (stage 1) and the gradients too (stage 2) are partitioned.
    """
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
    n, cb = s.workers, s.compute_bytes
    # AdamW state per trainable parameter besides the compute-dtype weight: gradient (cb), the
    # optimizer's fp32 master copy (4: DeepSpeed clones the partition even in fp32), two fp32
    # moments (8).
    state = cb + 4 + 8
    zs = zero_settings(c, method)
    dequant = min(c.largest_linear_params, DEQUANT_BLOCK_ELEMENTS) * cb
    terms: dict[str, int] = {}

    def optimizer(trainable: int) -> int:  # gradient, fp32 master and moments: what the stage partitions
        if stage == 1:  # the compute-dtype gradient whole, the rest partitioned
            return trainable * cb + math.ceil(trainable * (state - cb) / n)
        return math.ceil(trainable * state / n)

    if method == "full":
        terms["base_weights"] = math.ceil(c.total_params * cb / (n if stage == 3 else 1))
        terms["optimizer_and_gradients"] = optimizer(c.total_params)
        terms["persistent_small_params"] = int(c.small_float_params * cb * (1 - 1 / n)) if stage == 3 else 0
        terms["reduce_bucket"] = zs["reduce_bucket_size"] * cb
        terms["gathered_working_set"] = ((min(2, c.layers) * block_bytes(c, cb, quantized=False)
                                          + c.outside_params * cb) if n > 1 and stage == 3 else 0) \
            + gather_buffer_bytes(c, s, False, stage)
        activations = acts["full"]
    elif method == "lora_fp16":
        terms["base_weights"] = c.total_params * 2  # replicated: the whole fp16 base on every GPU
        terms["lora_weights"] = c.lora_params * cb
        terms["optimizer_and_gradients"] = c.lora_params * state
        activations = acts["lora"]
    elif method == "lora_int8_zero3":
        shards = n if stage == 3 else 1
        terms["base_weights"] = math.ceil((c.quantized_linear_params + c.quantized_rows * 4) / shards)
        terms["float_weights"] = math.ceil(c.float_params * cb / shards)
        lora_whole = c.lora_tensors_persistent or stage < 3  # small LoRA tensors stay whole on every rank
        terms["lora_weights"] = c.lora_params * cb if lora_whole else math.ceil(c.lora_params * cb / n)
        terms["optimizer_and_gradients"] = optimizer(c.lora_params)
        terms["persistent_small_params"] = (int((c.small_float_params * cb + c.quantized_rows * 4) * (1 - 1 / n))
                                            if stage == 3 else 0)
        terms["reduce_bucket"] = zs["reduce_bucket_size"] * cb
        # What ZeRO-3 holds gathered when memory peaks (zero_settings), in buffers of its own
        # beside the partitions: the block computing and the one prefetched, and the largest
        # parameter outside the blocks. Those are modules of their own, each gathered for its
        # forward and again for its backward and released after: the embedding is no longer held
        # when an untied head is (the 1B Llama's N=2 and N=4 peaks hold one of the two, since the
        # frozen head keeps no view of its gathered weight: model.FrozenHead; bench/RESULTS.md,
        # 2026-12-07). At N=1 nothing is gathered: DeepSpeed's all-gather at world size 1 makes
        # each parameter a view of its own partition (NoGatherHandle); stages 1 and 2 never
        # gather a parameter. Plus one block of a weight dequantized into the compute dtype.
        gathered = ((min(2, c.layers) * block_bytes(c, cb) + c.largest_outside_params * cb)
                    if n > 1 and stage == 3 else 0)
        terms["gathered_working_set"] = gathered + dequant + gather_buffer_bytes(c, s, True, stage)
        activations = acts["lora"]
    else:
        raise ValueError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    terms["activations"] = activation_bytes(c, activations, s)
    terms["overhead"] = OVERHEAD_BYTES[s.device]
    return terms


def per_worker_bytes(c: ModelCounts, method: str, s: Setup, acts: dict[str, Activations], stage: int = 3) -> int:
    return sum(memory_terms(c, method, s, acts, stage).values())


@dataclass(frozen=True)
class StageChoice:
    """What ``cluster.zero_stage`` resolved to for a job, and why (the manifest records both)."""

    stage: int
    reason: str
    per_worker_bytes: dict[int, int] = field(default_factory=dict)  # each stage's plan (auto only)


def choose_zero_stage(c: ModelCounts, method: str, s: Setup, acts: dict[str, Activations], memory: int
                      ) -> StageChoice:
    """``cluster.zero_stage: auto``: the cheapest stage whose plan fits ``memory`` bytes per
    worker (within :data:`AUTO_MEMORY_SHARE` of it). Stages 1 and 2 replicate the base on every
    worker and never gather a parameter; where neither fits, stage 3 shards the base (and says so
    when even its plan is over)."""
    method = "full" if method == "full" else "lora_int8_zero3"
    need = {stage: per_worker_bytes(c, method, s, acts, stage) for stage in STAGES}
    budget = int(memory * AUTO_MEMORY_SHARE)
    room = f"{AUTO_MEMORY_SHARE:.0%} of the worker's {fmt_bytes(memory)} is {fmt_bytes(budget)}"
    for stage in (1, 2):
        if need[stage] <= budget:
            return StageChoice(stage, f"auto: the base replicated on each of {s.workers} worker(s) plans "
                                      f"{fmt_bytes(need[stage])} per worker at ZeRO-{stage} and {room}: no "
                                      f"parameter gathers", need)
    over = "" if need[3] <= budget else "; ZeRO-3 is over it too (more workers would shard it further)"
    return StageChoice(3, f"auto: the base replicated plans {fmt_bytes(need[2])} per worker at ZeRO-2 and {room}: "
                          f"ZeRO-3 shards it across {s.workers} worker(s), {fmt_bytes(need[3])} per worker{over}", need)


def explicit_stage(stage: int) -> StageChoice:
    return StageChoice(stage, f"cluster.zero_stage: {stage} in the spec")


def min_workers(c: ModelCounts, method: str, s: Setup, memory: int, acts: dict[str, Activations],
                limit: int = 65536) -> int | None:
    """The fewest workers of ``memory`` bytes each that fit ``method``; None if none do."""
    lo = 1
    if per_worker_bytes(c, method, _with(s, workers=limit), acts) > memory:
        return None
    hi = limit
    while lo < hi:  # per-worker bytes only fall as workers are added
        mid = (lo + hi) // 2
        if per_worker_bytes(c, method, _with(s, workers=mid), acts) <= memory:
            hi = mid
        else:
            lo = mid + 1
    return lo


def checkpoint_bytes(c: ModelCounts, method: str, s: Setup) -> dict[str, int]:
    """What a run writes: the deliverable and a resumable checkpoint."""
    if method == "full":
        return {"deliverable": c.total_params * 2, "resumable": c.total_params * (2 + 12)}
    # LoRA: the adapter file, and LoRA fp32 weights plus their two AdamW moments. Ours is PEFT's
    # format (a fused projection's q/v pairs stored full width); the paper's loralib stores the
    # trained tensors only.
    exported = max(c.lora_export_params, c.lora_params) if method == "lora_int8_zero3" else c.lora_params
    return {"deliverable": exported * s.adapter_bytes_per_param, "resumable": c.lora_params * 12}


def _with(s: Setup, **kw: Any) -> Setup:
    return Setup(**{**asdict(s), **kw})


@dataclass
class Plan:
    counts: ModelCounts
    setup: Setup
    gpu_memory: int
    activations: dict[str, Activations]
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    auto: StageChoice | None = None  # what cluster.zero_stage: auto picks for ours on these workers

    def to_dict(self) -> dict[str, Any]:
        ours = self.methods["lora_int8_zero3"]
        auto = self.auto
        return {
            "zero_stage_auto": None if auto is None else {
                "stage": auto.stage, "reason": auto.reason,
                "per_worker_bytes": {str(k): v for k, v in auto.per_worker_bytes.items()}},
            "model": self.counts.to_dict(),
            "setup": {**asdict(self.setup), "dtype": self.setup.dtype_name},
            "activations": {k: v.to_dict() for k, v in self.activations.items()},
            "zero_settings": zero_settings(self.counts),
            "gpu_memory_bytes": self.gpu_memory,
            "trainable_params": self.counts.lora_params,
            "adapter_bytes": self.counts.lora_params * self.setup.adapter_bytes_per_param,  # trained tensors
            "adapter_file_bytes": ours["checkpoint_bytes"]["deliverable"],  # as the PEFT-format file holds them
            "base_bytes": self.counts.quantized_linear_params + self.counts.quantized_rows * 4
            + self.counts.float_params * self.setup.compute_bytes,
            "base_bytes_fp16": self.counts.total_params * 2,
            "per_worker_bytes": ours["per_worker_bytes"],
            "min_gpus": ours["min_gpus"],
            "methods": self.methods,
        }

    def table(self, base: str, lora_r: int, lora_targets: Sequence[str]) -> str:
        """The plan as ``lora-dist plan`` prints it: the counts, then one row per method."""
        c, setup, ours, d = self.counts, self.setup, self.methods["lora_int8_zero3"], self.to_dict()
        lines = [f"{base} ({c.architecture}): {c.total_params:,} parameters; {c.quantized_linear_params:,} in "
                 f"decoder-block linears (int8), {c.float_params:,} float; LoRA r={lora_r} on "
                 f"{', '.join(lora_targets)}: {c.lora_params:,} trainable",
                 f"base weights: fp16 {fmt_bytes(c.total_params * 2)}, ours (int8 linears + fp32 row scales + "
                 f"{setup.dtype_name} rest) {fmt_bytes(d['base_bytes'])}",
                 f"per worker on {setup.workers} x {fmt_bytes(self.gpu_memory)} ({setup.device}, {setup.dtype_name} "
                 f"compute), micro-batch {setup.micro_batch} x {setup.seq_len} tokens, activation checkpointing "
                 f"{'on' if setup.activation_checkpointing else 'off'}:",
                 f"  {'method':<36} {'trainable':>16} {'per worker':>11} {'fits':>5} {'min GPUs':>9} "
                 f"{'checkpoint':>11}"]
        for m in METHODS:
            r = self.methods[m]
            lines.append(f"  {METHOD_NAMES[m]:<36} {r['trainable_params']:>16,} {fmt_bytes(r['per_worker_bytes']):>11} "
                         f"{'yes' if r['fits'] else 'no':>5} {str(r['min_gpus'] or 'never'):>9} "
                         f"{fmt_bytes(r['checkpoint_bytes']['deliverable']):>11}")
        lines.append("  ours, term by term: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ours["terms"].items()))
        a = self.activations["lora"]
        lines.append(f"  activations counted on meta: {fmt_bytes(a.per_block)} per block "
                     f"({fmt_bytes(a.per_block_checkpointed)} checkpointed), {fmt_bytes(a.head)} outside the blocks, "
                     f"logits gradient {fmt_bytes(a.logits)}")
        lines.append("  ZeRO-3 settings: " + ", ".join(f"{k} {v:,}" for k, v in d["zero_settings"].items()))
        lines.append(f"  cluster.zero_stage auto picks {self.auto.stage}: {self.auto.reason.removeprefix('auto: ')} "
                     f"(a job's workers decide from the memory free when they start)")
        exported, trained = ours["checkpoint_bytes"]["deliverable"], c.lora_params * setup.adapter_bytes_per_param
        lines.append(f"  adapter {trained:,} bytes of trained LoRA tensors"
                     + (f" ({exported:,} bytes in the PEFT-format file: B of a fused projection's q/v slices is "
                        f"stored full width)" if exported != trained else "")
                     + f"; resumable LoRA checkpoint {fmt_bytes(ours['checkpoint_bytes']['resumable'])}")
        return "\n".join(lines)


def make_plan(c: ModelCounts, s: Setup, gpu_memory: int, acts: dict[str, Activations]) -> Plan:
    plan = Plan(c, s, gpu_memory, acts)
    for method in METHODS:
        terms = memory_terms(c, method, s, acts)
        plan.methods[method] = {
            "terms": terms,
            "per_worker_bytes": sum(terms.values()),
            "fits": sum(terms.values()) <= gpu_memory,
            "min_gpus": min_workers(c, method, s, gpu_memory, acts),
            "trainable_params": c.total_params if method == "full" else c.lora_params,
            "checkpoint_bytes": checkpoint_bytes(c, method, s),
        }
    plan.auto = choose_zero_stage(c, "lora", s, acts, gpu_memory)
    return plan


def parse_bytes(text: str, flag: str = "--gpu-memory") -> int:
    """'80GiB', '80GB', '512MiB', '1e9' -> bytes; ``flag`` names the option in the error."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (KeyError, ValueError):  # "", "1.2.3", "80XB"
        raise ValueError(f"{flag}: {text!r} is not a size like 80GiB, 80GB or 512MiB") from None
    if not 0 < value < float("inf"):  # 1e400 is inf, which int() refuses with a traceback
        raise ValueError(f"{flag}: must be a positive size, and finite, got {text!r}")
    return int(value)


def fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"
