"""Examples to tokenized batches, and the tokenized dataset cached on disk.

Every example is a (prompt, completion) pair (read by :mod:`lora_dist.sources`); the loss covers
completion tokens only (prompt positions get label -100). A chat conversation (:mod:`lora_dist.chat`)
trains its assistant turns, so an example's trained positions are a mask, not a prefix length
(:class:`TokenArrays`). Batches are a pure function of
(step, seed): batch i of a run is the same on every try, which makes resuming exact.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_dist.chat import chat_template, tokenize_chat_splits
from lora_dist.datafiles import DataFile
from lora_dist.errors import JobError
from lora_dist.sources import DataError, Example, data_file, read_splits, split_key, spread, template_for, val_file
from lora_dist.spec import DataSpec
from lora_dist.store import atomic_dir

IGNORE_INDEX = -100


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


TOKENIZE_CHUNK = 1024  # examples per call of the tokenizer (a fast tokenizer encodes a chunk in parallel)


def tokenize(examples: Sequence[Example], tokenizer, max_length: int, lengths: list[int] | None = None
             ) -> list[Tokenized]:
    """[BOS] + prompt + completion + EOS, truncated to ``max_length``; labels only on the completion.

    BOS leads the prompt where the model's tokenizer adds one (:func:`adds_bos`); the completion
    always ends with EOS, so the model learns to stop. Texts are encoded a chunk at a time (the
    same ids as one at a time: no padding, no special tokens added by the tokenizer). ``lengths``,
    when given, gets every example's tokens before the cut (what ``lora-dist data`` reports).
    """
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    out = []
    for at in range(0, len(examples), TOKENIZE_CHUNK):
        chunk = examples[at:at + TOKENIZE_CHUNK]
        prompts = tokenizer([e.prompt for e in chunk], add_special_tokens=False)["input_ids"]
        completions = tokenizer([e.completion for e in chunk], add_special_tokens=False)["input_ids"]
        for p, c in zip(prompts, completions):
            p, c = bos + p, c + ([eos] if eos is not None else [])
            if lengths is not None:
                lengths.append(len(p) + len(c))
            ids = (p + c)[:max_length]
            labels = ([IGNORE_INDEX] * len(p) + c)[:max_length]
            if all(x == IGNORE_INDEX for x in labels):
                continue  # the prompt alone fills max_length: nothing to learn from this example
            out.append(Tokenized(ids, labels))
    if not out:
        raise DataError(f"data.max_length: {max_length} tokens leave no completion tokens in any example")
    return out


# --- the tokenized dataset, cached on disk ---------------------------------------------------------

class TokenArrays(Sequence[Tokenized]):
    """Tokenized examples held as three arrays (memory-mapped from the cache, or in memory): every
    example's ids concatenated, where each starts (``offsets``, n + 1 of them), and which positions
    train (``mask``, one uint8 per id: 0 for label -100). An item is built when asked for."""

    def __init__(self, ids, offsets, mask) -> None:
        self.ids, self.offsets, self.mask = ids, offsets, mask

    @classmethod
    def of(cls, items: Sequence[Tokenized]) -> "TokenArrays":
        return cls.masked([(t.input_ids, [x != IGNORE_INDEX for x in t.labels]) for t in items])

    @classmethod
    def masked(cls, items: Sequence[tuple[Sequence[int], Sequence[int]]]) -> "TokenArrays":
        """From (ids, train mask) pairs: a position trains where its mask is non-zero."""
        import numpy as np

        offsets = np.zeros(len(items) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(ids) for ids, _ in items])
        ids = np.fromiter((x for t, _ in items for x in t), dtype=np.int32, count=int(offsets[-1]))
        mask = np.fromiter((bool(m) for _, t in items for m in t), dtype=np.uint8, count=len(ids))
        return cls(ids, offsets, mask)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[k] for k in range(*j.indices(len(self)))]
        if not -len(self) <= j < len(self):
            raise IndexError(j)
        j %= len(self)
        at = slice(int(self.offsets[j]), int(self.offsets[j + 1]))
        ids = self.ids[at]
        labels = ids.copy()
        labels[self.mask[at] == 0] = IGNORE_INDEX
        return Tokenized(ids.tolist(), labels.tolist())

    def lengths(self) -> list[int]:
        import numpy as np

        return np.diff(self.offsets).tolist()


@dataclass
class Tokens:
    """A run's tokenized data: the train and validation splits and what the split holds."""
    train: TokenArrays
    val: TokenArrays
    n_train_prompts: int
    n_val_prompts: int
    cache: str | None = None  # "hit" or "miss" (the directory below), None when not cached
    over_length: int = 0  # examples (train and validation) longer than data.max_length before the cut
    longest: int = 0  # the longest example's tokens before the cut
    chat_over_length: dict[str, int] | None = None  # chat: chat.ChatTokens.counts() of both splits


