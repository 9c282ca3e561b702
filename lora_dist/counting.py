"""The planner's counting: exact parameter counts and the activations autograd saves, on the
meta device (nothing allocated), for ``plan.py``'s arithmetic.

:func:`count_model` builds the job's skeleton (``model.build_skeleton``) and counts it;
:func:`count_activations` runs a 1-block and a 2-block forward on meta under
``saved_tensors_hooks`` (:class:`SavedBytes`), with the fused attention real devices run
(:func:`meta_forward`). :func:`check_fits` refuses, from the same counts, a single-process
model whose weights exceed the device's free memory.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from lora_dist.base import base_config
from lora_dist.errors import ModelError
from lora_dist.lora import LoRALinear, is_lora_param
from lora_dist.model import build_skeleton, decoder_blocks, embeddings_require_grad, enable_activation_checkpointing
from lora_dist.plan import PERSISTENCE_THRESHOLD, Activations, ModelCounts
from lora_dist.quant import DEQUANT_BLOCK_ELEMENTS, Int8Linear
from lora_dist.spec import LoraSpec

def count_model(base: str, lora, quantization: str = "int8") -> ModelCounts:
    """Build ``base`` on the meta device, inject like a job, and count exactly.

    Args:
        base: a built-in id, a local Hugging Face directory, or an architecture mapping
            (``{"model_type": "gpt2", "n_layer": 96, ...}``) for shapes with no weights anywhere.
        lora: a LoraSpec (targets, r), or None for no LoRA.
        quantization: which linears count as quantized (``int8``) or stay float (``none``).
    """
    config = base_config(base)
    # counting: every decoder linear as Int8Linear (``quantization`` decides below which count as such)
    model, _ = build_skeleton(config, lora, "int8", meta_buffers=True)

    params = {id(p): (n, p) for n, p in model.named_parameters()}
    lora_n = sum(p.numel() for n, p in params.values() if is_lora_param(n))
    q_params = q_rows = 0
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            q_params += mod.weight.numel()
            q_rows += mod.out_features
    # the row scales are bookkeeping of quantization, not base parameters
    total = sum(p.numel() for n, p in params.values() if not is_lora_param(n) and not n.endswith("weight_absmax"))
    float_n = total - q_params
    blocks_name, blocks = decoder_blocks(model)

    def block_parts(block: nn.Module) -> tuple[int, int, int]:
        q = sum(m.weight.numel() for m in block.modules() if isinstance(m, Int8Linear))
        rows = sum(m.out_features for m in block.modules() if isinstance(m, Int8Linear))
        fl = sum(p.numel() for n, p in block.named_parameters()
                 if not is_lora_param(n) and p.dtype != torch.int8 and not n.endswith("weight_absmax"))
        return q, rows, fl

    parts = max((block_parts(b) for b in blocks), key=lambda t: t[0] + t[2])
    outside = [p.numel() for n, p in params.values() if not n.startswith(blocks_name + ".") and not is_lora_param(n)]
    outside_total = sum(outside)
    if quantization == "none":
        float_n, q_params, q_rows = total, 0, 0
        parts = (0, 0, parts[0] + parts[2])
    block_sizes = [sum(p.numel() for n, p in b.named_parameters() if not is_lora_param(n) and "absmax" not in n)
                   for b in blocks]
    linear_sizes = [m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear)] or [0]
    small = sum(p.numel() for n, p in params.values()
                if p.numel() < PERSISTENCE_THRESHOLD and not is_lora_param(n) and p.dtype != torch.int8)
    lora_persistent = all(p.numel() < PERSISTENCE_THRESHOLD for n, p in params.values() if is_lora_param(n))
    exported = sum(m.lora_A.numel() + (m.lora_B.numel() if m.full_width else m.out_features * m.lora_A.shape[0])
                   for m in model.modules() if isinstance(m, LoRALinear))
    matmuls = [m for m in model.modules() if _is_matmul(m)]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    first_block = {id(m) for m in blocks[0].modules()}  # the blocks repeat one shape
    shapes = {_in_out(m) for m in matmuls if id(m) in first_block or id(m) not in in_blocks}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelCounts(
        architecture=type(model).__name__,
        layers=len(blocks), hidden=config.hidden_size, heads=config.num_attention_heads,
        vocab=config.vocab_size, total_params=total, quantized_linear_params=q_params, quantized_rows=q_rows,
        float_params=float_n, lora_params=lora_n, lora_tensors_persistent=lora_persistent,
        largest_block_params=max(block_sizes), largest_linear_params=max(linear_sizes),
        small_float_params=small, block_quantized_params=parts[0], block_rows=parts[1],
        block_float_params=parts[2], lora_export_params=exported,
        outside_params=outside_total, largest_outside_params=max(outside, default=0),
        matmul_params=sum(m.weight.numel() for m in matmuls),
        block_matmul_params=sum(m.weight.numel() for m in matmuls if id(m) in in_blocks),
        attention_width=config.num_attention_heads * head_dim, linear_shapes=tuple(sorted(shapes)),
    )


def _is_matmul(m: nn.Module) -> bool:
    """A layer that multiplies every token by a weight matrix: Linear, Int8Linear, GPT-2's Conv1D
    (not an embedding, which looks rows up)."""
    return isinstance(m, (nn.Linear, Int8Linear)) or type(m).__name__ == "Conv1D"


def _in_out(m: nn.Module) -> tuple[int, int]:
    if type(m).__name__ == "Conv1D":  # weight (in, out)
        return int(m.weight.shape[0]), int(m.weight.shape[1])
    return int(m.in_features), int(m.out_features)


def weights_bytes(base: str, lora: LoraSpec | None, quantization: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the single-process model's weights take (counted on the meta skeleton): int8 linears
    at 1 byte plus a 4-byte scale per row, other base parameters in ``dtype``, LoRA pairs in fp32,
    plus the one row block of float values quantization holds while loading."""
    c = count_model(base, lora, quantization)
    block = min(DEQUANT_BLOCK_ELEMENTS, c.largest_linear_params) * 4 if c.quantized_linear_params else 0
    return (c.quantized_linear_params + 4 * c.quantized_rows + c.float_params * dtype.itemsize
            + 4 * c.lora_params + block)


