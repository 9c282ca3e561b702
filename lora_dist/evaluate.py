"""Comparing models on the same batches (int8 against float, ours against PEFT)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


@torch.no_grad()
def logit_agreement(a: nn.Module, b: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean and max |logit difference| and top-1 agreement over the attended positions of ``batches``."""
    a.eval()
    b.eval()
    total_abs, count, agree, worst = 0.0, 0, 0, 0.0
    for batch in batches:
        la = a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        lb = b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        mask = batch["attention_mask"].bool()
        diff = (la - lb).abs()[mask]
        total_abs += float(diff.sum())
        count += diff.numel()
        worst = max(worst, float(diff.max()))
        agree += int((la.argmax(-1) == lb.argmax(-1))[mask].sum())
    positions = int(sum(int(b["attention_mask"].sum()) for b in batches))
    return {"mean_abs_logit_diff": total_abs / max(count, 1), "max_abs_logit_diff": worst,
            "top1_agreement": agree / max(positions, 1), "positions": positions}
