"""LoRA over a frozen base layer (Hu et al., ICLR 2022).

            x ──────────────► W0 (frozen: float or int8) ──────┐
            │                                                  ▼
            └─► dropout ─► A (r x in) ─► B (out x r) ─► * s ─► (+) ─► h

    h = W0 x + s · B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

B starts at zero, so a fresh adapter leaves the base model's output unchanged; A is
Kaiming-uniform (loralib and PEFT) or Gaussian with std 1/r. Only ``lora_A`` and ``lora_B``
train (:func:`set_trainable`); freezing, counting, checkpointing and export all filter on those
names.

A fused projection (GPT-2's ``c_attn`` holds q, k and v) can carry LoRA on some output slices
only, as the paper did for q and v: each slice gets its own rank-r pair, stacked row-wise in
``lora_A`` ((r * n_slices) x in) and ``lora_B`` (sum of slice widths x r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from lora_dist.quant import Int8Linear

TRAINABLE_MARKERS = ("lora_A", "lora_B")


def is_lora_param(name: str) -> bool:
    """True for the parameter names that LoRA trains (the contract every filter uses)."""
    return any(f".{m}" in f".{name}" for m in TRAINABLE_MARKERS)


class LoRALinear(nn.Module):
    """A frozen linear base (``nn.Linear`` or :class:`Int8Linear`) plus a trainable low-rank update.

    Args:
        base: the frozen layer; its parameters are set to ``requires_grad=False``.
        r: rank, >= 1.
        alpha: scaling numerator.
        dropout: dropout probability on the LoRA branch input.
        init: ``"kaiming"`` (default, as loralib/PEFT) or ``"gaussian"`` for ``lora_A``.
        use_rslora: scale by alpha / sqrt(r) instead of alpha / r.
        slices: output row ranges ``[(start, stop), ...]`` that receive LoRA; ``None`` means all rows.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                 use_rslora: bool = False, slices: Sequence[tuple[int, int]] | None = None) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"LoRA init must be 'kaiming' or 'gaussian', got {init!r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.slices = [tuple(s) for s in slices] if slices is not None else [(0, self.out_features)]
        for start, stop in self.slices:
            if not 0 <= start < stop <= self.out_features:
                raise ValueError(f"slice ({start}, {stop}) outside 0..{self.out_features}")
        lora_out = sum(stop - start for start, stop in self.slices)
        device = _param_device(base)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r * len(self.slices), self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(lora_out, r, device=device))
        self.init = init
        self.reset_lora_parameters()
        self.merged = False

    @torch.no_grad()
    def reset_lora_parameters(self, generator: torch.Generator | None = None) -> None:
        """B = 0; A Kaiming-uniform (or Gaussian), drawn from ``generator`` when given."""
        if self.lora_A.is_meta or self.lora_A.numel() == 0:
            return  # a skeleton or a ZeRO-3 partition placeholder: initialised once materialised
        # Drawn on the CPU in fp32 whatever the parameter's device and dtype, then copied in: the
        # same initial values on every device (a CPU generator cannot fill a CUDA tensor).
        for i in range(len(self.slices)):
            a = torch.empty(self.r, self.in_features)
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            else:
                nn.init.normal_(a, std=1.0 / self.r, generator=generator)
            self.lora_A[i * self.r:(i + 1) * self.r].copy_(a)
        nn.init.zeros_(self.lora_B)

    @property
    def full_width(self) -> bool:
        return self.slices == [(0, self.out_features)]

    def delta_weight(self) -> torch.Tensor:
        """s · B A as an (out, in) float matrix (zero rows outside the slices)."""
        a, b = self.lora_A.float(), self.lora_B.float()
        if self.full_width:
            return self.scaling * (b @ a)
        delta = torch.zeros(self.out_features, self.in_features, device=a.device)
        row = 0
        for i, (start, stop) in enumerate(self.slices):
            width = stop - start
            delta[start:stop] = b[row:row + width] @ a[i * self.r:(i + 1) * self.r]
            row += width
        return self.scaling * delta

    def sliced_lora_forward(self, ax: torch.Tensor) -> torch.Tensor:
        """s · B A x from ``ax`` = A dropout(x), shaped like the base output (zeros outside the slices)."""
        parts = []
        row, prev = 0, 0
        for i, (start, stop) in enumerate(self.slices):
            width = stop - start
            if start > prev:
                parts.append(ax.new_zeros(*ax.shape[:-1], start - prev))
            parts.append(ax[..., i * self.r:(i + 1) * self.r] @ self.lora_B[row:row + width].t().to(ax.dtype))
            row += width
            prev = stop
        if prev < self.out_features:
            parts.append(ax.new_zeros(*ax.shape[:-1], self.out_features - prev))
        return torch.cat(parts, dim=-1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        # In x's dtype (the compute dtype): A and B are cast (they are small), x never is, so the
        # branch keeps x once for A's gradient and nothing larger.
        ax = self.lora_dropout(x) @ self.lora_A.t().to(x.dtype)  # (..., r * n_slices)
        if not self.full_width:
            return out + self.sliced_lora_forward(ax.to(out.dtype))
        # h = W0 x + s · (A x) B^T as one addmm: no separate scale and add over the (tokens x out)
        # output, forward or backward (same values, one pass fewer over the largest tensor).
        shape = out.shape
        return torch.addmm(out.reshape(-1, shape[-1]), ax.reshape(-1, ax.shape[-1]).to(out.dtype),
                           self.lora_B.t().to(out.dtype), alpha=self.scaling).view(shape)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s · B A into the base weight so that forward costs one matmul.

        A float base is updated in place (``unmerge`` restores it up to float rounding). An int8
        base cannot hold W0 + s·BA without a second rounding, so it is replaced by an
        ``nn.Linear`` holding dequant(W0) + s·BA in fp32: the merged layer is exact, but it
        takes 4 bytes per weight instead of 1, and ``unmerge`` returns a float base equal to
        dequant(W0), not the int8 storage.
        """
        if self.merged:
            return
        if isinstance(self.base, Int8Linear):
            float_base = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                                   device=self.base.weight.device)
            float_base.weight.data = self.base.dequantized_weight(torch.float32)
            if self.base.bias is not None:
                float_base.bias.data = self.base.bias.data.float().clone()
            float_base.requires_grad_(False)
            self.base = float_base
        w = self.base.weight
        w.data += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (see there for what an int8 base loses)."""
        if not self.merged:
            return
        w = self.base.weight
        w.data -= self.delta_weight().to(w.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        sl = "" if self.full_width else f", slices={self.slices}"
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{sl}"


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable LoRA parameters of ``model`` by name."""
    return {n: p for n, p in model.named_parameters() if is_lora_param(n)}


def set_trainable(model: nn.Module, full: bool = False) -> int:
    """Make ``model``'s trainable set: the LoRA pairs only, or, for ``train.method: full``
    (``full``), every float weight outside the int8 linears (an int8 base never trains). Every
    other parameter gets ``requires_grad=False``.

    Returns:
        The number of trainable elements (tied weights counted once).
    """
    int8 = {id(p) for m in model.modules() if isinstance(m, Int8Linear) for p in m.parameters()}
    count = 0
    for name, p in model.named_parameters():
        trainable = (p.is_floating_point() and id(p) not in int8) if full else is_lora_param(name)
        p.requires_grad_(trainable)
        count += p.numel() if trainable else 0
    return count


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable set as :func:`set_trainable` made it, by name, each parameter once (tied
    weights are one parameter)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass
class LoraTensors:
    """One module's LoRA pair as trained, with what is needed to export it."""
    A: torch.Tensor
    B: torch.Tensor
    r: int
    slices: list[tuple[int, int]]
    out_features: int

    @property
    def full_width(self) -> bool:
        return self.slices == [(0, self.out_features)]


def collect_lora(model: nn.Module) -> dict[str, LoraTensors]:
    """Copy every LoRA pair out of ``model`` as fp32 CPU tensors (the caller gathers them first
    under ZeRO-3)."""
    return {name: lora_pair(mod) for name, mod in model.named_modules() if isinstance(mod, LoRALinear)}


def lora_pair(mod: LoRALinear) -> LoraTensors:
    """One module's LoRA pair as fp32 CPU copies (gathered first under ZeRO-3)."""
    return LoraTensors(mod.lora_A.detach().float().cpu().clone(), mod.lora_B.detach().float().cpu().clone(),
                       mod.r, list(mod.slices), mod.out_features)