def check_fits(base: str, lora: LoraSpec | None, quantization: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> int:
    """Refuse, before loading anything, a model whose weights exceed the device's free memory.

    Returns:
        The bytes the weights need.

    Raises:
        ModelError: saying how much the weights need and how much the device has.
    """
    from lora_dist.device import available_bytes

    need, have = weights_bytes(base, lora, quantization, dtype), available_bytes(device)
    if need > have:
        raise ModelError(f"model.base: {base} with quantization {quantization} needs {need / 2**30:.2f} GiB for its "
                         f"weights (plus activations) on {device}; {have / 2**30:.2f} GiB is available there. "
                         f"Use a machine with more memory{'' if quantization == 'int8' else ', or quantization int8'}.")
    return need


class SavedBytes:
    """Sum the bytes autograd saves for backward (each storage once; parameters are weights, not
    activations, and are left out)."""

    def __init__(self, model: nn.Module) -> None:
        # by storage: autograd may hand the hook a view of a parameter (a linear's weight)
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.sizes: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.params:
            self.sizes[key] = max(self.sizes.get(key, 0), t.numel() * t.element_size())
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


class _FlashAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` on the meta device, saving what the fused
    kernels that run on real devices save (CPU flash attention, CUDA flash / memory-efficient):
    q, k, v, the output and a float32 log-sum-exp per query. The meta device would otherwise take
    the math path, which keeps the (seq x seq) attention matrix no real run keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: counting only
        raise NotImplementedError


@contextlib.contextmanager
def meta_forward(device: str) -> Iterator[None]:
    """Let a Hugging Face forward run on meta tensors as it runs on real ones of ``device``: fused
    attention (above) where that device runs it (CPU flash attention has no dropout: with
    attention dropout the CPU takes the math path, and so does the count), and no check for
    packed sequences, which reads tensor values (a job's batches are padded, never packed)."""
    from transformers import masking_utils

    original, packed = nn.functional.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        if query.is_meta and (device == "cuda" or dropout_p == 0.0):
            return _FlashAttention.apply(query, key, value)
        return original(query, key, value, attn_mask, dropout_p, *args, **kwargs)

    nn.functional.scaled_dot_product_attention = sdpa
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original
        masking_utils.find_packed_sequence_indices = packed


def _saved_bytes(config, layers: int, lora, quantization: str, method: str, micro_batch: int, seq_len: int,
                 dtype: torch.dtype, device: str, checkpointing: bool) -> int:
    """Bytes autograd saves in one forward of a ``layers``-block model of ``config``, on meta."""
    import copy

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    full = method == "full"
    model, _ = build_skeleton(cfg, lora, quantization, full=full, dtype=dtype, meta_buffers=True)
    if not full:
        embeddings_require_grad(model)  # as the ZeRO-3 worker does (engine.blocks_as_zero3_leaves)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    counter = SavedBytes(model)
    with meta_forward(device), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return counter.total


def count_activations(base, lora, quantization: str, micro_batch: int, seq_len: int, dtype: str,
                      method: str = "lora", device: str = "cuda") -> Activations:
    """Count what autograd saves for backward for one micro-batch (docs/design.md decision 10).

    A 1-block and a 2-block model of ``base``'s architecture, with the job's quantization and LoRA,
    run forward on the meta device in the compute ``dtype`` (``bf16``, ``fp16``, ``fp32``) under
    ``saved_tensors_hooks``, with and without activation checkpointing; the difference is one
    block, the rest is the head (embeddings, final norm, logits, loss). Nothing is allocated.

    Args:
        method: ``lora`` (frozen base, LoRA trains) or ``full`` (every weight trains).
        device: the device kind the job runs on (``cuda`` or ``cpu``): which attention kernel runs.
    """
    from lora_dist.device import TORCH_DTYPES

    config = base_config(base)
    torch_dtype = TORCH_DTYPES[dtype]
    args = (lora, quantization if method != "full" else "none", method, micro_batch, seq_len, torch_dtype, device)
    one, two = (_saved_bytes(config, k, *args, checkpointing=False) for k in (1, 2))
    one_c, two_c = (_saved_bytes(config, k, *args, checkpointing=True) for k in (1, 2))
    return Activations(per_block=two - one, per_block_checkpointed=two_c - one_c, head=one - (two - one),
                       logits=micro_batch * seq_len * config.vocab_size * 4)
