"""Comparing models on the same batches (int8 against float, ours against PEFT), and E2E
evaluation: one output per meaning representation, the five E2E metrics and the slot error rate."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from lora_dist.byattrs import TEST_SET_MEAN, attribute_report
from lora_dist.sources import E2E_TEMPLATE, DataError, read_e2e
from lora_dist.generate import generate
from lora_dist.metrics import e2e_metrics
from lora_dist.slots import SlotErrors, parse_mr, slot_errors, totals


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


def e2e_items(csv_path, limit: int | None = None,
              template: str = E2E_TEMPLATE) -> tuple[list[str], list[str], list[list[str]]]:
    """Distinct meaning representations in order of first appearance: (the MRs, their prompts
    through ``template``, all their references)."""
    order: list[str] = []
    mrs: dict[str, str] = {}
    refs: dict[str, list[str]] = {}
    for ex in read_e2e(csv_path, template):
        if ex.prompt not in refs:
            order.append(ex.prompt)
            refs[ex.prompt] = []
            mrs[ex.prompt] = ex.mr
        refs[ex.prompt].append(ex.completion.strip())
    order = order[:limit] if limit else order
    return [mrs[p] for p in order], order, [refs[p] for p in order]


def e2e_references(csv_path, limit: int | None = None,
                   template: str = E2E_TEMPLATE) -> tuple[list[str], list[list[str]]]:
    """Distinct meaning representations (as prompts through ``template``) in order of first
    appearance, with all their references."""
    _, prompts, refs = e2e_items(csv_path, limit, template)
    return prompts, refs


RERANKS = ("none", "ser")

Scored = tuple[list[str], dict[str, float | None], list[dict]]  # predictions, metrics, per-output slot errors


def evaluate_e2e(model, tokenizer, csv_path, template: str = E2E_TEMPLATE, limit: int | None = None,
                 num_beams: int = 10,
                 length_penalty: float = 0.9, no_repeat_ngram_size: int = 4, max_new_tokens: int = 64,
                 progress=None, batch_size: int = 8, bos: bool = False, rerank: str = "none",
                 stop: list[int] | None = None, reweight_mean: float = TEST_SET_MEAN) -> Scored:
    """Generate one output per distinct MR (the paper's decoding by default) and score it: the five
    E2E metrics, and the slot error rate (``slots.py``; ``SER`` in percent, with the counts).

    ``template`` is the prompt template the adapter was trained with (``generate.prompt_template``
    of its manifest), and ``bos`` whether it was trained with BOS before each prompt
    (``generate.uses_bos``); a chat adapter's ``template`` is its chat template's
    (``generate.e2e_template``) and ``stop`` its end-of-turn (``generate.stop_ids``). ``rerank="ser"`` keeps every candidate of the beam and outputs the
    one with the fewest slot errors, ties going to the higher beam score. The metrics also hold
    ``by_attributes`` and ``reweighted`` (to ``reweight_mean`` attributes per MR; ``byattrs.py``).

    Returns:
        (predictions in MR order, metrics, each prediction's slot errors with its MR).
    """
    return evaluate_e2e_reranks(model, tokenizer, csv_path, (rerank,), template, limit, num_beams, length_penalty,
                                no_repeat_ngram_size, max_new_tokens, progress, batch_size, bos, stop,
                                reweight_mean)[rerank]


def evaluate_e2e_reranks(model, tokenizer, csv_path, reranks: Sequence[str] = RERANKS,
                         template: str = E2E_TEMPLATE, limit: int | None = None, num_beams: int = 10,
                         length_penalty: float = 0.9, no_repeat_ngram_size: int = 4, max_new_tokens: int = 64,
                         progress=None, batch_size: int = 8, bos: bool = False,
                         stop: list[int] | None = None, reweight_mean: float = TEST_SET_MEAN) -> dict[str, Scored]:
    """:func:`evaluate_e2e` under each of ``reranks`` from one beam search: the beam's candidates
    come sorted by score, so its top one is the output without a rerank."""
    bad = [r for r in reranks if r not in RERANKS]
    if bad or not reranks:
        raise ValueError(f"rerank: must be one of {', '.join(RERANKS)}, got {bad or list(reranks)}")
    mrs, prompts, refs = e2e_items(csv_path, limit, template)
    parsed = []
    for n, mr in enumerate(mrs, 1):  # before any generation: every MR must be scorable for slots
        try:
            parsed.append(parse_mr(mr))
        except ValueError as e:
            raise DataError(f"{csv_path}: distinct MR {n}: {e}") from None
    candidates = num_beams if "ser" in reranks else 1
    # each candidate's text and slot errors, scored once: the rerank chooses by them and the totals add them
    chosen: dict[str, list[tuple[str, SlotErrors]]] = {r: [] for r in reranks}
    for i in range(0, len(prompts), batch_size):
        outs = generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=max_new_tokens,
                        num_beams=num_beams, length_penalty=length_penalty,
                        no_repeat_ngram_size=no_repeat_ngram_size, batch_size=batch_size, bos=bos,
                        num_return_sequences=candidates, stop=stop)
        for j, group in enumerate(outs[k:k + candidates] for k in range(0, len(outs), candidates)):
            attrs = parsed[i + j]
            scored = [(text, slot_errors(attrs, text)) for text in map(_first_line, group)]
            for r in reranks:  # min keeps the first of equals: ties go to the better beam score
                chosen[r].append(min(scored, key=lambda c: c[1].errors) if r == "ser" else scored[0])
        if progress:
            progress(i + len(outs) // candidates, len(prompts))
    out: dict[str, Scored] = {}
    for r, picks in chosen.items():
        preds = [text for text, _ in picks]
        per_output = [{"mr": mr, "prediction": text, **e.to_dict()} for mr, (text, e) in zip(mrs, picks)]
        ser = totals([e for _, e in picks])
        metrics: dict = {**e2e_metrics(preds, refs), "SER": ser["ser"],
                         **{k: ser[k] for k in ("slots", "missing", "wrong", "added")},
                         **attribute_report(preds, refs, per_output, reweight_mean)}
        out[r] = (preds, metrics, per_output)
    return out


def _first_line(text: str) -> str:
    return text.splitlines()[0].strip() if text.strip() else ""
