"""Row-wise int8 quantization and the frozen int8 linear layer.

The frozen base weight W0 (out x in) is stored as

    weight        int8  (out, in)   round(W0 * 127 / absmax_row)
    weight_absmax fp32  (out,)      max |W0[row, :]|

Both are plain ``nn.Parameter``s with ``requires_grad=False`` (docs/design.md decision 1): DeepSpeed
ZeRO-3 partitions and all-gathers them like any other parameter, which bitsandbytes'
``Int8Params`` does not survive. Quantization (``int8_vectorwise_quant``) comes from
bitsandbytes' functional API, which dispatches to its CUDA kernel or its CPU implementation.

The matmul is this module's own autograd function (docs/design.md decision 9), weight-only int8:

    forward   y      = x · dequant(W)ᵀ (+ bias)    in x's dtype (the compute dtype)
    backward  grad_x = grad_y · dequant(W)

A frozen weight needs no gradient of its own, so nothing derived from ``x`` is saved for
backward: only references to the layer's own parameters, which ZeRO-3 gathers again for the
block's backward. (bitsandbytes' ``matmul`` keeps ``x`` on its autograd context, which activation
checkpointing cannot free, and on CUDA with threshold 0 it quantizes ``x`` to int8 as well: a
different computation from its CPU path.) The same code runs on CPU and CUDA, so quality measured
on CPU carries over. Large weights are dequantized in blocks of output rows
(:data:`DEQUANT_BLOCK_ELEMENTS`), so the float copy never exceeds one block.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn


# Largest number of weight elements dequantized at once, in the forward and the backward of the
# int8 matmul: 2^26 elements is 128 MiB in bf16 (256 MiB in fp32). A GPT-3 d_ff projection
# (49152 x 12288) runs as 9 blocks; every SmolLM2 weight runs as one.
DEQUANT_BLOCK_ELEMENTS = 1 << 26
# Largest number of stored elements read and quantized (or copied) at once while loading: its
# temporaries (the stored rows, their float and absolute values, bitsandbytes' own) came to 0.76
# GiB per 2^26-element block at GPT-3 width, over the step's own peak at N=1; a quarter of that
# keeps loading below it (bench/RESULTS.md, 2026-12-07). Rows quantize independently: the block
# changes no value.
LOAD_BLOCK_ELEMENTS = 1 << 24
_FP16_MAX = 65504.0


def row_blocks(rows: int, cols: int, block_elements: int = DEQUANT_BLOCK_ELEMENTS) -> list[tuple[int, int]]:
    step = max(1, block_elements // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def matmul_blocks(weight: torch.Tensor) -> list[tuple[int, int]]:
    """The row blocks the int8 matmul dequantizes ``weight`` in: one for a meta weight, whose
    "float copy" allocates nothing (the planner's forward then costs the same at any width; in
    blocks, a 2^22 x 2^20 projection would be 65,536 of them)."""
    rows, cols = weight.shape
    return [(0, rows)] if weight.is_meta else row_blocks(rows, cols)


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float matrix row by row (absmax) to int8, from the dtype it is stored in.

    bitsandbytes' CUDA kernel takes fp16, so each block of rows is cast to fp16 on its way in:
    exact for fp16 and (within fp16's range) bf16 sources; for fp32 it rounds at 2^-11 relative,
    far below int8's 2^-7 step. A matrix with values beyond fp16's range is first scaled by a
    power of two (exact) and its absmax scaled back. Rows are quantized in blocks, so the
    temporaries never exceed one block however large the matrix.

    Args:
        weight: float tensor of shape (out, in), any float dtype.

    Returns:
        (int8 tensor of shape (out, in), fp32 row absmax of shape (out,)), on ``weight``'s device.
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"quantize_rowwise expects a float weight, got {weight.dtype}")
    import bitsandbytes.functional as bnbF  # here, not at import: importing it costs seconds (it
    # compiles its CPU ops with torch.compile), which validating a spec on a meta skeleton never needs

    rows, cols = weight.shape
    q = torch.empty(rows, cols, dtype=torch.int8, device=weight.device)
    absmax = torch.empty(rows, dtype=torch.float32, device=weight.device)
    if weight.numel() == 0:
        return q, absmax.fill_(0)
    for r0, r1 in row_blocks(rows, cols, LOAD_BLOCK_ELEMENTS):
        block = weight[r0:r1].detach()
        top = float(block.abs().max())
        if not math.isfinite(top):
            raise ValueError(f"weight rows {r0}..{r1} hold a non-finite value; cannot quantize")
        shift = max(0, math.ceil(math.log2(top / _FP16_MAX))) if top > _FP16_MAX else 0
        b16 = (block.float() / 2.0 ** shift if shift else block).to(torch.float16).contiguous()
        qb, ab, _ = bnbF.int8_vectorwise_quant(b16)
        ab = ab.float() * 2.0 ** shift
        # An all-zero row has absmax 0 and quantizes to 0/0; keep it exactly zero instead.
        zero = ab == 0
        if zero.any():
            qb = torch.where(zero.unsqueeze(1), torch.zeros_like(qb), qb)
        q[r0:r1] = qb
        absmax[r0:r1] = ab
    return q, absmax


def dequantize_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rowwise`: q * absmax / 127 in ``dtype``.

    The scale is computed in fp32 and the product rounded once to ``dtype``, so a row's values do
    not depend on the compute dtype beyond that final rounding.
    """
    return (q.float() * (absmax.float() / 127.0).unsqueeze(1)).to(dtype)