CACHE_FORMAT = 4  # 4: a train mask per token (chat trains several spans), not a prompt length per example
ARRAYS = ("ids", "offsets", "mask")


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the ids a tokenizer gives: its whole serialized form (a fast
    tokenizer's vocabulary, merges, normalizer and pre-tokenizer) and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.bos_token_id, tokenizer.eos_token_id, adds_bos(tokenizer), type(tokenizer).__name__])
    return hashlib.sha256(body.encode() + b"\0" + extra.encode()).hexdigest()


def cache_key(spec: DataSpec, data_sha256: str, tokenizer) -> dict:
    """What the tokenized dataset is a function of (its cache directory is named by its sha256).
    ``data_sha256``: the content digest of data.path, and of data.val_path after it when set."""
    return {"format": CACHE_FORMAT, "data_sha256": data_sha256, "source": spec.source, "columns": spec.columns,
            "template": chat_template(tokenizer, spec.chat_template) if spec.source == "chat" else template_for(spec.source),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "max_length": spec.max_length, "val_fraction": spec.val_fraction, "max_val_examples": spec.max_val_examples,
            "split": spec.split if spec.source in ("e2e", "chat") else "prompt"}


def tokenized(spec: DataSpec, tokenizer, cache_dir: Path, say=None) -> Tokens:
    """The run's tokenized splits, from ``cache_dir/tokenized/<key>`` when an earlier run (or
    another process of this one) made them; otherwise tokenized here and cached for the next.

    The processes of one machine take a lock while one of them tokenizes, so a job's workers
    tokenize once per machine and then memory-map the same arrays (their pages are shared). A
    cache directory appears whole or not at all (written aside, fsynced, renamed). A cache that
    cannot be written (read-only home, full disk) costs the cache, not the run; nor is a file
    that changed while it was read cached (under a digest that is not of what was read).

    Raises:
        JobError: the lock was held longer than ``$LORA_DIST_LOCK_TIMEOUT`` seconds (default
            3600), naming the lock file.
    """
    say = say or (lambda text: None)
    path = data_file(spec, cache_dir)
    val = val_file(spec)

    def digest() -> str:
        return path.digest() + (f"+{val.digest()}" if val is not None else "")

    key = cache_key(spec, digest(), tokenizer)
    final = cache_dir / "tokenized" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.with_suffix(".lock"), "w")
    except OSError as e:
        say(f"data: the tokenization cache {final.parent} is not writable ({e.strerror}); tokenizing in memory")
        return _tokenize_splits(spec, tokenizer, path, cache=None, say=say)
    with lock:
        _wait_for_lock(lock, final.with_suffix(".lock"))
        found = _read_tokens(final, key)
        if found is not None:
            return found
        t0 = time.time()
        tokens = _tokenize_splits(spec, tokenizer, path, cache="miss", say=say)
        if digest() != key["data_sha256"]:  # the cache holds what was read, under that content's digest
            say(f"data: {spec.path} changed while it was read; its tokens are not cached")
            return tokens
        try:
            _write_tokens(final, key, tokens)
        except OSError as e:
            say(f"data: could not cache the tokenized data in {final} ({e.strerror})")
        else:
            say(f"data: tokenized {len(tokens.train) + len(tokens.val)} examples in {time.time() - t0:.1f} s, "
                f"cached in {final}")
        return tokens



def _wait_for_lock(lock, where: Path) -> None:
    """Take the tokenization lock, waiting at most ``$LORA_DIST_LOCK_TIMEOUT`` seconds."""
    import fcntl

    limit = float(os.environ.get("LORA_DIST_LOCK_TIMEOUT") or 3600)
    t0 = time.monotonic()
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() - t0 > limit:
                raise JobError(f"data: waited {limit:.0f} s for the tokenization lock {where}, held by another "
                               f"process tokenizing the same data (a lock of a process that ended is released: "
                               f"this one is alive; LORA_DIST_LOCK_TIMEOUT sets the wait)") from None
            time.sleep(0.2)


