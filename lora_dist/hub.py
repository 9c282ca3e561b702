"""A base model named by its Hugging Face hub id: ``model.base: ORG/NAME`` at ``model.revision``.

Inside the package a hub base travels as one string, ``ORG/NAME`` or ``ORG/NAME@REVISION``
(HfFileSystem's notation; :func:`hub_ref`), so that every function that takes ``model.base``
takes it unchanged. huggingface_hub does the resolving and the caching, and reads ``HF_HOME``,
``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, ``HF_ENDPOINT`` and ``HF_TOKEN`` itself: the token is
never passed, printed or recorded here.

    config_dir(ref)   config.json only (planning, validation): one small file, no weights
    pin(ref)          ORG/NAME@<commit>: the revision resolved once, so every rank loads one commit
    snapshot(ref)     config, tokenizer files and safetensors weights, downloaded once per node
                      (its ranks take a file lock in the cache; the others wait, then find it there)
    commit_of(dir)    the commit a snapshot directory holds (the manifest records it)

A repository with pickle weights only is refused, as a local directory is (base.weight_files).
Imports huggingface_hub only inside its functions: ``lora-dist submit --address`` checks a spec
without it.
"""

from __future__ import annotations

import fcntl
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lora_dist import safejson
from lora_dist.errors import ModelError

DEFAULT_REVISION = "main"
# ORG/NAME as the hub spells a model id (huggingface_hub.utils.validate_repo_id), optionally @REVISION.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# A branch, tag or commit: git's ref rules, as far as a spec can break them.
REVISION_RE = re.compile(r"^[A-Za-z0-9._/-]{1,255}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# What a snapshot downloads first: the config, the tokenizer's files and the weights' index; then
# the weight files that index lists (else model.safetensors), and no other copy of the weights
# (Mistral's consolidated.safetensors, an original/ folder), as base.weight_files reads them.
ALLOW_PATTERNS = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                  "merges.txt", "chat_template.jinja", "chat_template.json"]
WEIGHTS_INDEX, SINGLE_WEIGHTS = "model.safetensors.index.json", "model.safetensors"  # base.weight_files reads these
MAX_INDEX_BYTES = 64 << 20  # an index names each tensor once: Llama 3.1 405B's is under 100 kB
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_hub_id(base: str) -> bool:
    """``base`` names a hub repository (``ORG/NAME``), not an existing local directory."""
    return bool(HUB_ID_RE.match(base)) and "--" not in base and ".." not in base \
        and not Path(base).expanduser().is_dir()


def revision_problem(revision: str, base: str | None = None) -> str | None:
    """What is wrong with ``model.revision`` (None: a branch, tag or commit could be named so, of
    a hub id ``base``; the default revision goes with any base)."""
    if not REVISION_RE.match(revision) or ".." in revision or revision.startswith(("/", "-")) \
            or revision.endswith(("/", ".lock")):
        return f"must be a branch, tag or commit (letters, digits, '.', '_', '-', '/'), got {revision[:80]!r}"
    if base is not None and revision != DEFAULT_REVISION and not is_hub_id(base):
        return f"{revision!r} applies to a hub id (ORG/NAME) only, and model.base {base!r} is not one"
    return None


def hub_ref(model: Any) -> str:
    """The string that carries a spec's ``model.base`` and ``model.revision`` (a spec.ModelSpec)
    through the package: ``base`` itself for the default revision or a base that is no hub id,
    else ``ORG/NAME@REVISION``."""
    base, revision = model.base, model.revision
    return base if revision == DEFAULT_REVISION or not is_hub_id(base) else f"{base}@{revision}"


def split_ref(ref: str) -> tuple[str, str] | None:
    """(repo id, revision) of a hub reference; None when ``ref`` is a built-in id or a directory."""
    repo_id, _, revision = ref.partition("@")
    if not is_hub_id(repo_id) or (revision and revision_problem(revision)) or Path(ref).expanduser().is_dir():
        return None
    return repo_id, revision or DEFAULT_REVISION


def commit_of(model_dir: Path) -> str | None:
    """The commit of a snapshot directory (``.../models--ORG--NAME/snapshots/<commit>``), else None."""
    model_dir = Path(model_dir)
    if COMMIT_RE.match(model_dir.name) and model_dir.parent.name == "snapshots" \
            and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.name
    return None


def config_dir(ref: str) -> Path:
    """The snapshot directory holding ``config.json`` of a hub reference, fetching that one file
    (and nothing else) when it is not cached.

    Raises:
        ModelError: the repository, revision or file cannot be had (gated, missing, offline).
    """
    from huggingface_hub import hf_hub_download

    repo_id, revision = _split(ref)
    try:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
    except Exception as e:  # noqa: BLE001 - each kind gets its message in _hub_error
        raise _hub_error(e, repo_id, revision, "config.json") from None


def pin(ref: str) -> str:
    """``ORG/NAME@<commit>`` for a hub reference at a branch or tag (one small request, or the
    cache's ``refs/`` offline); any other base unchanged. A job resolves its revision once and
    hands the commit to every rank, so a push to the branch mid-start cannot split them."""
    parts = split_ref(ref)
    if parts is None or COMMIT_RE.match(parts[1]):
        return ref
    return f"{parts[0]}@{config_dir(ref).name}"


