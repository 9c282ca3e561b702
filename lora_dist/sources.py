"""Where a run's examples come from: the data's rows (:mod:`lora_dist.datafiles`, any format) read
into (prompt, completion) examples, and the train/validation split.

Sources: the E2E NLG csv (``mr``, ``ref``), prompt/completion rows (``jsonl``), Alpaca rows
(``instruction``, ``input``, ``output``) and plain text (``text``: the loss on every token);
``data.columns`` maps a file's column names onto the source's. Train/validation are split by
prompt (text: by text), never by row, so no prompt is on both sides; E2E is split by restaurant
by default (``data.split: name``: every MR of a held-out ``name[...]`` is held out, so validation
measures restaurants the adapter never saw) or by meaning representation (``data.split: mr``);
``data.val_path`` replaces the split with a file of its own. :mod:`lora_dist.data` turns the
examples into tokens and batches.
"""

from __future__ import annotations

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
from typing import Any, Callable, Mapping, Sequence, TypeVar

from lora_dist.datafiles import NOT_QUOTED, DataError, DataFile
from lora_dist.spec import SOURCE_COLUMNS, DataSpec
from lora_dist.store import atomic_file


E2E_URL = "https://github.com/tuetschek/e2e-dataset/releases/download/v1.0.0/e2e-dataset.zip"
E2E_TRAIN_MEMBER = "e2e-dataset/trainset.csv"
# Prompt templates: "{input}" is replaced by the meaning representation (E2E) or the prompt
# (JSONL). The artifact's manifest records the template it was trained with, and generation and
# evaluation use that record, so changing a template here never re-prompts an old adapter.
E2E_TEMPLATE = "Describe the restaurant in one sentence.\nAttributes: {input}\nDescription:"
PLAIN_TEMPLATE = "{input}"
# Stanford Alpaca's prompt; a row's input, when it has one, follows its instruction (ALPACA_INPUT).
ALPACA_TEMPLATE = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{input}\n\n### Response:\n")
ALPACA_INPUT = "\n\n### Input:\n"


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    mr: str | None = None  # E2E: the meaning representation the prompt was made from
    name: str | None = None  # E2E: the MR's name[...] (what data.split: name holds out whole)


ROLES = ("system", "user", "assistant")
# an E2E meaning representation's name[...] inside a message ("Attributes: name[X], ...")
_CHAT_NAME = re.compile(r"(?:^|[,:\n])\s*name\s*\[([^\]]*)\]")


@dataclass(frozen=True)
class Conversation(Example):
    """A conversation as an :class:`Example`: ``prompt`` is the conversation before its last
    assistant turn (what a split keeps on one side), ``completion`` that turn's content, ``name``
    the restaurant of an E2E meaning representation in a user turn (``data.split: name``)."""
    messages: tuple[tuple[str, str, int], ...] = ()  # (role, content, weight)


def read_chat(f: DataFile, column: str = "messages") -> list[Conversation]:
    """The conversations of ``f``, every row checked (``column``: the file's name for
    ``messages``, as ``data.columns`` maps it).

    Raises:
        DataError: naming the file, the row and the problem (no ``messages`` list, a bad role,
            non-string content, a bad weight, no assistant turn, nothing to train).
    """
    out = []
    for n, row in f.rows():
        def bad(problem: str) -> DataError:
            return DataError(f"{f.field}: {f.location} {f.where(n)}: {problem}")

        msgs = row.get(column) if isinstance(row, Mapping) else None
        if not isinstance(msgs, list) or not msgs:
            raise bad('expected an object with a non-empty "messages" list (OpenAI\'s chat format)')
        turns = []
        for k, m in enumerate(msgs, 1):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                got = m.get("role") if isinstance(m, dict) else type(m).__name__
                raise bad(f"message {k}: role must be one of {', '.join(ROLES)}, got {str(got)[:20]!r}")
            if not isinstance(m.get("content"), str):
                raise bad(f"message {k} ({m['role']}): content must be a string, got "
                          f"{type(m.get('content')).__name__}")
            weight = m.get("weight")  # null: absent (a table fills a column missing from some rows)
            if weight is None:
                weight = 1
            elif m["role"] != "assistant" or type(weight) is not int or weight not in (0, 1):
                raise bad(f"message {k} ({m['role']}): weight must be 0 or 1, on assistant messages only, "
                          f"got {weight!r:.40}")
            turns.append((m["role"], m["content"], weight))
        roles = [r for r, _, _ in turns]
        if "assistant" not in roles:
            raise bad("no assistant message: nothing to train on")
        if not any(r == "assistant" and w for r, _, w in turns):
            raise bad("every assistant message has weight 0: nothing to train on")
        first = next(r for r in roles if r != "system")
        if first != "user":
            raise bad(f"the first message after the system prompt must be a user message, got {first!r}")
        last = max(k for k, r in enumerate(roles) if r == "assistant")
        prompt = json.dumps([[r, c] for r, c, _ in turns[:last]], ensure_ascii=False)
        name = next((m.group(1).strip() for r, c, _ in turns[:last] if r == "user" for m in [_CHAT_NAME.search(c)] if m),
                    None)
        out.append(Conversation(prompt, turns[last][1], name=name, messages=tuple(turns)))
    if not out:
        raise f.error("has no conversations")
    return out


