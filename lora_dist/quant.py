"""Row-wise int8 quantization and the frozen int8 linear layer.

The frozen base weight W0 (out x in) is stored as

    weight        int8  (out, in)   round(W0 * 127 / absmax_row)
    weight_absmax fp32  (out,)      max |W0[row, :]|

Both are plain ``nn.Parameter``s with ``requires_grad=False`` (DESIGN.md decision 1): DeepSpeed
ZeRO-3 partitions and all-gathers them like any other parameter, which bitsandbytes'
``Int8Params`` does not survive. Quantization (``int8_vectorwise_quant``) and the matmul
(``bitsandbytes.matmul``) come from bitsandbytes' functional API, which dispatches to its own
kernels on CUDA and to its CPU/default implementations elsewhere: the same call on both.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from bitsandbytes.autograd._functions import MatmulLtState

# bitsandbytes warns on every CUDA call that activations are cast to fp16 for the int8 matmul;
# that is the documented LLM.int8() behaviour, not news worth one line per layer per step.
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def quantize_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a float matrix row by row (absmax) to int8.

    Args:
        weight: float tensor of shape (out, in).

    Returns:
        (int8 tensor of shape (out, in), fp32 row absmax of shape (out,)).
    """
    if weight.dim() != 2:
        raise ValueError(f"quantize_rowwise expects a 2-D weight, got shape {tuple(weight.shape)}")
    # bitsandbytes' CUDA kernel takes fp16; the CPU/default path accepts any float. fp16 keeps
    # 10 mantissa bits, more than the 7 that survive int8, so the cast loses nothing that counts.
    w16 = weight.detach().to(torch.float16).contiguous()
    q, absmax, _ = bnbF.int8_vectorwise_quant(w16)
    # An all-zero row has absmax 0 and quantizes to 0/0; keep it exactly zero instead.
    absmax = absmax.float()
    if (absmax == 0).any():
        q = torch.where((absmax == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q, absmax


def dequantize_rowwise(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_rowwise`: q * absmax / 127 in ``dtype``."""
    return q.to(dtype) * (absmax.to(dtype) / 127.0).unsqueeze(1)


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight is int8 with fp32 per-row absmax.

    ``forward(x) = x @ dequant(weight).T + bias`` computed by ``bitsandbytes.matmul``; gradients
    flow to ``x`` only. The layer never trains: every parameter has ``requires_grad=False``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Created in __init__ (not attached later) so that deepspeed.zero.Init partitions them.
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.weight_absmax = nn.Parameter(torch.ones(out_features, dtype=torch.float32, device=device),
                                          requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=torch.float32, device=device),
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
        """Quantize ``weight`` (out, in) into this layer's int8 storage."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match "
                             f"({self.out_features}, {self.in_features})")
        q, absmax = quantize_rowwise(weight.to(self.weight.device))
        self.weight.data = q
        self.weight_absmax.data = absmax
        if bias is not None:
            if self.bias is None:
                raise ValueError("this layer was built without a bias")
            self.bias.data = bias.detach().to(device=self.weight.device, dtype=torch.float32).clone()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rowwise(self.weight, self.weight_absmax, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The state is rebuilt per call from the parameters as they are now: under ZeRO-3 they are
        # gathered just before this forward and released after it.
        state = MatmulLtState()
        state.CB = self.weight
        state.SCB = self.weight_absmax
        state.has_fp16_weights = False
        state.is_training = True  # bitsandbytes' name for "gradients flow to x": true here
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return bnb.matmul(x, self.weight, state=state, bias=bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"
