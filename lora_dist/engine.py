"""The only module that talks to DeepSpeed: ZeRO config, sharded build, gather, checkpoints.

The model is not built inside ``deepspeed.zero.Init`` (that would first allocate every float
linear, 1/N of the float model per rank at once, only to replace it). It is built as a skeleton
on the meta device, int8 linears and LoRA pairs included; then each decoder block, and afterwards
every remaining module, gets real (empty) storage and is handed to
``deepspeed.zero.Init(module=...)``, which partitions it at once, without a broadcast
(:func:`build_sharded`). Weights are then streamed from safetensors one tensor at a time, every
rank reading, quantizing and writing only its own partition, with no collective per tensor
(:func:`stream_weights`). Only the LoRA parameters are handed to the optimizer, so only they have
gradients and AdamW state.
Under ZeRO stages 1 and 2 (``cluster.zero_stage``, or ``auto`` where the base fits every worker:
``plan.choose_zero_stage``) the same skeleton gets whole storage on every rank
(:func:`build_replicated`) and each rank loads all the weight files; nothing is ever gathered.
:class:`ZeroRunner` is the engine as the training loop (train.py) sees it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from lora_dist.base import FileHasher, cached_fingerprint, combine_fingerprint, weight_files
from lora_dist.lora import LoRALinear, LoraTensors, lora_pair, lora_parameters, trainable_parameters
from lora_dist.model import Injection, build_skeleton, decoder_blocks, embeddings_require_grad, init_lora
from lora_dist.weights import TensorSource, load_weights
from lora_dist.quant import LOAD_BLOCK_ELEMENTS, Int8Linear, row_blocks, quantize_rowwise
from lora_dist.device import Placement
from lora_dist.spec import JobSpec


def ds_config(spec: JobSpec, world_size: int, placement: Placement, zero: dict[str, int],
              stage: int) -> dict[str, Any]:
    """DeepSpeed config from the spec: the ZeRO ``stage`` the job runs (``cluster.zero_stage``, auto
    resolved: ``plan.choose_zero_stage``) and its settings from the plan (``plan.zero_settings``),
    AdamW over LoRA only, clipping, accumulation, precision.

    Precision follows ``train.dtype`` (``placement``): fp32 has no fp16/bf16 key (an explicit
    dtype in zero.Init is ignored on the CPU accelerator, docs/design.md); bf16 is DeepSpeed's bf16
    mode and fp16 its fp16 mode with dynamic loss scaling. In both 16-bit modes the model's LoRA
    copy is in the compute dtype and the optimizer holds fp32 master weights and fp32 AdamW
    moments.
    """
    t = spec.train
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.max_grad_norm,
        # memory_efficient_linear (DeepSpeed's default: on) replaces torch.nn.functional.linear
        # process-wide with a Python autograd function; zero.Init reads it from this config and
        # ignores its own argument. The int8 base needs no weight gradients, so the built-in
        # linear is both correct and faster.
        # stage3_allgather_sequential: ZeRO-3 gathers each parameter straight into its own buffer.
        # Coalesced (DeepSpeed's default), the parameters of a fetch go into one flat buffer and are
        # then copied out (torch.cat), twice what it gathers at once: at GPT-3 width the fetch that
        # opens a forward (embedding, positions and a block, 4.1 GiB) took a rank to 10.9 GiB
        # (bench/RESULTS.md, issue 33).
        "zero_optimization": {"stage": stage, "memory_efficient_linear": False, "stage3_allgather_sequential": True,
                              **zero},
        # torch_adam: plain torch.optim.AdamW inside ZeRO (no fused op to compile; the same
        # optimizer as the single-process reference).
        "optimizer": {"type": "AdamW", "params": {"lr": t.lr, "weight_decay": t.weight_decay, "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if placement.dtype_name == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif placement.dtype_name == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                       "hysteresis": 2, "min_loss_scale": 1}
    return cfg


def init_distributed(cuda: bool) -> tuple[int, int]:
    """Join the process group Ray Train set up (gloo on CPU, nccl on GPU). On gloo, ZeRO-3's
    parameter gathers go through :func:`sliced_all_gather_into_tensor`."""
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    if not cuda:
        from deepspeed.comm import comm as ds_comm

        ds_comm.cdb.all_gather_function = sliced_all_gather_into_tensor  # every ZeRO-3 gather comes here
    return dist.get_rank(), dist.get_world_size()


# A gather on gloo goes in slices of this many bytes of output: each rank's slice is this over the
# world size (sliced_all_gather_into_tensor; plan.GATHER_BUFFER_BYTES repeats it).
GATHER_BUFFER_BYTES = 64 << 20


class _Done:
    """The handle of a collective that has already completed (what DeepSpeed waits on)."""

    def wait(self, *args: Any) -> bool:
        return True


def sliced_all_gather_into_tensor(output_tensor: torch.Tensor, input_tensor: torch.Tensor, group=None,
                                  async_op: bool = False):
    """``all_gather_into_tensor`` whose extra memory is bounded by :data:`GATHER_BUFFER_BYTES` (twice).

    gloo's own holds a second buffer the size of its whole output while it runs (measured: a
    0.57 GiB output raised each rank's resident memory by 1.15 GiB; bench/RESULTS.md, issue 33). At
    GPT-3 width every gather of the tied embedding and head (50257 x 12288 fp32, 2.47 GB) cost
    2.47 GB more than it holds. Here each rank's partition goes in slices: one gather of a slice
    from every rank into a buffer of :data:`GATHER_BUFFER_BYTES` (gloo doubles that one), copied to
    its place in the output (rank r's partition is the output's r-th contiguous part). The same
    bytes move, the same values land. Synchronous: the gloo work ran on the same cores either way."""
    world = dist.get_world_size(group)
    n = input_tensor.numel()
    step = max(1, GATHER_BUFFER_BYTES // (world * input_tensor.element_size()))
    if n <= step or world == 1 or output_tensor.numel() != world * n or not output_tensor.is_contiguous():
        return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
    out, flat = output_tensor.view(world, n), input_tensor.reshape(-1)
    buffer = torch.empty(world * step, dtype=input_tensor.dtype, device=input_tensor.device)
    for start in range(0, n, step):
        size = min(step, n - start)
        gathered = buffer[:world * size]
        dist.all_gather_into_tensor(gathered, flat[start:start + size], group=group)
        out[:, start:start + size].copy_(gathered.view(world, size))
    return _Done() if async_op else None


class _PartitionOnly(deepspeed.zero.Init):
    """``zero.Init(module=...)`` without its broadcast from rank 0.

    zero.Init makes every rank's parameters equal by broadcasting each whole tensor from rank 0
    before partitioning it: a collective per tensor that moves the whole model at start-up (and
    writes every page of each tensor on the receiving ranks). Here the values are uninitialised
    storage that no one reads: each rank writes its own partitions from the weight files
    (:func:`stream_weights`; every base parameter is required to be there) and the LoRA pairs are
    set from rank 0 (:func:`init_lora_sharded`). So each parameter is only partitioned.
    """

    def _zero_init_param(self, param: nn.Parameter) -> None:
        self._convert_to_deepspeed_param(param)
        param.partition()


def _skeleton(config_hf, spec: JobSpec, placement: Placement) -> tuple[nn.Module, Injection]:
    """The job's skeleton (``model.build_skeleton``), its float parameters in the compute dtype
    whatever config.json says."""
    return build_skeleton(config_hf, spec.lora, spec.model.quantization, full=spec.full,
                          dtype=placement.dtype)


def _materialize(unit: nn.Module, placement: Placement, made: dict[int, nn.Parameter]) -> None:
    """Give ``unit``'s own meta parameters real (empty) storage on the device; a tied parameter
    met again (``made``: by the meta parameter's id) gets the same new one."""
    for mod in unit.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.is_meta:
                new = made.get(id(p))
                if new is None:
                    # trainable parameters take the compute dtype: in 16-bit DeepSpeed keeps their
                    # fp32 master copy in the optimizer; frozen ones keep the skeleton's dtype
                    # (the int8 linears' row scales stay fp32)
                    dtype = placement.dtype if p.requires_grad and p.is_floating_point() else p.dtype
                    new = nn.Parameter(torch.empty(p.shape, dtype=dtype, device=placement.device),
                                       requires_grad=p.requires_grad)
                    made[id(p)] = new
                mod._parameters[name] = new


def build_sharded(config_hf, spec: JobSpec, config: dict[str, Any],
                  placement: Placement) -> tuple[nn.Module, Injection]:
    """ZeRO-3: build the model with every parameter partitioned, never holding more than one
    decoder block's parameters whole.

    The skeleton (:func:`_skeleton`) gets real storage one decoder block at a time, and afterwards
    one remaining module at a time, each handed to ``deepspeed.zero.Init(module=...)``, which
    partitions it at once (without broadcasting the empty values: :class:`_PartitionOnly`).
    Building the Hugging Face model inside ``zero.Init`` instead would first allocate every float
    linear (1/N of the float model per rank, all at once) only to replace it.
    """
    model, injection = _skeleton(config_hf, spec, placement)
    made: dict[int, nn.Parameter] = {}

    def partition(unit: nn.Module) -> None:
        _materialize(unit, placement, made)
        _PartitionOnly(module=unit, config_dict_or_path=config, mem_efficient_linear=False)

    _, blocks = decoder_blocks(model)
    for block in blocks:
        partition(block)
    for mod in reversed(list(model.modules())):  # children before parents: one module at a time
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            partition(mod)
    return model, injection


def build_replicated(config_hf, spec: JobSpec, placement: Placement) -> tuple[nn.Module, Injection]:
    """ZeRO-1 and 2: the whole model (int8 base, float rest, LoRA pairs) on every rank, allocated
    empty on the device; :func:`stream_weights` then fills it (each rank reading all the
    weight files: its share is everything) and :func:`init_lora_sharded` sets the LoRA pairs."""
    model, injection = _skeleton(config_hf, spec, placement)
    _materialize(model, placement, {})
    return model, injection


@dataclass
class Loaded:
    """What :func:`stream_weights` did on this rank."""
    fingerprint: str
    bytes_read: int  # by the loader (not counting this rank's share of the fingerprint)
    seconds: float


def stream_weights(model: nn.Module, model_dir: Path, injection: Injection, rank: int, world: int) -> Loaded:
    """Every rank fills its own partitions from safetensors, in parallel (docs/design.md decision 11).

    ZeRO-3 gives each rank a contiguous range of each flattened parameter. A rank reads only the
    bytes of that range (for an int8 linear, the rows that overlap it: row-wise absmax needs whole
    rows), quantizes them a row block at a time and writes its partition directly: no collective
    per tensor, 1/N of the weight files read per rank, and memory while loading near the rank's own
    share plus one row block. Quantization is per row, so the partitions hold exactly what
    quantizing the whole tensor would give.

    The base model's fingerprint is computed at the same time: unless this machine has it cached,
    each rank hashes every N-th weight file in a background thread, and one all-gather combines
    them at the end.
    """
    t0 = time.time()
    files = weight_files(model_dir)
    known = [cached_fingerprint(model_dir) if rank == 0 else None]
    dist.broadcast_object_list(known, src=0)
    hasher = FileHasher(files[rank::world]) if known[0] is None else None
    plan = load_weights(model, model_dir, injection.transposed, place=place_own_share)
    fp = known[0]
    if hasher is not None:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, hasher.result())
        fp = combine_fingerprint(model_dir, {k: v for part in parts for k, v in part.items()})
    return Loaded(fp, plan.bytes_read, time.time() - t0)


