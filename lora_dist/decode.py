"""Decoding a batch whose rows differ: each its own prompt, adapter, sampling, stops and length.

The rows are left-padded into one batch (positions counted from each row's first real token, as
``transformers``' ``generate`` counts them), the prompt runs once, and each step then feeds every
unfinished row's new token through the model with the KV cache. Each row picks its next token
with its own settings: greedy at temperature 0 (the same choice as ``lora-dist generate``'s), or
sampled after temperature and top-p from its own generator (``seed``: the same text for the same
request). A row ends at one of its stop tokens, at one of its stop strings (cut before it), or at
its ``max_tokens``; the batch ends when every row has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class Row:
    """One request's decoding: prompt token ids and how to choose and stop."""
    prompt: list[int]
    max_tokens: int
    stop_ids: set[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    tokens: int  # generated, the stop token included
    finish_reason: str  # "stop" (a stop token or string) or "length"


def choose(logits: torch.Tensor, row: Row, generator: torch.Generator | None) -> int:
    """The next token from one row's logits: argmax at temperature 0, else a sample from the
    top-p nucleus of softmax(logits / temperature)."""
    if row.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / row.temperature, dim=-1)
    if row.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < row.top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def decode(model, rows: Sequence[Row], pad_id: int, detokenize: Callable[[list[int]], str]) -> list[Completion]:
    """Decode every row to its end (module docstring); ``detokenize`` turns generated ids into text
    (special tokens skipped), as ``generate`` does."""
    n, longest = len(rows), max(len(r.prompt) for r in rows)
    ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, longest - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        mask[i, longest - len(r.prompt):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(r.seed) if r.seed is not None else None for r in rows]
    out: list[list[int]] = [[] for _ in rows]
    done: list[Completion | None] = [None] * n
    past = None
    step_ids, step_pos = ids, positions
    while True:
        res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=past,
                    use_cache=True, logits_to_keep=1)
        past, logits = res.past_key_values, res.logits[:, -1]
        nxt = torch.full((n, 1), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            if done[i] is not None:
                continue
            token = choose(logits[i], r, generators[i])
            out[i].append(token)
            nxt[i, 0] = token
            done[i] = _finished(r, out[i], token, detokenize)
        if all(d is not None for d in done):
            return [d for d in done if d is not None]
        step_ids, step_pos = nxt, step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long)], dim=1)


def _finished(row: Row, tokens: list[int], last: int, detokenize: Callable[[list[int]], str]) -> Completion | None:
    """The row's completion if ``last`` ended it, else None."""
    if last in row.stop_ids:
        return Completion(detokenize(tokens).strip(), len(tokens), "stop")
    if row.stop:
        text = detokenize(tokens)
        cut = min((text.find(s) for s in row.stop if s in text), default=-1)
        if cut >= 0:
            return Completion(text[:cut].strip(), len(tokens), "stop")
    if len(tokens) >= row.max_tokens:
        return Completion(detokenize(tokens).strip(), len(tokens), "length")
    return None
