"""Generation with a base model plus a trained adapter."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_dist.data import e2e_prompt


def format_prompt(manifest: dict, text: str, raw: bool = False) -> str:
    """Apply the training run's prompt template (E2E: the meaning representation goes in a template)."""
    if raw or manifest.get("data", {}).get("source") != "e2e":
        return text
    return e2e_prompt(text)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, num_beams: int = 1,
             length_penalty: float = 1.0, no_repeat_ngram_size: int = 0) -> list[str]:
    """Greedy (num_beams=1) or beam-search completions for each prompt, one at a time."""
    model.eval()
    outs = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for p in prompts:
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=num_beams, length_penalty=length_penalty,
                             no_repeat_ngram_size=no_repeat_ngram_size or None, early_stopping=num_beams > 1,
                             eos_token_id=eos, pad_token_id=pad)
        outs.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return outs


def generate_from_artifact(artifact: Path, prompt: str, raw: bool = False, **kwargs) -> str:
    from lora_dist.adapter import load_adapted

    loaded, manifest = load_adapted(artifact)
    return generate(loaded.model, loaded.tokenizer, [format_prompt(manifest, prompt, raw)], **kwargs)[0]
