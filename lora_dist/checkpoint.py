"""Resumable checkpoints, the project's own: nothing in them is unpickled (docs/design.md decision 12).

A checkpoint holds the *trainable* state only, gathered whole (LoRA matrices are megabytes even
at GPT-3 scale), so it does not depend on how many workers wrote it: a job resumes at another
worker count. The frozen int8 base is never in it; it is reloaded from the base checkpoint.

    <output.dir>/.checkpoints/<name>-<job id>/step-00000004/
        train_state.safetensors   per trainable parameter: "param/<name>" (fp32 master weights),
                                  "exp_avg/<name>", "exp_avg_sq/<name>" (AdamW moments)
        state.json                step, next batch index, optimizer step count, scheduler, loss
                                  scaler, every rank's RNG state, the spec and its digest
        metrics.jsonl             the job's history up to this step (each step once)
        manifest.json             sha256 of each file above, written last; with $LORA_DIST_SIGNING_KEY
                                  set, its HMAC-SHA256 too (store.manifest_signature, as artifacts)

A directory without a manifest, with a file that fails its sha256, or with a file the manifest
does not list is torn or tampered: :func:`latest` skips it for the previous complete one and
says so. With a signing key set, a checkpoint whose manifest is unsigned or signed otherwise was
not written by this cluster's jobs (whoever can write ``.checkpoints/`` can plant a
self-consistent one, and the export would then sign what it trained): it is refused, the job
fails, and the checkpoint is left in place for whoever looks into it. Only the newest
:data:`KEEP` complete checkpoints are kept.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lora_dist.errors import ArtifactError
from lora_dist.records import CheckpointState
from lora_dist.spec import JobSpec
from lora_dist.specid import spec_differences, spec_digest
from lora_dist.confine import confine
from lora_dist.store import SIGNING_KEY_ENV, atomic_dir, is_uri, join, list_dir, manifest_signature, read_bytes, \
    remove_tree, run_name, signing_key, upload

STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "state.json"
METRICS = "metrics.jsonl"
MANIFEST = "manifest.json"
FORMAT = "lora-dist-checkpoint/1"
KEEP = 2
STEP_RE = re.compile(r"^step-(\d{8})$")
PARTIAL_RE = re.compile(r"^\.step-\d{8}\..*\.partial$")  # store.atomic_dir's temporary directory of a step


def checkpoints_dir(output_dir: str, name: str, job_id: str) -> str:
    """Where job ``job_id``'s checkpoints live: beside its artifact, on the same storage."""
    return join(join(output_dir, ".checkpoints"), run_name(name, job_id))


@dataclass
class Checkpoint:
    location: str  # the step directory (path or URI)
    step: int
    state: CheckpointState
    tensors: dict[str, Any]  # name -> torch.Tensor (CPU)
    metrics: str  # metrics.jsonl text


class SpecChanged(ValueError):
    """A job id was resubmitted with a spec that trains something else."""


class UntrustedCheckpoint(ArtifactError):
    """With a signing key set, a checkpoint that is unsigned or signed otherwise: never resumed
    from, never skipped over, never deleted."""


def _list_steps(root: str) -> list[tuple[int, str]]:
    """(step, location) of every step-NNNNNNNN directory under ``root``, newest first."""
    steps = [(int(m.group(1)), join(root, n)) for n in list_dir(root, dirs_only=True) if (m := STEP_RE.match(n))]
    return sorted(steps, reverse=True)


# --- writing --------------------------------------------------------------------------------------

