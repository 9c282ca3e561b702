"""``lora-dist eval ARTIFACT --data FILE`` where FILE is not an E2E csv: the mean cross-entropy per
trained token and its perplexity on every example of FILE, for the base alone and with the adapter.
An E2E csv (columns ``mr`` and ``ref``) keeps eval's generation and E2E metrics, whatever source
the adapter was trained on (:func:`is_e2e_csv`).

FILE is read and tokenized as training read and tokenized the artifact's data (its manifest's
``data`` section, with FILE as ``data.path``: the same source, template, columns and
``max_length``), every example counted (no train/validation split). The loss covers the tokens
training trains (completions, assistant turns, or every token of ``text``). The base alone is the
same loaded model with every LoRA branch scaled to zero: exactly the frozen base as trained (int8
or float), without loading it twice.
"""

from __future__ import annotations

import csv
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lora_dist.adapter import load_adapted
from lora_dist.chat import tokenize_chat
from lora_dist.data import TokenArrays, collate, tokenize
from lora_dist.errors import ArtifactError
from lora_dist.lora import LoRALinear
from lora_dist.records import Manifest
from lora_dist.generate import chat_template_of
from lora_dist.sources import DataError, Example, data_location, read_examples
from lora_dist.spec import DataSpec
from lora_dist.store import read_manifest
from lora_dist.train import evaluate


def is_e2e_csv(path: Path) -> bool:
    """Whether ``path`` is an E2E csv (a header with ``mr`` and ``ref``): eval generates and scores it."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return {"mr", "ref"} <= {h.strip() for h in header}


def data_spec(manifest: Manifest, data: Path) -> DataSpec:
    """The artifact's data section with ``data`` as its file."""
    recorded = dict((manifest.spec or {}).get("data") or {})
    try:
        return DataSpec.model_validate({**recorded, "path": str(data)})
    except ValueError as e:
        raise DataError(f"--data {data}: {e}") from None


def file_examples(spec: DataSpec) -> list[Example]:
    """Every example of ``spec.path``, read as training reads it (any format, the source's columns)."""
    return read_examples(data_location(spec), spec)


def file_tokens(spec: DataSpec, manifest: Manifest, examples: list[Example], tokenizer):
    """The examples tokenized as training tokenized them: a chat artifact's conversations through
    the chat template its manifest records (cut at a turn, or left out, where over max_length)."""
    if spec.source != "chat":
        return tokenize(examples, tokenizer, spec.max_length)
    items = tokenize_chat(examples, tokenizer, chat_template_of(manifest), spec.max_length).items
    if not items:
        raise DataError(f"--data {spec.path}: no conversation's first assistant turn fits data.max_length "
                        f"{spec.max_length}")
    return TokenArrays.masked(items)


@contextmanager
def adapter_off(model: nn.Module) -> Iterator[None]:
    """The base alone: every LoRA branch scaled by 0 for the block (h = W0 x exactly)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in mods]
    for m in mods:
        m.scaling = 0.0
    try:
        yield
    finally:
        for m, s in zip(mods, saved):
            m.scaling = s


def mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Loss per trained token over ``batches`` (train.evaluate) and its perplexity."""
    loss = evaluate(model, batches)
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf}


def evaluate_file(artifact: Path, data: Path, batch_size: int = 8) -> dict[str, Any]:
    """Loss per token and perplexity on ``data`` for the base alone and with the artifact.

    Raises:
        DataError: ``data`` does not read as the artifact's source, or has nothing to score.
        ArtifactError: the artifact does not verify, or is a full fine-tune (no base to compare).
    """
    manifest = read_manifest(artifact)  # what is refused is refused before the model is loaded
    if manifest.kind == "full":
        raise ArtifactError(f"{artifact}: a full fine-tune has no adapter to turn off; --data scores adapters")
    spec = data_spec(manifest, data)
    examples = file_examples(spec)
    loaded, manifest = load_adapted(artifact)  # verifies every file
    items = file_tokens(spec, manifest, examples, loaded.tokenizer)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else \
        loaded.tokenizer.eos_token_id
    batches = [collate(items[i:i + batch_size], pad) for i in range(0, len(items), batch_size)]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    with adapter_off(loaded.model):
        base = mean_loss(loaded.model, batches)
    adapted = mean_loss(loaded.model, batches)
    return {"data": str(data), "source": spec.source, "examples": len(items), "tokens": tokens,
            "max_length": spec.max_length, "base": base, "adapter": adapted}


def table(result: dict[str, Any]) -> str:
    """The two rows as a small table."""
    lines = [f"{result['data']}: {result['examples']} examples ({result['source']}), {result['tokens']} scored tokens",
             f"{'model':<10}{'loss/token':>12}{'perplexity':>12}"]
    for row in ("base", "adapter"):
        lines.append(f"{row:<10}{result[row]['loss']:>12.4f}{result[row]['perplexity']:>12.2f}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], out: str | None) -> str:
    """The JSON line (also written to ``out`` when given)."""
    text = json.dumps(result)
    if out:
        Path(out).write_text(text + "\n")
    return text