def _own_range(p: nn.Parameter) -> tuple[torch.Tensor, int, int]:
    """(this rank's storage of ``p`` as a flat tensor, first and end element of ``p`` it holds).

    A ZeRO-3 parameter of n elements is padded to a multiple of the group size and rank r holds
    elements [r*s, (r+1)*s) of its flattened value (s = the partition size); the padding past n
    is never read. A parameter ZeRO does not partition is held whole."""
    if hasattr(p, "ds_tensor"):
        part = p.ds_tensor
        start = part.ds_numel * dist.get_rank(group=p.ds_process_group)
        return part.view(-1), start, max(start, min(start + part.ds_numel, p.ds_numel))
    return p.data.view(-1), 0, p.numel()


@torch.no_grad()
def place_own_share(module: nn.Module, pname: str, source: TensorSource) -> None:
    """A :data:`weights.Placer` that writes only this rank's partition (see :func:`stream_weights`)."""
    if isinstance(module, Int8Linear) and pname == "weight":
        _fill_int8(module.weight, module.weight_absmax, source)
        return
    dest, start, end = _own_range(getattr(module, pname))
    for a in range(start, end, LOAD_BLOCK_ELEMENTS):
        b = min(a + LOAD_BLOCK_ELEMENTS, end)
        dest[a - start:b - start].copy_(source.flat(a, b))  # cast and moved to the device as it is copied