def template_for(source: str) -> str:
    """The prompt template a run on ``data.source`` trains with."""
    return {"e2e": E2E_TEMPLATE, "alpaca": ALPACA_TEMPLATE}.get(source, PLAIN_TEMPLATE)


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


def _names(spec: DataSpec | None, source: str) -> dict[str, str]:
    """The source's column -> the file's column (``data.columns``, else the same name)."""
    columns = spec.columns if spec is not None else {}
    return {c: columns.get(c, c) for c in SOURCE_COLUMNS[source]}


def _check_columns(f: DataFile, names: Mapping[str, str], required: Sequence[str]) -> None:
    """Refuse a file whose declared columns (a CSV header, a table's features) lack a ``required``
    source column (``names`` maps each onto the file's)."""
    found = f.columns()
    missing = [c for c in required if found is not None and names[c] not in found]
    if missing:
        shown = f.quotable_columns()  # a header that parsed as one; never other content
        has = f"its columns: {', '.join(shown) or 'none'}" if shown is not None else f"it has {NOT_QUOTED}"
        raise f.error(f"no column{'s' if len(missing) > 1 else ''} {', '.join(repr(names[c]) for c in missing)} "
                      f"({has}); data.columns maps yours onto the source's, e.g. "
                      f"{{{missing[0]}: {shown[0] if shown else 'COLUMN'}}}")


def _string_fields(f: DataFile, n: int, row: Any, required: Sequence[str], optional: Sequence[str] = ()) -> list[str]:
    """The row's ``required`` and ``optional`` string fields ("" when absent), the last required
    one (the text trained on) non-empty; or a DataError naming the file, the line and what is
    wrong."""
    what = (f"expected an object with string fields {' and '.join(map(repr, required))} (non-empty)"
            + (f", and {' '.join(map(repr, optional))} a string if present" if optional else ""))
    if not isinstance(row, Mapping):
        raise DataError(f"{f.field}: {f.location} {f.where(n)}: {what}; got {type(row).__name__}")
    out = []
    for name in (*required, *optional):
        value = row.get(name)
        if value is None and name in optional:
            value = ""
        if not isinstance(value, str):
            problem = "missing" if value is None else f"{type(value).__name__}, not a string"
            raise DataError(f"{f.field}: {f.location} {f.where(n)}: {what}; {name!r} is {problem}")
        if not value and name == required[-1]:
            raise DataError(f"{f.field}: {f.location} {f.where(n)}: {what}; {name!r} is empty")
        out.append(value)
    return out


def _examples(f: DataFile, spec: DataSpec | None, source: str, template: str | None = None) -> list[Example]:
    """Every row of ``f`` as an example of ``source``.

    Raises:
        DataError: naming the file, and the line or row, when a row or the file is not what the
            source reads, or when no row is an example.
    """
    names = _names(spec, source)
    template = template if template is not None else template_for(source)
    out: list[Example] = []
    if source == "e2e":
        mr_col, ref_col = names["mr"], names["ref"]
        found = f.columns()
        if found is not None and not {mr_col, ref_col} <= set(found):
            kind = "a csv" if f.kind == "csv" else "a table"
            shown = f.quotable_columns()  # a header that parsed as one; never other content
            raise DataError(f"{f.field}: {f.location} must be {kind} with columns {mr_col!r} and {ref_col!r}, "
                            f"found {shown if shown is not None else NOT_QUOTED}")
        for _, row in f.rows():  # a row without both is skipped, as the E2E release has some
            mr, ref = (row.get(mr_col), row.get(ref_col)) if isinstance(row, Mapping) else (None, None)
            if isinstance(mr, str) and isinstance(ref, str) and mr and ref.strip():
                out.append(Example(e2e_prompt(mr, template), " " + ref.strip(), mr.strip(), e2e_name(mr)))
        if not out:
            raise DataError(f"{f.field}: {f.location} has no rows with both {mr_col!r} and {ref_col!r}")
        return out
    if source == "chat":
        return read_chat(f, names["messages"])
    # the source's (required, optional) columns, and the example their values make
    make: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[[list[str]], Example]]] = {
        "jsonl": (("prompt", "completion"), (), lambda v: Example(v[0], v[1])),
        "alpaca": (("instruction", "output"), ("input",),
                   lambda v: Example(render(template, v[0] + (ALPACA_INPUT + v[2] if v[2].strip() else "")), v[1])),
        "text": (("text",), (), lambda v: Example("", v[0])),
    }
    if source not in make:
        raise DataError(f"data.source: {source!r} is not read by sources.read_examples")
    required, optional, build = make[source]
    _check_columns(f, names, required)
    file_required, file_optional = [names[c] for c in required], [names[c] for c in optional]
    for n, row in f.rows():
        out.append(build(_string_fields(f, n, row, file_required, file_optional)))
    if not out:
        raise DataError(f"{f.field}: {f.location} has no examples")
    return out


