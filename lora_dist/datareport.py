"""``lora-dist data JOB.yaml``: the job's data read and tokenized exactly as the job will (the same
reading, split and tokenization cache, :func:`lora_dist.data.tokenized`), and what it holds:
examples, tokens, examples over ``data.max_length``, the share of positions that train, and a
few examples rendered with their trained spans marked.

A bad file fails here as it would in the job: a DataError naming the file, the row and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lora_dist.data import IGNORE_INDEX, TokenArrays, Tokenized, Tokens, tokenized
from lora_dist.sources import spread
from lora_dist.spec import JobSpec
from lora_dist.store import cache_root

TRAINED = ("«", "»")  # around the tokens that carry a loss in a rendered example


@dataclass(frozen=True)
class SplitCounts:
    examples: int
    prompts: int
    tokens: int  # positions, prompt and completion
    trained: int  # positions whose label is not ignored


def count(items: TokenArrays, prompts: int) -> SplitCounts:
    """Examples, tokens and trained positions of a split, from its arrays (no pass in Python)."""
    import numpy as np

    return SplitCounts(len(items), prompts, int(items.offsets[-1]), int(np.count_nonzero(items.mask)))


def render_trained(item: Tokenized, decode: Callable[[list[int]], str]) -> str:
    """The example's text, each run of trained tokens between :data:`TRAINED` marks."""
    out, run, trained = [], [], None
    for tok, label in zip(item.input_ids, item.labels):
        if (label != IGNORE_INDEX) != trained and run:
            out.append(TRAINED[0] + decode(run) + TRAINED[1] if trained else decode(run))
            run = []
        trained = label != IGNORE_INDEX
        run.append(tok)
    if run:
        out.append(TRAINED[0] + decode(run) + TRAINED[1] if trained else decode(run))
    return "".join(out)


def report(spec: JobSpec, tokens: Tokens, decode: Callable[[list[int]], str], show: int) -> str:
    """The report's text for tokenized data (see the module)."""
    d = spec.data
    train, val = count(tokens.train, tokens.n_train_prompts), count(tokens.val, tokens.n_val_prompts)
    unit = "texts" if d.source == "text" else "prompts"
    where = d.path if d.path is not None else "the official E2E release"
    lines = [
        f"data: {where} (source {d.source})" + (f", validation {d.val_path}" if d.val_path else "")
        + f"; tokenization cache {tokens.cache or 'not written'}",
        f"examples: {train.examples:,} train ({train.prompts:,} {unit}) / {val.examples:,} validation "
        f"({val.prompts:,} {unit})",
        f"tokens: {train.tokens:,} train / {val.tokens:,} validation (each example cut to data.max_length "
        f"{d.max_length})",
        f"over data.max_length: {tokens.over_length:,} examples ({over_what(tokens, d.max_length)}); the longest "
        f"{tokens.longest:,} tokens",
        f"positions that train: {train.trained / max(train.tokens, 1):.1%} of the training split's tokens "
        f"({train.trained:,}); trained spans are marked {TRAINED[0]}...{TRAINED[1]} below",
    ]
    for i, item in enumerate(spread(tokens.train, show)):
        lines += [f"--- train example {i + 1} of {show} ({len(item.input_ids)} tokens) ---",
                  render_trained(item, decode)]
    return "\n".join(lines)


def data_report(spec: JobSpec, show: int = 2, say: Callable[[str], None] | None = None) -> str:
    """Read, split and tokenize ``spec``'s data as its job will, and report on it.

    Args:
        spec: the job spec (its model gives the tokenizer).
        show: how many training examples to render, spread over the split.
        say: where progress lines go (tokenizing, caching).

    Raises:
        DataError: the data is not what data.source reads (naming the file, the row and the problem).
        ModelError: model.base cannot be resolved.
    """
    from transformers import AutoTokenizer

    from lora_dist.base import tokenizer_source
    from lora_dist.hub import hub_ref

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(hub_ref(spec.model)))
    tokens = tokenized(spec.data, tokenizer, cache_root(), say=say)
    return report(spec, tokens, lambda ids: tokenizer.decode(ids, skip_special_tokens=False), show)


def over_what(tokens: Tokens, max_length: int) -> str:
    """What became of the examples over ``max_length``: cut to it, or (chat) cut at a turn or dropped."""
    chat = tokens.chat_over_length
    if chat is None:
        return f"cut to {max_length} tokens"
    return f"{chat['cut']:,} cut after their last whole assistant turn that fits, {chat['dropped']:,} dropped"
