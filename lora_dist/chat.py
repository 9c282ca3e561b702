"""Chat conversations (``data.source: chat``): OpenAI's fine-tuning format, rendered with the
model's own chat template, the loss on the assistant turns.

A row (read by :func:`lora_dist.sources.read_chat`) is ``{"messages": [{"role": "system" | "user" | "assistant", "content": str,
"weight": 0 | 1}, ...]}`` (``weight``: assistant turns only, default 1).

The trained positions are found for any template without knowing its syntax::

    text    = render(messages)                            the whole conversation
    before  = render(messages[:i], add_generation_prompt)  ...<|im_start|>assistant\\n
    through = render(messages[:i + 1])                     ...<|im_start|>assistant\\nHello<|im_end|>\\n
    turn i  = through[len(before):].rstrip()               Hello<|im_end|>

and each render must be a prefix of the next (a template that rewrites earlier turns is refused).
The turn's span starts where its content does (a header the generation prompt lacks stays out) and
ends with its end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``); the whitespace after
it is not trained. The text is tokenized once with offsets, and a token trains when its last
character falls in a weight-1 span: system and user turns, role headers and weight-0 turns never do.

A conversation longer than ``data.max_length`` is cut after its last whole assistant turn that
fits (so it still ends on an end-of-turn token), or dropped when not even its first one fits;
never mid-turn. Both are counted (:class:`ChatTokens`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lora_dist.sources import Conversation, DataError

# The user turn of the E2E development set written as conversations (bench/e2e_chat_data.py), and
# of a chat adapter's E2E evaluation: "{input}" is the meaning representation.
E2E_CHAT_PROMPT = "Describe the restaurant in one sentence.\nAttributes: {input}"


# --- the template --------------------------------------------------------------------------------

def chat_template(tokenizer, override: str | None) -> str:
    """The template a chat run renders with: ``data.chat_template`` where set, else the tokenizer's.

    Raises:
        DataError: neither has one.
    """
    template = override or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        raise DataError("data.source: chat renders conversations with the model's chat template, and this "
                        "model's tokenizer has none: set data.chat_template (a Jinja template, e.g. the one of "
                        "the model family's Instruct release)")
    return template


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()


def render(tokenizer, template: str, turns: list[dict[str, str]], generation_prompt: bool = False) -> str:
    """``turns`` rendered as text by ``template`` (Jinja, as transformers renders chat templates).

    Raises:
        DataError: the template raised (e.g. roles that must alternate).
    """
    try:
        return tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja2 TemplateError, or the template's own raise_exception
        raise DataError(f"data.chat_template: rendering failed: {type(e).__name__}: {e}") from None


def spans(tokenizer, template: str, turns: Sequence[tuple[str, str, int]]) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and each assistant turn's character span ``(start, end, weight)``:
    from its content to its end-of-turn token inclusive (see the module's docstring).

    Raises:
        DataError: the template renders a conversation so that it is not a prefix of its
            continuation (then no span can be told apart).
    """
    msgs = [{"role": r, "content": c} for r, c, _ in turns]
    text = render(tokenizer, template, msgs)
    out = []
    for i, (role, content, weight) in enumerate(turns):
        if role != "assistant":
            continue
        before = render(tokenizer, template, msgs[:i], generation_prompt=True)
        through = render(tokenizer, template, msgs[:i + 1])
        if not through.startswith(before) or not text.startswith(through):
            raise DataError("data.chat_template: the template does not render a conversation as a prefix of its "
                            f"continuation (at message {i + 1}), so its assistant turns cannot be located exactly; "
                            "use a template that renders earlier turns unchanged")
        turn = through[len(before):].rstrip()
        at = turn.find(content.strip()) if content.strip() else -1
        out.append((len(before) + max(at, 0), len(before) + len(turn), weight))
    return text, out


def encode(tokenizer, template: str, turns) -> tuple[list[int], list[int], list[int]]:
    """(token ids, train mask, the token index after each assistant turn) of a conversation."""
    text, turn_spans = spans(tokenizer, template, turns)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    ends = []
    k = 0
    for start, end, weight in turn_spans:
        while k < len(ids) and offsets[k][1] <= start:
            k += 1
        while k < len(ids) and offsets[k][1] <= end:
            mask[k] = weight
            k += 1
        ends.append(k)
    return ids, mask, ends