def read_e2e(path: Path, template: str = E2E_TEMPLATE) -> list[Example]:
    """Read an E2E csv with columns ``mr`` and ``ref`` (one row per reference), each MR prompted
    through ``template``."""
    return _examples(DataFile(str(path), default="csv"), None, "e2e", template)


def read_jsonl(path: Path) -> list[Example]:
    """Read ``{"prompt": str, "completion": str}`` lines."""
    return _examples(DataFile(str(path)), None, "jsonl")


def data_location(spec: DataSpec, field: str = "data.path") -> DataFile:
    """The location ``data.path`` (or ``data.val_path``) names, read in the source's own format
    when the file's name says none."""
    return DataFile(getattr(spec, field.split(".")[1]), field, default="csv" if spec.source == "e2e" else "jsonl",
                    revision=spec.revision, split=spec.hf_split)


def read_examples(f: DataFile, spec: DataSpec) -> list[Example]:
    """Every row of ``f`` as an example of ``data.source``, columns named by ``data.columns``."""
    return _examples(f, spec, spec.source)


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


def prompt_of(e: Example) -> str:
    return e.prompt


def text_of(e: Example) -> str:
    return e.completion


def split_by_prompt(examples: Sequence[Example], val_fraction: float,
                    key: Callable[[Example], str] = prompt_of) -> tuple[list[Example], list[Example]]:
    """Split so that every prompt (meaning representation; ``key`` says what else) lands wholly on
    one side.

    A prompt goes to validation when the first 8 hex digits of sha256(prompt), read as a fraction,
    fall below ``val_fraction``: stable across runs, machines and file order.
    """
    prompts = sorted({key(e) for e in examples})
    if len(prompts) < 2:
        raise DataError(f"data: need at least 2 distinct prompts to split train/validation, got {len(prompts)}")
    val_prompts = {p for p in prompts if int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) / 16**8 < val_fraction}
    if not val_prompts:
        val_prompts = {min(prompts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())}
    if len(val_prompts) == len(prompts):
        val_prompts.discard(max(val_prompts))
    train = [e for e in examples if key(e) not in val_prompts]
    val = [e for e in examples if key(e) in val_prompts]
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
    """Train and validation examples as ``data.split`` says: E2E by restaurant or by MR; chat by
    restaurant like E2E where its user turns carry E2E meaning representations (so a chat job on
    the E2E data holds out the E2E job's restaurants), else by prompt; text by text; the others by
    prompt."""
    named = spec.source == "e2e" or (spec.source == "chat" and any(e.name is not None for e in examples))
    if named and spec.split == "name":
        return split_by_name(examples, spec.val_fraction)
    return split_by_prompt(examples, spec.val_fraction, split_key(spec.source))


def split_key(source: str) -> Callable[[Example], str]:
    """What a source's examples are split (and counted) by: the prompt, or a text source's text."""
    return text_of if source == "text" else prompt_of


def data_file(spec: DataSpec, cache_dir: Path) -> DataFile:
    """What a run reads: ``data.path``, or the official E2E release downloaded once."""
    f = data_location(spec) if spec.path is not None else DataFile(str(fetch_e2e(cache_dir)), default="csv")
    f.check()
    return f


def val_file(spec: DataSpec) -> DataFile | None:
    """``data.val_path``'s location, None when validation is split from ``data.path``."""
    return data_location(spec, "data.val_path") if spec.val_path is not None else None


def read_splits(spec: DataSpec, train_file: DataFile) -> tuple[list[Example], list[Example]]:
    """The run's train and validation examples: ``data.path`` split, or every example of
    ``data.path`` and of ``data.val_path``.

    Raises:
        DataError: naming the file and row, when either is not data of ``data.source``, or a side
            has no examples.
    """
    examples = read_examples(train_file, spec)
    val = val_file(spec)
    if val is not None:
        return examples, read_examples(val, spec)
    try:
        return split_examples(examples, spec)
    except DataError as e:
        raise train_file.error(f"{str(e).removeprefix('data: ')} (or give validation data of its own: "
                               f"data.val_path)") from None


def check_data(spec: DataSpec, cache_dir: Path) -> tuple[list[Example], list[Example]]:
    """Read and split the data as a run will (no tokenizer): what ``submit`` and ``train`` check
    before anything is sent or built. Without ``data.path`` the official E2E release is the data,
    and nothing is read."""
    if spec.path is None:
        return [], ([] if spec.val_path is None else read_examples(val_file(spec), spec))
    return read_splits(spec, data_file(spec, cache_dir))


T = TypeVar("T")


def spread(items: Sequence[T], k: int) -> list[T]:
    """At most ``k`` of ``items``, evenly spaced in their order (the first kept), all when there are
    no more: a held-out split is in file order, so a prefix of it would be one or two restaurants."""
    n = len(items)
    return [items[(i * n) // k] for i in range(k)] if n > k else list(items)