def _tokenize_splits(spec: DataSpec, tokenizer, path: DataFile, cache: str | None, say) -> Tokens:
    train_ex, val_ex = read_splits(spec, path)
    val_ex = spread(val_ex, spec.max_val_examples)
    key = split_key(spec.source)
    if spec.source == "chat":
        train, val, counts = tokenize_chat_splits(train_ex, val_ex, tokenizer, spec, say)
        return Tokens(TokenArrays.masked(train), TokenArrays.masked(val), len({key(e) for e in train_ex}),
                      len({key(e) for e in val_ex}), cache=cache, over_length=counts["over_length"],
                      longest=counts["longest"], chat_over_length=counts)
    lengths: list[int] = []  # every example's tokens before the cut, train and validation
    train = TokenArrays.of(tokenize(train_ex, tokenizer, spec.max_length, lengths))
    val = TokenArrays.of(tokenize(val_ex, tokenizer, spec.max_length, lengths))
    return Tokens(train, val, len({key(e) for e in train_ex}), len({key(e) for e in val_ex}), cache=cache,
                  over_length=sum(n > spec.max_length for n in lengths), longest=max(lengths, default=0))


def _write_tokens(final: Path, key: dict, tokens: Tokens) -> None:
    import numpy as np

    # an unreadable earlier copy (_read_tokens said None) is replaced
    with atomic_dir(final, replace=True) as tmp:
        for split in ("train", "val"):
            for a in ARRAYS:
                np.save(tmp / f"{split}.{a}.npy", getattr(getattr(tokens, split), a))
        meta = {"key": key, "n_train_prompts": tokens.n_train_prompts, "n_val_prompts": tokens.n_val_prompts,
                "train": len(tokens.train), "val": len(tokens.val), "over_length": tokens.over_length,
                "longest": tokens.longest, "chat_over_length": tokens.chat_over_length}
        (tmp / "meta.json").write_text(json.dumps(meta))