def end_of_turn(tokenizer, template: str) -> int:
    """The token that ends an assistant turn under ``template`` (what generation stops at).

    Raises:
        DataError: the template ends the turn with something else than one special token (the
            trained model could not stop), or breaks the prefix rule (:func:`spans`).
    """
    ids, mask, _ = encode(tokenizer, template, [("user", "Hi.", 1), ("assistant", "Hello.", 1)])
    trained = [x for x, m in zip(ids, mask) if m]
    if not trained or trained[-1] not in set(tokenizer.all_special_ids):
        text = tokenizer.decode(trained[-1:]) if trained else ""
        raise DataError(f"data.chat_template: an assistant turn ends with {text!r}, not with a special token of "
                        "the tokenizer, so the trained model could not stop: end assistant turns with eos_token "
                        "or another special token")
    return trained[-1]


def check_chat(spec, model_dir: Path) -> str:
    """The template a chat job on ``model_dir``'s tokenizer renders with, checked before anything
    runs (validate.py): it exists, locates its assistant turns and ends them on a special token.

    Raises:
        DataError: ``data.chat_template`` on another source, no template, or one that cannot train.
    """
    from transformers import AutoTokenizer

    if spec.source != "chat":
        raise DataError(f"data.chat_template: only data.source chat renders with a chat template (this job's "
                        f"source is {spec.source})")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    template = chat_template(tokenizer, spec.chat_template)
    end_of_turn(tokenizer, template)
    return template


# --- tokenized conversations ---------------------------------------------------------------------

@dataclass
class ChatTokens:
    """Tokenized conversations: ``items`` (ids, train mask) and what did not fit ``max_length``."""
    items: list[tuple[list[int], list[int]]] = field(default_factory=list)
    over_length: int = 0  # conversations longer than max_length tokens
    cut: int = 0  # of those, cut after their last whole assistant turn that fits
    dropped: int = 0  # of those, dropped: not even their first assistant turn fits
    longest: int = 0  # tokens of the longest conversation, before any cut

    def counts(self) -> dict[str, int]:
        return {"over_length": self.over_length, "cut": self.cut, "dropped": self.dropped, "longest": self.longest}


def tokenize_chat(conversations: Sequence[Conversation], tokenizer, template: str, max_length: int) -> ChatTokens:
    """Every conversation's ids and train mask, none longer than ``max_length`` (see the module's
    docstring for what is cut)."""
    out = ChatTokens()
    for conv in conversations:
        ids, mask, ends = encode(tokenizer, template, conv.messages)
        out.longest = max(out.longest, len(ids))
        if len(ids) > max_length:
            out.over_length += 1
            fits = [e for e in ends if e <= max_length and any(mask[:e])]
            if not fits:
                out.dropped += 1
                continue
            out.cut += 1
            ids, mask = ids[:fits[-1]], mask[:fits[-1]]
        out.items.append((ids, mask))
    return out


def tokenize_chat_splits(train: Sequence[Conversation], val: Sequence[Conversation], tokenizer, spec,
                         say) -> tuple[list, list, dict[str, int]]:
    """Both splits' (ids, train mask) pairs under the run's template, and what did not fit
    ``spec.max_length`` in both together (reported through ``say`` when any did).

    Raises:
        DataError: no template, one whose turns cannot be located or cannot stop, or a split
            left with no conversation that fits.
    """
    template = chat_template(tokenizer, spec.chat_template)
    end_of_turn(tokenizer, template)
    sides = [tokenize_chat(ex, tokenizer, template, spec.max_length) for ex in (train, val)]
    counts = {k: sum(s.counts()[k] for s in sides) for k in ("over_length", "cut", "dropped")}
    counts["longest"] = max(s.longest for s in sides)
    if counts["over_length"]:
        say(f"data: {counts['over_length']} conversations over data.max_length {spec.max_length} tokens (longest "
            f"{counts['longest']}): {counts['cut']} cut after their last whole assistant turn that fits, "
            f"{counts['dropped']} dropped (not even their first assistant turn fits)")
    for side, name in zip(sides, ("training", "validation")):
        if not side.items:
            raise DataError(f"data.max_length: {spec.max_length} tokens hold no {name} conversation's first "
                            f"assistant turn")
    return sides[0].items, sides[1].items, counts