def tokenizer_dir(ref: str) -> Path:
    """The snapshot directory holding a hub reference's config and tokenizer files, no weights
    fetched: what a check before submission needs (a chat job's template).

    Raises:
        ModelError: the repository or revision cannot be had (gated, missing, offline).
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = _split(ref)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except Exception as e:  # noqa: BLE001 - each kind gets its message in _hub_error
        raise _hub_error(e, repo_id, revision, "the tokenizer") from None


def snapshot(ref: str, say: Callable[[str], None] | None = None) -> Path:
    """The local snapshot directory of a hub reference: config, tokenizer files and safetensors
    weights, downloaded into the Hugging Face cache once per machine.

    A branch or tag is resolved first (:func:`pin`). The processes of one node serialize on a
    file lock in the cache: the first downloads (huggingface_hub's progress bars, a line before
    and after), the others then find every file cached and return at once.

    Raises:
        ModelError: the repository cannot be had (gated, missing, not cached offline), or holds
            pickle weights only.
    """
    from huggingface_hub import constants, snapshot_download

    say = say or _stderr
    repo_id, revision = _split(ref)
    commit = _split(pin(ref))[1]  # a branch is resolved on the hub (offline: the cache's refs/), never assumed
    lock_dir = Path(constants.HF_HUB_CACHE) / ".locks" / f"models--{repo_id.replace('/', '--')}"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / "lora-dist-snapshot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # With the commit known and the repository's file listing cached (trees/<commit>.json, written
        # by the first download), a process that finds every file cached sends no request at all.
        t0 = time.time()
        say(f"model.base {repo_id}@{revision} (commit {commit}): fetching what {constants.HF_HUB_CACHE} does not "
            f"hold yet (config, tokenizer, safetensors; once per node, its other processes wait)")
        try:
            path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[*ALLOW_PATTERNS, WEIGHTS_INDEX]))
            path = Path(snapshot_download(repo_id, revision=commit, allow_patterns=_weight_names(path)))
        except Exception as e:  # noqa: BLE001 - each kind gets its message in _hub_error
            raise _hub_error(e, repo_id, revision, "the snapshot") from None
        files = [f for f in path.iterdir() if f.is_file()]
        say(f"model.base {repo_id}@{revision}: {len(files)} files, {sum(f.stat().st_size for f in files) / 2**30:.2f} "
            f"GiB, ready in {time.time() - t0:.0f} s")
    return _checked(path, repo_id, revision)


def _weight_names(path: Path) -> list[str]:
    """The weight files to download: those the snapshot's index lists (plain ``.safetensors``
    names; base.weight_files checks the index itself), else ``model.safetensors``."""
    try:
        names = set(safejson.read(path / WEIGHTS_INDEX, MAX_INDEX_BYTES)["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return [SINGLE_WEIGHTS]
    return sorted(n for n in names if isinstance(n, str) and n.endswith(".safetensors") and "/" not in n
                  and not set(n) & set("*?[]")) or [SINGLE_WEIGHTS]


def _checked(path: Path, repo_id: str, revision: str) -> Path:
    """``path`` when it holds safetensors weights; a repository with pickle weights only is
    refused by name (what its cached file listing shows: those files were never downloaded)."""
    from huggingface_hub import get_cached_repo_tree

    if any(path.glob("*.safetensors")):
        return path
    try:
        listed = [f.path for f in get_cached_repo_tree(repo_id, revision=path.name)]
    except Exception:  # noqa: BLE001 - no listing cached: base.weight_files says what is missing
        return path
    pickles = sorted(n for n in listed if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(f"model.base: {repo_id} (revision {revision}, commit {path.name}) has only pickle weights "
                         f"({', '.join(pickles[:3])}): they run code when loaded and are refused. Use a repository "
                         f"or revision with safetensors weights (most have a `refs/pr/N` conversion), or convert "
                         f"them yourself into a local directory")
    return path


def _split(ref: str) -> tuple[str, str]:
    parts = split_ref(ref)
    if parts is None:
        raise ModelError(f"model.base: {ref!r} is not a hub id (ORG/NAME, optionally @REVISION)")
    return parts


def _hub_error(e: Exception, repo_id: str, revision: str, what: str) -> Exception:
    """A ModelError naming the repository and revision and what to do, for what huggingface_hub
    raised; anything unexpected is returned as it is."""
    from huggingface_hub.errors import (GatedRepoError, HFValidationError, LocalEntryNotFoundError,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    at = f"model.base: {repo_id} (model.revision {revision})"
    if isinstance(e, GatedRepoError):
        return ModelError(f"{at} is gated: accept its licence on https://huggingface.co/{repo_id} with your "
                          f"account, then log in on each node (`hf auth login`) or set HF_TOKEN in the "
                          f"environment of the processes that load it")
    if isinstance(e, RepositoryNotFoundError):
        return ModelError(f"{at}: no such repository, or it is private: check the id; for a private one log in "
                          f"(`hf auth login`) or set HF_TOKEN in the environment")
    if isinstance(e, RevisionNotFoundError):
        return ModelError(f"{at}: the repository has no such branch, tag or commit; check model.revision")
    if isinstance(e, RemoteEntryNotFoundError):
        return ModelError(f"{at} has no {what}: it is not a transformers model repository")
    if isinstance(e, LocalEntryNotFoundError):
        return ModelError(f"{at}: {what} is not in the Hugging Face cache and the hub cannot be reached "
                          f"(HF_HUB_OFFLINE is set, or no network): unset HF_HUB_OFFLINE, or download it first "
                          f"where there is a network (`hf download {repo_id} --revision {revision}`) into the "
                          f"cache HF_HOME names")
    if isinstance(e, HFValidationError):
        return ModelError(f"{at}: not a valid hub id or revision ({e})")
    return e


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