def _read_tokens(final: Path, key: dict) -> Tokens | None:
    """The cached splits, memory-mapped; None when absent, or when they are not what ``key`` asks
    for or do not hang together (they are then tokenized afresh)."""
    import numpy as np

    try:
        meta = json.loads((final / "meta.json").read_text())
        if meta.get("key") != key:
            return None
        splits = {}
        for split in ("train", "val"):
            ids, offsets, mask = (np.load(final / f"{split}.{a}.npy", mmap_mode="r") for a in ARRAYS)
            n = meta[split]
            if (len(offsets) != n + 1 or len(mask) != len(ids) or int(offsets[0]) != 0 or int(offsets[-1]) != len(ids)
                    or (n and (np.diff(offsets) <= 0).any())):
                return None
            splits[split] = TokenArrays(ids, offsets, mask)
        return Tokens(splits["train"], splits["val"], meta["n_train_prompts"], meta["n_val_prompts"], cache="hit",
                      over_length=meta["over_length"], longest=meta["longest"],
                      chat_over_length=meta.get("chat_over_length"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


# Architectures whose attention keeps packed examples apart: transformers builds their causal mask
# from position_ids, a new example wherever the positions restart (masking_utils
# find_packed_sequence_indices), when no attention_mask and no KV cache are given (the training
# forward passes use_cache=False). Each is checked by test_layouts: a packed row's loss is the sum
# of its examples' own losses. OPT builds its mask without position_ids: its examples would attend
# to each other.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2", "gpt_neox")


def check_packing(model_type: str) -> None:
    """Raise if ``data.batching: packed`` would let examples of ``model_type`` attend to each other."""
    if model_type not in PACKING_MODEL_TYPES:
        raise DataError(f"data.batching: packed needs attention that keeps packed examples apart, which "
                        f"lora-dist has verified for {', '.join(PACKING_MODEL_TYPES)} models; this model is "
                        f"{model_type!r}: use data.batching: grouped (as little padding, no packing)")


def collate_packed(rows: Sequence[Sequence[Tokenized]], pad_id: int):
    """Rows of examples laid end to end: input_ids, labels and position_ids, no attention_mask.

    Positions restart at 0 with every example (and with the padding after a row's last one), which
    is how the model tells the examples apart; an example's first label is ignored, so that no
    example learns to predict the next one's first token.
    """
    import torch

    width = max(sum(len(t.input_ids) for t in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for t in row:
            n = len(t.input_ids)
            ids[r, at:at + n] = torch.tensor(t.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(t.labels[1:])
            positions[r, at:at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the items (indices into ``lengths``) in rows of at most ``capacity``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for j in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, left in enumerate(room):
            if lengths[j] <= left:
                rows[r].append(j)
                room[r] -= lengths[j]
                break
        else:
            rows.append([j])
            room.append(capacity - lengths[j])
    return rows


# Micro-batches whose examples `grouped` batching sorts by length together: enough that neighbours in
# length pad little, few enough that a window still mixes the epoch's order (E2E, micro-batches of 8:
# 512 examples of a 4,200-example epoch).
GROUP_WINDOW = 64


class BatchPlan:
    """Micro-batch ``i`` of a run as a pure function of (i, seed) (and, grouped, of the examples'
    lengths, which the data fixes).

    Epoch ``e`` visits every training example once in an order shuffled by ``seed + e``; the
    examples form an endless sequence of positions.

    - ``padded``: micro-batch ``i`` takes ``micro_batch_size`` consecutive positions, padded to
      its longest example.
    - ``grouped``: the positions of ``GROUP_WINDOW`` consecutive micro-batches are sorted by
      length and cut into micro-batches of neighbours in length (little padding), whose order in
      the window is then shuffled by (seed, window), so that a run does not see lengths rise and
      fall in step with the windows.
    - ``packed``: the examples of such a window are packed into rows of at most ``capacity``
      tokens (first-fit decreasing), ``micro_batch_size`` rows to a micro-batch (a window's last
      may have fewer), shuffled likewise. A micro-batch then holds several times as many
      examples; which window micro-batch ``i`` falls in is found from the windows' counts, kept.

    Either way the same (i, seed) always gives the same examples, on any worker, at any world
    size and after any restart; only O(n) indices are held.
    """

    def __init__(self, n_examples: int, micro_batch_size: int, seed: int, lengths: Sequence[int] | None = None,
                 mode: str = "padded", capacity: int | None = None) -> None:
        if n_examples < 1:
            raise DataError("data: no training examples")
        if mode not in ("padded", "grouped", "packed"):
            raise DataError(f"data.batching: {mode!r} has no batch plan (expected padded, grouped or packed)")
        if mode != "padded" and (lengths is None or len(lengths) != n_examples):
            raise DataError(f"data.batching: {mode} needs the length of every training example")
        if mode == "packed" and (capacity is None or max(lengths) > capacity):
            raise DataError("data.batching: packed needs a row capacity (data.max_length) that every example fits")
        self.n = n_examples
        self.size = micro_batch_size
        self.seed = seed
        self.mode = mode
        self.lengths = lengths
        self.capacity = capacity
        self._perms: dict[int, list[int]] = {}
        self._windows: dict[int, list[list[list[int]]]] = {}
        self._starts = [0]  # packed: the first micro-batch of each window counted so far

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}  # keep one epoch: memory stays O(n)
        return self._perms[epoch]

    def _positions(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, k = divmod(pos, self.n)
            out.append(self._perm(epoch)[k])
        return out

    def _window(self, w: int) -> list[list[list[int]]]:
        """Window ``w``'s micro-batches, each a list of rows of example indices (grouped: one
        example a row)."""
        if w not in self._windows:
            span = self.size * GROUP_WINDOW
            members = self._positions(w * span, span)
            if self.mode == "packed":
                rows = [[members[k] for k in row] for row in pack([self.lengths[j] for j in members], self.capacity)]
                batches = [rows[k:k + self.size] for k in range(0, len(rows), self.size)]
            else:
                order = sorted(members, key=lambda j: self.lengths[j])  # stable: ties keep the shuffled order
                batches = [[[j] for j in order[k:k + self.size]] for k in range(0, span, self.size)]
            random.Random(f"{self.mode}:{self.seed}:{w}").shuffle(batches)
            self._windows = {w: batches}  # keep one window
        return self._windows[w]

    def _locate(self, i: int) -> tuple[int, int]:
        """(window, slot) of micro-batch ``i``."""
        if self.mode == "grouped":
            return divmod(i, GROUP_WINDOW)
        while self._starts[-1] <= i:  # packed: count windows until one holds micro-batch i
            self._starts.append(self._starts[-1] + len(self._window(len(self._starts) - 1)))
        w = bisect.bisect_right(self._starts, i) - 1
        return w, i - self._starts[w]

    def rows(self, i: int) -> list[list[int]]:
        """Micro-batch ``i`` as rows of example indices (one example a row unless packed)."""
        if self.mode == "padded":
            return [[j] for j in self._positions(i * self.size, self.size)]
        w, slot = self._locate(i)
        return [list(row) for row in self._window(w)[slot]]

    def indices(self, i: int) -> list[int]:
        """The examples of micro-batch ``i``."""
        return [j for row in self.rows(i) for j in row]

    def micro_batches(self, examples: int, exact_windows: int = 64) -> float:
        """How many micro-batches the first ``examples`` positions make (train.epochs' arithmetic):
        ``examples / micro_batch_size``, or packed the windows' micro-batches in proportion (the
        first ``exact_windows`` windows packed and counted, any further ones at their mean)."""
        if self.mode != "packed":
            return examples / self.size
        windows = examples / (self.size * GROUP_WINDOW)
        counted = max(1, min(math.ceil(windows), exact_windows))
        return sum(len(self._window(w)) for w in range(counted)) / counted * windows
