"""Where a run's examples come from: the data file read into (prompt, completion) examples, and the
train/validation split.

Sources: the E2E NLG csv (``mr``, ``ref``) and prompt/completion JSONL. Train/validation are split
by prompt, never by row, so no prompt is on both sides; E2E is split by restaurant by default
(``data.split: name``: every MR of a held-out ``name[...]`` is held out, so validation measures
restaurants the adapter never saw) or by meaning representation (``data.split: mr``).
:mod:`lora_dist.data` turns the examples into tokens and batches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TypeVar

from lora_dist.spec import DataSpec
from lora_dist.store import atomic_file


E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_TRAIN_MEMBER = "e2e-dataset/trainset.csv"
# Prompt templates: "{input}" is replaced by the meaning representation (E2E) or the prompt
# (JSONL). The artifact's manifest records the template it was trained with, and generation and
# evaluation use that record, so changing a template here never re-prompts an old adapter.
E2E_TEMPLATE = "Describe the restaurant in one sentence.\nAttributes: {input}\nDescription:"
PLAIN_TEMPLATE = "{input}"



class DataError(ValueError):
    """The data file is missing, unreadable or not in the expected form."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    mr: str | None = None  # E2E: the meaning representation the prompt was made from
    name: str | None = None  # E2E: the MR's name[...] (what data.split: name holds out whole)


def template_for(source: str) -> str:
    """The prompt template a run on ``data.source`` trains with."""
    return E2E_TEMPLATE if source == "e2e" else PLAIN_TEMPLATE


def render(template: str, text: str) -> str:
    """``template`` with ``{input}`` replaced by ``text`` (no other braces are interpreted)."""
    return template.replace("{input}", text)


def e2e_prompt(mr: str, template: str = E2E_TEMPLATE) -> str:
    return render(template, mr.strip())


_NAME = re.compile(r"(?:^|,)\s*name\s*\[([^\]]*)\]")


def e2e_name(mr: str) -> str | None:
    """The restaurant an E2E meaning representation is about (its ``name[...]``), if it has one."""
    m = _NAME.search(mr)
    return m.group(1).strip() if m else None


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
    out = [Example(e2e_prompt(mr, template), " " + ref.strip(), mr.strip(), e2e_name(mr)) for mr, ref in rows
           if mr and ref and ref.strip()]
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
    atomic_file(target, data)
    return target


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


def split_by_name(examples: Sequence[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out whole restaurants: every example whose MR names a held-out ``name[...]``.

    Names are taken in the order of sha256(name) until the held-out MRs reach ``val_fraction`` of
    all MRs: stable across runs, machines and file order, at least one name held out and at
    least one left to train on. An MR without a name is its own unit (split as by prompt).

    Raises:
        DataError: fewer than two restaurants to split between.
    """
    def unit(e: Example) -> str:
        return f"name:{e.name}" if e.name is not None else f"mr:{e.prompt}"

    prompts: dict[str, set[str]] = {}
    for e in examples:
        prompts.setdefault(unit(e), set()).add(e.prompt)
    if len(prompts) < 2:
        raise DataError(f"data.split: name holds out whole restaurants, and the data has {len(prompts)}; "
                        f"use data.split: mr")
    total = sum(len(p) for p in prompts.values())
    held: set[str] = set()
    count = 0
    for u in sorted(prompts, key=lambda u: hashlib.sha256(u.encode()).hexdigest()):
        if held and (count >= val_fraction * total or len(held) == len(prompts) - 1):
            break
        held.add(u)
        count += len(prompts[u])
    return [e for e in examples if unit(e) not in held], [e for e in examples if unit(e) in held]


def split_examples(examples: Sequence[Example], spec: DataSpec) -> tuple[list[Example], list[Example]]:
    """Train and validation examples as ``data.split`` says. JSONL always splits by prompt; chat
    splits by restaurant like E2E where its user turns carry E2E meaning representations (so a chat
    job on the E2E data holds out the E2E job's restaurants), else by prompt."""
    named = spec.source == "e2e" or (spec.source == "chat" and any(e.name is not None for e in examples))
    if named and spec.split == "name":
        return split_by_name(examples, spec.val_fraction)
    return split_by_prompt(examples, spec.val_fraction)




def data_file(spec: DataSpec, cache_dir: Path) -> Path:
    """The file a run reads: ``data.path``, or the official E2E release downloaded once."""
    if spec.path is None:
        return fetch_e2e(cache_dir)
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path: file not found: {path.resolve()}")
    return path


T = TypeVar("T")


def spread(items: Sequence[T], k: int) -> list[T]:
    """At most ``k`` of ``items``, evenly spaced in their order (the first kept), all when there are
    no more: a held-out split is in file order, so a prefix of it would be one or two restaurants."""
    n = len(items)
    return [items[(i * n) // k] for i in range(k)] if n > k else list(items)
