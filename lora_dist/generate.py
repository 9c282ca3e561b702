"""Generation with a base model plus a trained adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dist.adapter import load_adapted
from lora_dist.data import prompt_ids
from lora_dist.sources import render, template_for
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
    record never were)."""
    tokens = manifest.data.special_tokens if manifest.data is not None else None
    return bool((tokens or {}).get("bos", False))


def format_prompt(manifest: Manifest, text: str, raw: bool = False) -> str:
    """Apply the training run's prompt template (E2E: the meaning representation goes in a template)."""
    if raw:
        return text
    source = manifest.data.source if manifest.data is not None else None
    return render(prompt_template(manifest), text.strip() if source == "e2e" else text)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, num_beams: int = 1,
             length_penalty: float = 1.0, no_repeat_ngram_size: int = 0, batch_size: int = 8,
             bos: bool = False, num_return_sequences: int = 1) -> list[str]:
    """Greedy (num_beams=1) or beam-search completions for each prompt.

    ``bos``: put BOS before each prompt, as the adapter was trained (:func:`uses_bos`).
    ``num_return_sequences`` (at most ``num_beams``): that many candidates per prompt, best beam
    score first, the prompts' candidates one after another.

    Prompts go through ``batch_size`` at a time, left-padded with an attention mask: each decoding
    step runs the model once for the whole batch (``batch_size * num_beams`` sequences), so the
    per-step cost of the frozen base (dequantizing each int8 weight) is paid once per batch.
    """
    model.eval()
    outs: list[str] = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
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


def generate_from_artifact(artifact: Path, prompt: str, raw: bool = False, **kwargs) -> str:
    """Base + the artifact's adapter, the prompt put through the artifact's own template."""
    loaded, manifest = load_adapted(artifact)
    return generate(loaded.model, loaded.tokenizer, [format_prompt(manifest, prompt, raw)], bos=uses_bos(manifest),
                    **kwargs)[0]