def _fill_int8(weight: nn.Parameter, absmax: nn.Parameter, source: TensorSource) -> None:
    wdest, ws, we = _own_range(weight)
    adest, a_s, a_e = _own_range(absmax)
    rows, cols = source.shape
    need = [(r0, r1) for r0, r1 in ((ws // cols, -(-we // cols)), (a_s, a_e)) if r0 < r1]
    if not need:
        return  # this rank holds only padding of both
    lo, hi = min(r0 for r0, _ in need), max(r1 for _, r1 in need)
    for b0, b1 in row_blocks(hi - lo, cols, LOAD_BLOCK_ELEMENTS):
        r0, r1 = lo + b0, lo + b1
        if not any(r0 < n1 and n0 < r1 for n0, n1 in need):
            continue
        q, scale = quantize_rowwise(source.rows(r0, r1).to(wdest.device))
        a, b = max(r0 * cols, ws), min(r1 * cols, we)
        if a < b:
            wdest[a - ws:b - ws].copy_(q.view(-1)[a - r0 * cols:b - r0 * cols])
        a, b = max(r0, a_s), min(r1, a_e)
        if a < b:
            adest[a - a_s:b - a_s].copy_(scale[a - r0:b - r0])


def init_lora_sharded(model: nn.Module, seed: int, rank: int) -> None:
    """The same LoRA initial values as the single-process path (one seeded generator, module order):
    under ZeRO-3 set on rank 0 and partitioned from there; a replicated model (stages 1 and 2)
    sets them on every rank, the generator being seeded."""
    params = list(lora_parameters(model).values())
    if not any(hasattr(p, "ds_id") for p in params):
        with torch.no_grad():
            init_lora(model, seed)
        return
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0), torch.no_grad():
        if rank == 0:
            init_lora(model, seed)


def blocks_as_zero3_leaves(model: nn.Module) -> None:
    """One ZeRO-3 fetch and release per decoder block instead of one per submodule.

    By default ZeRO-3 puts forward and backward hooks on every module (about 20 per Llama block
    with LoRA: attention, each projection, its LoRA pair, dropout, MLP, norms); at one worker those
    hooks cost more than the gathers they schedule. Marked as ZeRO-3 leaves, the blocks are
    gathered whole (one block's parameters are live at a time, which the per-module hooks allowed
    as well) and their LoRA gradients are reduced in the block's backward hook.

    That backward hook is a full backward hook: it fires once the gradient with respect to the
    block's inputs is computed, or, where no input requires grad, as soon as the gradient of its
    output arrives, before the block's own LoRA gradients exist. The first block's input is the
    frozen embedding's output, so it is made to require grad (as PEFT does for k-bit training).
    """
    from deepspeed.utils import set_z3_leaf_modules

    _, blocks = decoder_blocks(model)
    set_z3_leaf_modules(model, list({type(b) for b in blocks}))
    embeddings_require_grad(model)


def initialize(model: nn.Module, config: dict[str, Any], scheduler: Callable[[torch.optim.Optimizer], Any]):
    """deepspeed.initialize with only the trainable (LoRA) parameters given to the optimizer;
    ``scheduler(optimizer)`` makes the learning-rate schedule.

    Under stages 1 and 2 in 16-bit, DeepSpeed casts every float parameter of the (replicated)
    model to the compute dtype, the int8 linears' fp32 row scales among them; they are kept and
    put back, so every stage computes with the same fp32 scales (ZeRO-3's partitions keep them).
    DeepSpeed also broadcasts every parameter of a replicated model from rank 0 here (its
    ``_broadcast_model``, not configurable): one pass of the base over the network at start-up,
    redundant since every rank loaded the same values.
    """
    params = list(trainable_parameters(model).values())
    stage = config["zero_optimization"]["stage"]
    if stage == 3:
        blocks_as_zero3_leaves(model)
    scales = {} if stage == 3 else {id(m.weight_absmax): (m.weight_absmax, m.weight_absmax.data)
                                    for m in model.modules() if isinstance(m, Int8Linear)}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=config,
                                           lr_scheduler=scheduler)
    for p, data in scales.values():
        if p.data.dtype != data.dtype:
            p.data = data
    return engine


class ZeroRunner:
    """A DeepSpeed engine as the training loop drives it (see ``train.Runner``).

    DeepSpeed scales each micro-batch's loss by 1/grad_accum, averages gradients across ranks,
    clips, and applies AdamW and the schedule itself at the accumulation boundary; ``step`` after
    every backward is how its API asks for that.
    """

    def __init__(self, engine, rank: int) -> None:
        self.module = engine
        self.rank = rank

    def backward(self, loss: torch.Tensor) -> None:
        self.module.backward(loss)
        self.module.step()

    def lr(self) -> float:
        return self.module.get_lr()[0]

    def step(self) -> None:
        pass  # applied inside the last micro-batch's engine.step()

    def gather_lora(self) -> dict[str, LoraTensors] | None:
        return gather_lora(self.module.module, self.rank)

    def full_state(self) -> dict[str, torch.Tensor] | None:
        return gather_full_state(self.module)


def partition_report(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds of the int8 base and of every parameter, against the full sizes."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    out = {"int8_local_bytes": 0, "int8_full_bytes": 0, "local_param_bytes": 0, "full_param_bytes": 0}
    for p in seen.values():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p.data
        full = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        size = p.element_size()
        out["local_param_bytes"] += local.numel() * size
        out["full_param_bytes"] += full * size
        if p.dtype == torch.int8:
            out["int8_local_bytes"] += local.numel() * size
            out["int8_full_bytes"] += full * size
    return out


def gather_lora(model: nn.Module, rank: int) -> dict[str, LoraTensors] | None:
    """Collective: every rank enters; rank 0 gets full fp32 CPU copies of every LoRA pair,
    gathered one module at a time (in the same order on every rank), so that no device holds
    more than one pair beyond its partition (all of a 175B model's pairs at a high rank would be
    gigabytes)."""
    out: dict[str, LoraTensors] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            with deepspeed.zero.GatheredParameters([mod.lora_A, mod.lora_B], modifier_rank=None):
                if rank == 0:
                    out[name] = lora_pair(mod)
    return out if rank == 0 else None


def gather_full_state(engine) -> dict[str, torch.Tensor] | None:
    """Collective: the whole model's state dict on rank 0 (full fine-tuning export)."""
    if engine.zero_optimization_partition_weights():
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    return state if dist.get_rank() == 0 else None


# --- resumable state: gathered whole, so it does not depend on the world size ------------------------

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's per-parameter state


def _trainable(engine) -> list[tuple[str, nn.Parameter]]:
    return list(trainable_parameters(engine.module).items())


class NoTrainState(RuntimeError):
    """There is no trained state to checkpoint yet."""


def _flat_partitions(opt) -> list[torch.Tensor]:
    """This rank's fp32 partitions of the trainable parameters (the optimizer's own params)."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        return list(opt.fp32_partitioned_groups_flat)
    return list(opt.single_partition_of_fp32_groups)


def _zero_optimizer(engine) -> Any:
    """The engine's ZeRO optimizer (stage 1, 2 or 3), whose fp32 partitions hold the trained state."""
    opt = engine.optimizer
    if not (hasattr(opt, "fp32_partitioned_groups_flat") or hasattr(opt, "single_partition_of_fp32_groups")):
        raise RuntimeError(f"resumable checkpoints read a ZeRO optimizer's fp32 partitions; this engine has "
                           f"{type(opt).__name__}")
    return opt


def gather_train_state(engine, rank: int) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Collective: every rank enters. Rank 0 gets every trainable parameter's fp32 master value
    and AdamW moments, whole, on the CPU (``param/<name>``, ``exp_avg/<name>``,
    ``exp_avg_sq/<name>``); every rank gets the scalars (optimizer step count, scheduler, loss
    scaler). One parameter is assembled at a time, so no rank holds more than one extra
    parameter's worth beyond what it returns.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = _zero_optimizer(engine)
    # Every rank decides alike (an fp16 overflow skips the step on all of them), before any
    # collective: a rank that owns no fragment yet would otherwise wait in the gather forever.
    if not all(k in opt.optimizer.state.get(flat, {}) for flat in _flat_partitions(opt) for k in MOMENTS):
        raise NoTrainState("no optimizer step has been applied yet (in fp16 every step so far overflowed)")
    tensors: dict[str, torch.Tensor] = {}
    for name, p in _trainable(engine):
        values = {"param": safe_get_full_fp32_param(p)}
        for key in MOMENTS:
            values[key] = safe_get_full_optimizer_state(p, key)
        if rank == 0:
            for kind, v in values.items():
                tensors[f"{kind}/{name}"] = v.detach().float().cpu().clone()
    steps = {float(st["step"]) for st in opt.optimizer.state.values() if "step" in st}
    scalars: dict[str, Any] = {"optimizer_step": max(steps) if steps else 0.0,
                               "scheduler": _json_safe(engine.lr_scheduler.state_dict())}
    scaler = getattr(opt, "loss_scaler", None)
    if scaler is not None and getattr(scaler, "dynamic", False):
        scalars["loss_scaler"] = {k: float(getattr(scaler, k)) for k in
                                  ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")
                                  if hasattr(scaler, k)}
    return (tensors if rank == 0 else None), scalars


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    """A scheduler state dict as JSON (LambdaLR's lambdas are functions, stored as None)."""
    return {k: v for k, v in d.items() if k != "lr_lambdas" and isinstance(v, (int, float, bool, list, type(None)))}


@torch.no_grad()
def restore_train_state(engine, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    """Every rank: put a gathered state (:func:`gather_train_state`, written at any world size and
    ZeRO stage) into this engine. Each rank copies only its own partition of each tensor into the
    fp32 master and the AdamW moments, and its own range (ZeRO-3) or the whole (stages 1 and 2)
    into the model's compute copy; no collective.

    Raises:
        RuntimeError: a trainable parameter is missing from ``tensors``, has another shape, or
            ``tensors`` holds one this model does not have.
    """
    opt = _zero_optimizer(engine)
    params = _trainable(engine)
    expected = {f"{kind}/{name}" for name, _ in params for kind in ("param", *MOMENTS)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise RuntimeError(f"the checkpoint does not match this model's trainable parameters: missing "
                           f"{missing[:3]}, unexpected {extra[:3]} (was it written for other lora targets?)")
    for name, p in params:
        numel, shape = getattr(p, "ds_numel", p.numel()), getattr(p, "ds_shape", p.shape)
        for kind in ("param", *MOMENTS):
            if tensors[f"{kind}/{name}"].numel() != numel:
                raise RuntimeError(f"{kind}/{name}: {tuple(tensors[f'{kind}/{name}'].shape)} in the checkpoint, "
                                   f"{tuple(shape)} here")
    # AdamW creates its state at the first step; a fresh engine has none, so make it here.
    step = torch.tensor(float(scalars["optimizer_step"]))
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    for flat in _flat_partitions(opt):
        opt.optimizer.state[flat] = {"step": step.clone(), **{k: torch.zeros_like(flat) for k in MOMENTS}}
    (_restore_partitions if zero3 else _restore_replicated)(opt, params, tensors)
    sched = engine.lr_scheduler
    sched.load_state_dict({**sched.state_dict(), **scalars["scheduler"]})
    for group, lr in zip(opt.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr
    if "loss_scaler" in scalars and getattr(opt, "loss_scaler", None) is not None:
        for k, v in scalars["loss_scaler"].items():
            setattr(opt.loss_scaler, k, type(getattr(opt.loss_scaler, k))(v))


def _restore_partitions(opt, params: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor]) -> None:
    """ZeRO-3: each rank's own range of every tensor into its fp32 partitions and compute copy."""
    for name, p in params:
        for kind in ("param", *MOMENTS):
            # DeepSpeed's safe_set_full_* narrow the unpadded value by the padded partition size,
            # which fails on the last rank of an uneven partition; copy the overlap instead.
            part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                        optim_state_key=None if kind == "param" else kind)
            _copy_own(part, tensors[f"{kind}/{name}"], dist.get_rank(group=p.ds_process_group), p.ds_numel)
        dest, start, end = _own_range(p)  # the compute copy the forward uses (fp32, bf16 or fp16)
        dest[:end - start].copy_(tensors[f"param/{name}"].reshape(-1)[start:end])


def _restore_replicated(opt, params: list[tuple[str, nn.Parameter]], tensors: dict[str, torch.Tensor]) -> None:
    """Stages 1 and 2: each rank's fragment of the fp32 master and the moments (DeepSpeed's
    ``safe_set_full_*``, once every parameter's fragment points at the state just made), and the
    whole compute copy, which every rank holds."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()
    for name, p in params:
        full = tensors[f"param/{name}"].to(p.device)
        safe_set_full_fp32_param(p, full)
        for kind in MOMENTS:
            safe_set_full_optimizer_state(p, tensors[f"{kind}/{name}"].to(p.device), kind)
        p.data.copy_(full.view_as(p))


def _copy_own(part: torch.Tensor, full: torch.Tensor, rank: int, numel: int) -> None:
    start = part.numel() * rank
    end = max(start, min(start + part.numel(), numel))
    part[:end - start].copy_(full.reshape(-1)[start:end])
