"""Datasets to tokenized batches: the E2E NLG csv (``mr``, ``ref``) and prompt/completion JSONL.

Every example is a (prompt, completion) pair; the loss covers completion tokens only (prompt
positions get label -100). Train/validation are split by prompt (for E2E: by meaning
representation), never by row, so no MR is on both sides. Batches are a pure function of
(step, seed): batch i of a run is the same on every try, which makes resuming exact.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import random
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_dist.spec import DataSpec

E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_TRAIN_MEMBER = "e2e-dataset/trainset.csv"
# Prompt templates: "{input}" is replaced by the meaning representation (E2E) or the prompt
# (JSONL). The artifact's manifest records the template it was trained with, and generation and
# evaluation use that record, so changing a template here never re-prompts an old adapter.
E2E_TEMPLATE = "Describe the restaurant in one sentence.\nAttributes: {input}\nDescription:"
PLAIN_TEMPLATE = "{input}"
IGNORE_INDEX = -100


class DataError(ValueError):
    """The data file is missing, unreadable or not in the expected form."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def template_for(source: str) -> str:
    """The prompt template a run on ``data.source`` trains with."""
    return E2E_TEMPLATE if source == "e2e" else PLAIN_TEMPLATE


def render(template: str, text: str) -> str:
    """``template`` with ``{input}`` replaced by ``text`` (no other braces are interpreted)."""
    return template.replace("{input}", text)


def e2e_prompt(mr: str, template: str = E2E_TEMPLATE) -> str:
    return render(template, mr.strip())


def read_e2e(path: Path, template: str = E2E_TEMPLATE) -> list[Example]:
    """Read an E2E csv with columns ``mr`` and ``ref`` (one row per reference), each MR prompted
    through ``template``."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"mr", "ref"} <= set(reader.fieldnames):
                raise DataError(f"data.path: {path} must be a csv with columns 'mr' and 'ref', "
                                f"found {reader.fieldnames}")
            rows = [(r["mr"], r["ref"]) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"data.path: cannot read {path}: {e}") from None
    out = [Example(e2e_prompt(mr, template), " " + ref.strip()) for mr, ref in rows if mr and ref and ref.strip()]
    if not out:
        raise DataError(f"data.path: {path} has no rows with both 'mr' and 'ref'")
    return out


def read_jsonl(path: Path) -> list[Example]:
    """Read ``{"prompt": str, "completion": str}`` lines."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"data.path: {path} line {n}: not JSON ({e.msg})") from None
                if (not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str)
                        or not isinstance(obj.get("completion"), str) or not obj["completion"]):
                    raise DataError(f"data.path: {path} line {n}: expected an object with string fields "
                                    f"'prompt' and 'completion' (non-empty)")
                out.append(Example(obj["prompt"], obj["completion"]))
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data.path: cannot read {path}: {e}") from None
    if not out:
        raise DataError(f"data.path: {path} has no examples")
    return out


def fetch_e2e(cache_dir: Path, url: str | None = None, timeout: float = 60.0) -> Path:
    """Download the official E2E release once and return the cached trainset.csv."""
    url = url or os.environ.get("LORA_DIST_E2E_URL", E2E_URL)
    target = cache_dir / "e2e" / "trainset.csv"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read()
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            data = z.read(E2E_TRAIN_MEMBER)
    except (urllib.error.URLError, OSError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"data.path is not set, so the E2E training set is downloaded from {url}, and that "
                        f"failed ({e}). Offline? Point data.path at a local copy of the E2E csv, e.g. "
                        f"--set data.path=jobs/data/e2e/devset.csv") from None
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def load_examples(spec: DataSpec, cache_dir: Path) -> list[Example]:
    if spec.path is None:
        path = fetch_e2e(cache_dir)
    else:
        path = Path(spec.path).expanduser()
        if not path.is_file():
            raise DataError(f"data.path: file not found: {path.resolve()}")
    return read_e2e(path) if spec.source == "e2e" else read_jsonl(path)


def split_by_prompt(examples: Sequence[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Split so that every prompt (meaning representation) lands wholly on one side.

    A prompt goes to validation when the first 8 hex digits of sha256(prompt), read as a fraction,
    fall below ``val_fraction``: stable across runs, machines and file order.
    """
    prompts = sorted({e.prompt for e in examples})
    if len(prompts) < 2:
        raise DataError(f"data: need at least 2 distinct prompts to split train/validation, got {len(prompts)}")
    val_prompts = {p for p in prompts if int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 16**8 < val_fraction}
    if not val_prompts:
        val_prompts = {min(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())}
    if len(val_prompts) == len(prompts):
        val_prompts.discard(max(val_prompts))
    train = [e for e in examples if e.prompt not in val_prompts]
    val = [e for e in examples if e.prompt in val_prompts]
    return train, val


# --- tokenization and batches ----------------------------------------------------------------------

@dataclass(frozen=True)
class Tokenized:
    input_ids: list[int]
    labels: list[int]


def adds_bos(tokenizer) -> bool:
    """Whether the model's tokenizer puts BOS in front of the text it encodes (Llama, Mistral: yes;
    GPT-2, Qwen2, SmolLM2: no). Training, evaluation and generation all follow it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and plain[:1] != [bos]


def special_tokens(tokenizer) -> dict:
    """The special tokens a run wraps each example in, as the manifest records them."""
    bos = adds_bos(tokenizer)
    return {"bos": bos, "bos_token": tokenizer.bos_token if bos else None, "eos_token": tokenizer.eos_token}


def prompt_ids(tokenizer, text: str, bos: bool) -> list[int]:
    """A prompt's token ids: BOS first where the tokenizer adds one, no other special token."""
    return ([tokenizer.bos_token_id] if bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize(examples: Sequence[Example], tokenizer, max_length: int) -> list[Tokenized]:
    """[BOS] + prompt + completion + EOS, truncated to ``max_length``; labels only on the completion.

    BOS leads the prompt where the model's tokenizer adds one (:func:`adds_bos`); the completion
    always ends with EOS, so the model learns to stop.
    """
    eos = tokenizer.eos_token_id
    bos = adds_bos(tokenizer)
    out = []
    for e in examples:
        p = prompt_ids(tokenizer, e.prompt, bos)
        c = tokenizer(e.completion, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        ids = (p + c)[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + c)[:max_length]
        if all(x == IGNORE_INDEX for x in labels):
            continue  # the prompt alone fills max_length: nothing to learn from this example
        out.append(Tokenized(ids, labels))
    if not out:
        raise DataError(f"data.max_length: {max_length} tokens leave no completion tokens in any example")
    return out


def collate(items: Sequence[Tokenized], pad_id: int):
    """Right-pad to the longest item: input_ids, attention_mask, labels as torch tensors."""
    import torch

    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        labels[i, :n] = torch.tensor(t.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class BatchPlan:
    """Micro-batch ``i`` of a run as a pure function of (i, seed).

    Epoch ``e`` visits every training example once in an order shuffled by ``seed + e``; a
    micro-batch takes ``micro_batch_size`` consecutive indices of the endless sequence. The same
    (i, seed) always gives the same examples, on any worker and after any restart.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise DataError("data: no training examples")
        self.n = n_examples
        self.size = micro_batch_size
        self.seed = seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # keep one epoch: memory stays O(n)
        return self._perms[epoch]

    def indices(self, i: int) -> list[int]:
        out = []
        for pos in range(i * self.size, (i + 1) * self.size):
            epoch, k = divmod(pos, self.n)
            out.append(self._perm(epoch)[k])
        return out
