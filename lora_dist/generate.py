"""Generation with a base model plus a trained adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dist.adapter import load_adapted
from lora_dist.chat import E2E_CHAT_PROMPT, end_of_turn, render as render_chat
from lora_dist.data import prompt_ids
from lora_dist.sources import DataError, render, template_for
from lora_dist.records import Manifest


def prompt_template(manifest: Manifest) -> str:
    """The prompt template the artifact was trained with, as its manifest records it (artifacts
    from before the record trained with the template their data source had then, which is
    :func:`template_for`'s)."""
    data = manifest.data
    if data is None:
        return template_for("e2e")
    return data.prompt_template or template_for(data.source)


def uses_bos(manifest: Manifest) -> bool:
    """Whether the artifact was trained with BOS before each prompt (artifacts from before the
    record never were; a chat artifact's template writes its own)."""
    if chat_template_of(manifest) is not None:
        return False
    tokens = manifest.data.special_tokens if manifest.data is not None else None
    return bool((tokens or {}).get("bos", False))


def format_prompt(manifest: Manifest, text: str, raw: bool = False) -> str:
    """Apply the training run's prompt template (E2E: the meaning representation goes in a template)."""
    if raw:
        return text
    source = manifest.data.source if manifest.data is not None else None
    return render(prompt_template(manifest), text.strip() if source == "e2e" else text)


def chat_template_of(manifest: Manifest) -> str | None:
    """The chat template a chat artifact was trained with (None for other sources)."""
    return manifest.data.chat_template if manifest.data is not None else None


def chat_prompt(manifest: Manifest, tokenizer, message: str, system: str | None = None) -> str:
    """A user ``message`` (after ``system``) rendered by the artifact's chat template, up to the
    assistant's turn (the generation prompt).

    Raises:
        DataError: the artifact was not trained on chat data.
    """
    template = chat_template_of(manifest)
    if template is None:
        source = manifest.data.source if manifest.data is not None else "e2e"
        raise DataError(f"--chat: this artifact was trained on data.source {source}, not chat, so it has no chat "
                        f"template: prompt it with --prompt")
    turns = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": message}]
    return render_chat(tokenizer, template, turns, generation_prompt=True)


def e2e_template(manifest: Manifest, tokenizer) -> str:
    """The template an E2E meaning representation is prompted through (``{input}`` for the MR): a
    chat artifact's is the E2E user turn (chat.E2E_CHAT_PROMPT) rendered by its chat template."""
    if chat_template_of(manifest) is None:
        return prompt_template(manifest)
    return chat_prompt(manifest, tokenizer, E2E_CHAT_PROMPT)


def stop_ids(manifest: Manifest, tokenizer) -> list[int] | None:
    """The tokens generation stops at beside EOS: a chat artifact's end-of-turn token."""
    template = chat_template_of(manifest)
    if template is None:
        return None
    return sorted({end_of_turn(tokenizer, template)} | ({tokenizer.eos_token_id} - {None}))


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, num_beams: int = 1,
             length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, batch_size: int = 8,
             bos: bool = False, num_return_sequences: int = 1, stop: list[int] | None = None) -> list[str]:
    """Greedy (num_beams=1) or beam-search completions for each prompt.

    ``bos``: put BOS before each prompt, as the adapter was trained (:func:`uses_bos`).
    ``num_return_sequences`` (at most ``num_beams``): that many candidates per prompt, best beam
    score first, the prompts' candidates one after another. ``stop``: the token ids that end a
    completion (default EOS; a chat artifact's: :func:`stop_ids`).

    Prompts go through ``batch_size`` at a time, left-padded with an attention mask: each decoding
    step runs the model once for the whole batch (``batch_size * num_beams`` sequences), so the
    per-step cost of the frozen base (dequantizing each int8 weight) is paid once per batch.
    """
    model.eval()
    outs: list[str] = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    eos = stop or eos
    for i in range(0, len(prompts), max(1, batch_size)):
        enc = encode_prompts(tokenizer, prompts[i:i + max(1, batch_size)], bos)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
                             no_repeat_ngram_size=no_repeat_ngram_size or None, early_stopping=num_beams > 1,
                             num_return_sequences=num_return_sequences, eos_token_id=eos, pad_token_id=pad)
        outs += [tokenizer.decode(g[ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]
    return outs


def encode_prompts(tokenizer, prompts: list[str], bos: bool) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask for a batch of prompts, left-padded (generation appends on the
    right), each led by BOS when ``bos``, as the adapter was trained (data.tokenize)."""
    side, pad_token = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return tokenizer.pad({"input_ids": [prompt_ids(tokenizer, p, bos) for p in prompts]}, return_tensors="pt",
                             padding=True)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad_token


def generate_from_artifact(artifact: Path, prompt: str, raw: bool = False, chat: bool = False,
                           system: str | None = None, **kwargs) -> str:
    """Base + the artifact's adapter, the prompt put through the artifact's own template (``chat``:
    ``prompt`` is a user message, after ``system``, rendered by the artifact's chat template)."""
    if system is not None and not chat:
        raise DataError("--system: a system message goes with --chat")
    loaded, manifest = load_adapted(artifact)
    tok = loaded.tokenizer
    text = chat_prompt(manifest, tok, prompt, system) if chat else format_prompt(manifest, prompt, raw)
    return generate(loaded.model, tok, [text], bos=uses_bos(manifest), stop=stop_ids(manifest, tok), **kwargs)[0]