def write(root: str, step: int, tensors: dict[str, Any], state: CheckpointState, metrics_text: str,
          say: Callable[[str], None] = lambda s: None, within: str | None = None) -> str:
    """Write a complete checkpoint of ``step`` under ``root`` (the main process only) and drop all
    but the newest :data:`KEEP` complete ones.

    Local: files are written and fsynced in a temporary sibling, the manifest last, then the
    directory is renamed into place and its parent fsynced, so a crash leaves either no
    ``step-N`` or a complete one. URI: files are uploaded, the manifest last (object stores have
    no rename; a step without its manifest is torn and skipped).

    Args:
        within: the job's root (store.job_root): the checkpoint and every one it drops must be
            under it as written (store.confine), else nothing is written or dropped.

    Returns:
        The checkpoint's location.

    Raises:
        JobError: the checkpoint's place is outside ``within``.
    """
    from safetensors.torch import save

    name = f"step-{step:08d}"
    files = {STATE_TENSORS: save({k: v.contiguous() for k, v in tensors.items()}),
             STATE_JSON: json.dumps(state.to_json(), sort_keys=True).encode(),
             METRICS: metrics_text.encode()}
    manifest = {"format": FORMAT, "step": step,
                "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}
    key = signing_key()
    if key is not None:  # over the step and every file's sha256, so over the whole checkpoint
        manifest["signature"] = manifest_signature(manifest, key)
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()  # last
    dest = join(root, name)
    confine(dest, within)
    if is_uri(root):
        try:
            upload(files, dest)
        except BaseException:  # a torn step is skipped on read, but not left behind
            remove_tree(dest)
            raise
    else:
        # a retry that re-reached this step: the new one replaces it whole (atomic_dir removes its
        # temporary directory if this fails; one of a writer that was killed goes below)
        with atomic_dir(Path(dest), replace=True) as tmp:
            for n, data in files.items():
                (tmp / n).write_bytes(data)
    for _, old in _list_steps(root)[KEEP:]:
        remove_tree(old, within)
    for n in list_dir(root):  # one writer per job at a time: a temporary directory now is a dead one's
        if PARTIAL_RE.match(n):
            remove_tree(join(root, n), within)
    say(f"checkpoint of step {step} written: {dest}")
    return dest


def remove_all(root: str, within: str | None = None) -> None:
    """Drop a job's checkpoints (once its artifact is published, they are not needed), if they
    are under the job's root ``within`` (store.remove_tree)."""
    remove_tree(root, within)


# --- reading --------------------------------------------------------------------------------------

def _read_verified(location: str) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The manifest and every file's bytes of one checkpoint directory, each checked.

    Raises:
        UntrustedCheckpoint: a signing key is set and the manifest is unsigned or signed otherwise.
        ArtifactError: no manifest, a file missing or failing its sha256, or a file not listed.
    """
    raw = read_bytes(join(location, MANIFEST))
    if raw is None:
        raise ArtifactError(f"{location}: no {MANIFEST} (torn: the writer stopped before finishing it)")
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ArtifactError(f"{join(location, MANIFEST)}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            set(manifest.get("files") or {}) != {STATE_TENSORS, STATE_JSON, METRICS}:
        raise ArtifactError(f"{join(location, MANIFEST)}: not a {FORMAT} manifest")
    _check_signature(manifest, join(location, MANIFEST))
    unlisted = sorted(set(list_dir(location)) - set(manifest["files"]) - {MANIFEST})
    if unlisted:
        raise ArtifactError(f"{location}: {unlisted[:5]} not listed in its manifest; nothing unlisted is read")
    data = {}
    for n, digest in manifest["files"].items():
        b = read_bytes(join(location, n))
        if b is None:
            raise ArtifactError(f"{join(location, n)}: missing")
        if hashlib.sha256(b).hexdigest() != digest:
            raise ArtifactError(f"{join(location, n)}: sha256 mismatch (modified or truncated)")
        data[n] = b
    return manifest, data


def _check_signature(manifest: dict[str, Any], where: str) -> None:
    key = signing_key()
    if key is None:
        return
    signature = manifest.get("signature")
    kept = ("; it is left in place and nothing resumes from it: remove it once looked into, or run the job "
            "under a new --job-id")
    if not isinstance(signature, str):
        raise UntrustedCheckpoint(f"{where}: not signed, and {SIGNING_KEY_ENV} is set: this cluster's jobs sign their "
                                  f"checkpoints, so this one was written by something else or before the key was "
                                  f"set{kept}")
    if not hmac.compare_digest(signature, manifest_signature(manifest, key)):
        raise UntrustedCheckpoint(f"{where}: the signature does not match (the checkpoint was changed, or signed "
                                  f"with another key){kept}")


def latest(root: str, say: Callable[[str], None] = lambda s: None) -> str | None:
    """The newest checkpoint under ``root`` that verifies; torn or tampered ones are skipped,
    each with a line through ``say``. None where there is none.

    Raises:
        UntrustedCheckpoint: the newest complete checkpoint is unsigned or signed otherwise while
            a signing key is set (never skipped for an older one: the job fails).
    """
    for step, location in _list_steps(root):
        try:
            _read_verified(location)
        except UntrustedCheckpoint:
            raise
        except ArtifactError as e:
            say(f"checkpoint of step {step} skipped: {e}")
            continue
        return location
    return None


def load(location: str) -> Checkpoint:
    """Read and verify one checkpoint; tensors through safetensors, state through JSON.

    Raises:
        ArtifactError: the checkpoint does not verify (see :func:`_read_verified`).
    """
    from safetensors.torch import load as load_tensors

    manifest, data = _read_verified(location)
    return Checkpoint(location, int(manifest["step"]), _state(data[STATE_JSON], location),
                      load_tensors(data[STATE_TENSORS]), data[METRICS].decode())


def latest_state(root: str) -> CheckpointState | None:
    """state.json of the newest complete checkpoint under ``root`` (no tensors read), or None."""
    location = latest(root)
    if location is None:
        return None
    return _state(read_bytes(join(location, STATE_JSON)) or b"{}", location)


def _state(raw: bytes, location: str) -> CheckpointState:
    where = join(location, STATE_JSON)
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None
    return CheckpointState.from_json(parsed, where)


def check_same_spec(recorded: dict[str, Any], spec_dict: dict[str, Any], what: str) -> None:
    """Refuse to continue ``what`` (a checkpoint or an artifact of this job id) under a spec
    that trains something else.

    Raises:
        SpecChanged: naming every field that differs.
    """
    if spec_digest(recorded) == spec_digest(spec_dict):
        return
    # A spec recorded before a field was added lacks it: with today's defaults filled in, it may match.
    defaults = JobSpec(name=str(recorded.get("name", "job"))).to_dict()
    recorded = {**defaults, **{k: ({**defaults[k], **v} if isinstance(v, dict) and isinstance(defaults.get(k), dict)
                                   else v) for k, v in recorded.items()}}
    if spec_digest(recorded) == spec_digest(spec_dict):
        return
    diffs = spec_differences(recorded, spec_dict)
    raise SpecChanged(f"{what} was made by a different spec ({'; '.join(diffs[:10])}"
                      f"{'; ...' if len(diffs) > 10 else ''}): a job id is bound to what it trains. Resubmit with "
                      f"the original spec to resume, or use a new --job-id")
