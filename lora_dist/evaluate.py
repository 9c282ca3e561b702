"""Comparing models on the same batches (int8 against float, ours against PEFT)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lora_dist.data import E2E_TEMPLATE, read_e2e
from lora_dist.generate import generate
from lora_dist.metrics import e2e_metrics


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


def e2e_references(csv_path, limit: int | None = None,
                   template: str = E2E_TEMPLATE) -> tuple[list[str], list[list[str]]]:
    """Distinct meaning representations (as prompts through ``template``) in order of first
    appearance, with all their references."""
    order: list[str] = []
    refs: dict[str, list[str]] = {}
    for ex in read_e2e(csv_path, template):
        if ex.prompt not in refs:
            order.append(ex.prompt)
            refs[ex.prompt] = []
        refs[ex.prompt].append(ex.completion.strip())
    order = order[:limit] if limit else order
    return order, [refs[p] for p in order]


def evaluate_e2e(model: nn.Module, tokenizer, csv_path, template: str = E2E_TEMPLATE, limit: int | None = None,
                 num_beams: int = 10,
                 length_penalty: float = 0.9, no_repeat_ngram_size: int = 4, max_new_tokens: int = 64,
                 progress=None, batch_size: int = 8, bos: bool = False) -> tuple[list[str], dict[str, float | None]]:
    """Generate one output per distinct MR (the paper's decoding by default) and score it.

    ``template`` is the prompt template the adapter was trained with (``generate.prompt_template``
    of its manifest), and ``bos`` whether it was trained with BOS before each prompt
    (``generate.uses_bos``).

    Returns:
        (predictions in MR order, metrics).
    """
    prompts, refs = e2e_references(csv_path, limit, template)
    preds: list[str] = []
    for i in range(0, len(prompts), batch_size):
        preds += generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                          num_beams=num_beams, length_penalty=length_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size, batch_size=batch_size, bos=bos)
        if progress:
            progress(len(preds), len(prompts))
    preds = [p.splitlines()[0].strip() if p.strip() else "" for p in preds]
    return preds, e2e_metrics(preds, refs)
