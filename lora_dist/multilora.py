"""Many adapters over one frozen base, in one forward pass (heterogeneous batching).

Every linear layer in the decoder blocks is wrapped once by :class:`MultiLoRA`. Before a batch
runs, :func:`assign` gives each row its adapter (or none, for the base): each layer stacks the
rows' A and B (rank padded with zeros to the largest in the batch), and its forward adds

    h[i] = W0 x[i] + B_i A_i x[i]        for every row i, in two batched matmuls (bmm)

so the base's matmul (and an int8 base's dequantization) runs once for the whole batch whatever
the adapters are, as Punica's and S-LoRA's kernels do; K adapters cost about what one does. An
adapter is a few megabytes of A and B; the base is held once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lora_dist.adapter import lora_deltas
from lora_dist.errors import ArtifactError
from lora_dist.model import _is_linear, _linear_dims, decoder_blocks
from lora_dist.quant import Int8Linear
from lora_dist.records import Manifest


@dataclass
class AdapterWeights:
    """One adapter's pairs by module path: A (r', in) and B^T scaled (r', out), in the compute dtype."""
    A: dict[str, torch.Tensor]
    Bt: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.A, self.Bt) for t in d.values())


def read_adapter(artifact: Path, manifest: Manifest, modules: dict[str, "MultiLoRA"],
                 dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """A verified artifact's pairs, checked against the served model's layers.

    Raises:
        ArtifactError: a pair names a layer the base does not have, or its shapes do not fit it.
    """
    a, bt = {}, {}
    for name, d in lora_deltas(artifact, manifest).items():
        mod = modules.get(name)
        if mod is None:
            raise ArtifactError(f"{artifact}: adapts {name}, which the served base has no linear layer for")
        if d.A.shape[1] != mod.in_features or d.B.shape[0] != mod.out_features:
            raise ArtifactError(f"{artifact}: {name} has A {tuple(d.A.shape)}, B {tuple(d.B.shape)}; the served "
                                f"layer is {mod.out_features} x {mod.in_features}")
        a[name] = d.A.to(dtype).contiguous()
        bt[name] = (d.B * d.scale).t().to(dtype).contiguous()
    return AdapterWeights(a, bt)


class MultiLoRA(nn.Module):
    """A frozen base layer (int8 or float) plus each batch row's own LoRA term (module docstring)."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.rows: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch, r, in), (batch, r, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.rows is None:
            return out
        a, bt = self.rows
        if x.dim() != 3 or x.shape[0] != a.shape[0]:
            raise RuntimeError(f"MultiLoRA: input {tuple(x.shape)} does not match the {a.shape[0]} rows assigned")
        return torch.baddbmm(out, torch.bmm(x, a.transpose(1, 2).to(x.dtype)), bt.to(out.dtype))


def wrap_linears(model: nn.Module) -> dict[str, MultiLoRA]:
    """Wrap every linear layer of the decoder blocks (the layers an adapter may target) in place.

    Returns:
        The wrappers by module path, as adapters name them.
    """
    blocks_name, _ = decoder_blocks(model)
    found = {}
    for name, mod in list(model.named_modules()):
        if not name.startswith(blocks_name + "."):
            continue
        if isinstance(mod, Int8Linear):
            found[name] = mod, mod.in_features, mod.out_features
        elif _is_linear(mod):
            found[name] = (mod, *_linear_dims(mod)[:2])
    wrapped = {}
    for name, (mod, in_f, out_f) in found.items():
        wrapped[name] = MultiLoRA(mod, in_f, out_f)
        model.set_submodule(name, wrapped[name])
    return wrapped


def assign(modules: dict[str, MultiLoRA], rows: Sequence[AdapterWeights | None]) -> None:
    """Give batch row i the adapter ``rows[i]`` (None: the base alone) in every wrapped layer;
    ``rows=[]`` clears the assignment. A layer no row adapts adds nothing."""
    for name, mod in modules.items():
        used = [w for w in rows if w is not None and name in w.A]
        if not used:
            mod.rows = None
            continue
        r = max(w.A[name].shape[0] for w in used)
        dtype = used[0].A[name].dtype
        a = torch.zeros(len(rows), r, mod.in_features, dtype=dtype)
        bt = torch.zeros(len(rows), r, mod.out_features, dtype=dtype)
        for i, w in enumerate(rows):
            if w is not None and name in w.A:
                k = w.A[name].shape[0]
                a[i, :k], bt[i, :k] = w.A[name], w.Bt[name]
        mod.rows = (a, bt)