_SCRATCH = threading.local()  # per thread: {(device, dtype): flat tensor}, the matmul's dequantized block


def _dequantized_block(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_rowwise` of one row block, written into this thread's reused scratch
    buffer for ``(device, dtype)`` (grown to the largest block it has held, at most
    DEQUANT_BLOCK_ELEMENTS): converted from int8 and scaled in place, no fresh allocation per layer and step,
    whose page faults cost more than the multiply on CPU. The same values: the product is formed
    in fp32 and rounded once to ``dtype``. Valid until this thread's next call."""
    table = getattr(_SCRATCH, "buffers", None)
    if table is None:
        table = _SCRATCH.buffers = {}
    key, n = (q.device, dtype), q.numel()
    buf = table.get(key)
    if buf is None or buf.numel() < n:
        buf = table[key] = torch.empty(n, dtype=dtype, device=q.device)
    out = buf[:n].view(q.shape)
    # int8 -> dtype in place (exact: |q| <= 127), then the scale, formed in fp32 and rounded once to
    # dtype: the values of torch.mul(q, scale, out=out), without the temporary of the whole block
    # that a mixed-dtype mul into `out` allocates (0.25 GiB per fp32 block at GPT-3 width)
    out.copy_(q)
    return out.mul_((absmax.float() / 127.0).unsqueeze(1))


class Int8Matmul(torch.autograd.Function):
    """y = x · dequant(W)ᵀ + bias with nothing derived from x saved for backward (module docstring).

    The weight, its scales and the bias are kept as references on the context (not through
    ``save_for_backward``): they are the layer's frozen parameters, not activations, and under
    ZeRO-3 their storage is released after the forward and gathered again before the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight, ctx.absmax = weight, absmax
        parts = [x @ _dequantized_block(weight[r0:r1], absmax[r0:r1], x.dtype).t()
                 for r0, r1 in matmul_blocks(weight)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        weight, absmax = ctx.weight, ctx.absmax
        grad_x = None
        if ctx.needs_input_grad[0]:
            for r0, r1 in matmul_blocks(weight):
                part = grad_y[..., r0:r1] @ _dequantized_block(weight[r0:r1], absmax[r0:r1], grad_y.dtype)
                grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None, None, None


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight is int8 with fp32 per-row absmax.

    ``forward(x) = x @ dequant(weight).T + bias`` in ``x``'s dtype, through :class:`Int8Matmul`;
    gradients flow to ``x`` only. The layer never trains: every parameter has
    ``requires_grad=False``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Created in __init__ (not attached later) so that deepspeed.zero.Init partitions them.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_absmax = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                          requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Quantize a float (out, in) weight into a new layer on the weight's device."""
        out_f, in_f = weight.shape
        layer = cls(in_f, out_f, bias=bias is not None, device=weight.device)
        layer.load_float_weight(weight, bias)
        return layer

    @torch.no_grad()
    def load_float_weight(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Quantize ``weight`` (out, in), in the dtype it comes in, into this layer's int8 storage."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        q, absmax = quantize_rowwise(weight.to(self.weight.device))
        self.weight.data = q
        self.weight_absmax.data = absmax
        if bias is not None:
            if self.bias is None:
                raise ValueError("this layer was built without a bias")
            self.bias.data = bias.detach().to(device=self.weight.device, dtype=self.bias.dtype).clone()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rowwise(self.weight, self.weight_absmax, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The parameters are read as they are now: under ZeRO-3 they are gathered just before this
        # forward (and again before the backward) and released after it.
        return Int8Matmul.apply(x, self.weight, self.weight_absmax, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
