"""Where artifacts live: a local path or a storage URI, job ids, publish, fetch, verify. No torch.

Every "is this a URI or a path" question in the package is answered here (:func:`is_uri`), and
so is the artifact's on-disk contract: its file names and the manifest of sha256 digests that
:func:`verify_artifact` checks. URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``, ...) go
through pyarrow's filesystems, which Ray already depends on.

    <output.dir>/<name>-<job id>/          the artifact (appears only when complete)
    <output.dir>/.<name>-<job id>.work/    a running job's metrics (local output.dir only)

Everything the package writes to a local directory appears whole or not at all: it is written
aside and renamed into place (:func:`atomic_dir`, :func:`atomic_file`). The roots a job's files
go under are here too: this machine's cache (:func:`cache_root`) and, on a cluster, the output
root a submitted job's local output.dir must be under (:func:`output_root_problem`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from lora_dist.errors import ArtifactError, JobError, SettingError
from lora_dist.records import ADAPTER_FORMAT as FORMAT
from lora_dist.records import Manifest

URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FULL_MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` locations (storage URIs), False for local paths."""
    return bool(URI_RE.match(str(location)))


def new_job_id() -> str:
    """A fresh job id: sortable by time, unique enough for one user's jobs."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


def check_job_id(job_id: str) -> str:
    """Return ``job_id`` if it can name a directory and a Ray submission, else raise JobError."""
    if not JOB_ID_RE.match(job_id) or ".." in job_id:
        raise JobError(f"job id {job_id!r} is not a job id (letters, digits, '.', '_', '-'; at most 128)")
    return job_id


def run_name(name: str, job_id: str) -> str:
    """``<name>-<job id>``: the artifact's directory, the Ray Train run and the Jobs API submission id."""
    return f"{name}-{job_id}"


def join(location: str, name: str) -> str:
    """``location/name`` for a path or a URI."""
    return f"{location.rstrip('/')}/{name}" if is_uri(location) else str(Path(location) / name)


def artifact_location(output_dir: str, name: str, job_id: str) -> str:
    """Where the artifact of job ``job_id`` of spec ``name`` appears under ``output_dir``."""
    return join(output_dir, run_name(name, job_id))


def work_dir(output_dir: str, name: str, job_id: str) -> Path:
    """A running job's directory (metrics, worker pids): beside its artifact for a local
    output.dir, so that ``status`` can read its progress; in a node-local temporary directory for
    a URI, where the artifact is staged before :func:`publish` uploads it."""
    if is_uri(output_dir):
        return Path(tempfile.gettempdir()) / "lora-dist-work" / run_name(name, job_id)
    return Path(output_dir).expanduser() / f".{run_name(name, job_id)}.work"


# --- a local directory or file: whole or not at all -----------------------------------------------

def fsync(path: Path) -> None:
    """Flush a file or directory to disk (before a rename that makes something look complete)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path, replace: bool = False) -> Iterator[Path]:
    """Write a directory aside, then rename it into place: ``final`` appears complete or not at all.

    Yields a hidden sibling (``.<name>.<pid>.partial``: one per process, so that processes writing
    the same ``final`` do not share it) to fill. When the block ends, its files and the directory
    are flushed to disk, it is renamed to ``final`` and the parent flushed, so that a crash
    leaves either no ``final`` or a complete one. If the block raises, the partial directory is
    removed and ``final`` untouched.

    Args:
        final: the directory to create.
        replace: drop an existing ``final`` just before the rename (else the rename fails on one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a stale one of a crashed earlier attempt
    partial.mkdir()
    try:
        yield partial
        for f in partial.iterdir():
            if f.is_file():
                fsync(f)
        fsync(partial)  # on disk before the rename makes it look complete
        if replace and final.exists():
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync(final.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def atomic_file(target: Path, data: bytes) -> None:
    """Write a file aside, then rename it over ``target``: readers see the old file or the new one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")  # threads too
    try:
        tmp.write_bytes(data)
        fsync(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(target.parent)


# --- a path or a URI: the one filesystem layer ---------------------------------------------------

def filesystem(uri: str):
    """(pyarrow filesystem, path on it) of a storage URI."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def read_bytes(location: str) -> bytes | None:
    """The bytes of a file at a path or URI; None where it does not exist or cannot be reached."""
    try:
        if not is_uri(location):
            return Path(location).read_bytes()
        fs, path = filesystem(location)
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def read_text(location: str) -> str | None:
    """The text of a file at a path or URI; None where it does not exist or cannot be reached."""
    data = read_bytes(location)
    return None if data is None else data.decode(errors="replace")


def list_dir(location: str, dirs_only: bool = False) -> list[str]:
    """The names in a directory at a path or URI (only subdirectories with ``dirs_only``); none
    where it does not exist or cannot be reached."""
    if not is_uri(location):
        d = Path(location)
        return [p.name for p in d.iterdir() if p.is_dir() or not dirs_only] if d.is_dir() else []
    import pyarrow.fs as pafs

    try:
        fs, base = filesystem(location)
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except (OSError, ValueError):
        return []
    return [i.base_name for i in infos if i.type == pafs.FileType.Directory or not dirs_only]


def remove_tree(location: str) -> None:
    """Remove a directory at a path or URI, and everything in it; nothing where there is none."""
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    try:
        fs, base = filesystem(location)
        fs.delete_dir(base)
    except (OSError, ValueError):
        pass


def upload(files: dict[str, bytes | Path], uri: str) -> None:
    """Write ``files`` (name -> bytes, or a local file streamed) into a directory at a URI, in
    their order: object stores have no rename, so whoever needs "complete or not at all" writes
    the file that says complete last."""
    fs, base = filesystem(uri)
    fs.create_dir(base, recursive=True)
    for name, data in files.items():
        with fs.open_output_stream(f"{base}/{name}") as o:
            if isinstance(data, bytes):
                o.write(data)
            else:
                with open(data, "rb") as f:
                    shutil.copyfileobj(f, o, 1 << 22)


# --- a job's work directory ---------------------------------------------------------------------

PROBE_FILE = "storage-probe"


def write_storage_probe(work_dir: Path) -> str:
    """Write a fresh token into a job's work directory (the driver does, where it makes the
    directory); every worker reads it back before training, so that a node which does not mount a
    local output.dir is found at once. Returns the token."""
    token = os.urandom(8).hex()
    (Path(work_dir) / PROBE_FILE).write_text(token)
    return token


# --- reading and verifying an artifact ----------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(artifact: Path) -> Manifest:
    """The manifest of a local artifact directory.

    Raises:
        ArtifactError: not a directory, no manifest, or not a lora-dist manifest.
    """
    return Manifest.from_json(_read_manifest_json(Path(artifact)), str(Path(artifact) / MANIFEST_FILE))


def parse_manifest(text: str, where: str) -> Manifest:
    """A manifest from its JSON text (read from a path or URI); ``where`` names it in errors.

    Raises:
        ArtifactError: not JSON, or not a lora-dist manifest.
    """
    return Manifest.from_json(_manifest_json(text, where), where)


def _read_manifest_json(artifact: Path) -> dict[str, Any]:
    path = artifact / MANIFEST_FILE
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: not a complete lora-dist artifact")
    return _manifest_json(path.read_text(), str(path))


def _manifest_json(text: str, where: str) -> dict[str, Any]:
    """The manifest's JSON object as written (its signature is over exactly this)."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{where}: not a {FORMAT} manifest")
    return manifest


SIGNING_KEY_ENV = "LORA_DIST_SIGNING_KEY"


def signing_key() -> bytes | None:
    """The HMAC key artifacts and checkpoints are signed and checked with (``$LORA_DIST_SIGNING_KEY``),
    if set.

    Raises:
        SettingError: the variable is set but empty or blank: that would silently mean "unsigned".
    """
    key = os.environ.get(SIGNING_KEY_ENV)
    if key is None:
        return None
    if not key.strip():
        raise SettingError(f"{SIGNING_KEY_ENV} is set but empty: artifacts and checkpoints would go unsigned and "
                           f"unchecked. Set it to the key, or unset it to work without signatures")
    return key.encode()


def manifest_signature(manifest: dict[str, Any], key: bytes) -> str:
    """HMAC-SHA256 over the manifest's canonical JSON (sorted keys, its ``signature`` left out)."""
    import hmac

    body = json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":"))
    return "hmac-sha256:" + hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


def manifest_digest(artifact: Path) -> str:
    """sha256 of the artifact's manifest.json bytes: one value that pins every file (the manifest
    lists each file's sha256), to be recorded and compared from outside the artifact."""
    return "sha256:" + sha256_file(Path(artifact) / MANIFEST_FILE)


def digest_at(artifact_location: str) -> str | None:
    """:func:`manifest_digest` of an artifact at a path or URI; None where it cannot be read."""
    data = read_bytes(join(str(artifact_location), MANIFEST_FILE))
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def verify_artifact(artifact: Path, digest: str | None = None) -> Manifest:
    """Check every file listed in the manifest against its sha256; return the manifest.

    The directory must hold nothing the manifest does not list. With ``digest``, the manifest
    itself must have that sha256 (:func:`manifest_digest`). With ``$LORA_DIST_SIGNING_KEY`` set,
    the manifest must carry a matching HMAC-SHA256 signature.

    Raises:
        ArtifactError: naming the first missing, truncated, modified or unlisted file, or the
            manifest's digest or signature that does not match.
    """
    import hmac

    artifact = Path(artifact)
    key = signing_key()
    raw = _read_manifest_json(artifact)
    if digest is not None and manifest_digest(artifact) != digest:
        raise ArtifactError(f"{artifact / MANIFEST_FILE}: sha256 is {manifest_digest(artifact)}, expected {digest}: "
                            f"the manifest was replaced")
    if key is not None:  # over the JSON object as written, before it is read as a record
        signature = raw.get("signature")
        if not isinstance(signature, str):
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: not signed, and {SIGNING_KEY_ENV} is set")
        if not hmac.compare_digest(signature, manifest_signature(raw, key)):
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: the signature does not match (the manifest was "
                                f"changed, or signed with another key)")
    manifest = Manifest.from_json(raw, str(artifact / MANIFEST_FILE))
    unlisted = sorted(p.name for p in artifact.iterdir() if p.name != MANIFEST_FILE and p.name not in manifest.files)
    if unlisted:
        raise ArtifactError(f"{artifact}: {unlisted[:5]} not listed in the manifest; an artifact holds only "
                            f"the files its manifest lists")
    required_files = (FULL_MODEL_FILE,) if manifest.kind == "full" else (ADAPTER_FILE, CONFIG_FILE)
    for required in required_files:
        if required not in manifest.files:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: does not list {required}")
    for name, digest in manifest.files.items():
        if Path(name).name != name:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: file name {name!r} is not a plain name")
        f = artifact / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch (modified or truncated)")
    return manifest


# --- moving artifacts -----------------------------------------------------------------------------

def publish(local_artifact: Path, uri: str) -> str:
    """Upload a finished local artifact to a URI, manifest last: without it nothing looks complete.

    Raises:
        JobError: an artifact of that name already exists there.
    """
    dest = join(uri, local_artifact.name)
    if read_bytes(join(dest, MANIFEST_FILE)) is not None:
        raise JobError(f"{dest} already exists; an artifact is never overwritten")
    files = sorted((p for p in local_artifact.iterdir() if p.is_file()), key=lambda p: p.name == MANIFEST_FILE)
    upload({f.name: f for f in files}, dest)
    return dest


def fetch(location: str, out: Path, digest: str | None = None) -> Path:
    """Copy an artifact (local path or URI) to ``out`` and verify every sha256, and with
    ``digest`` (what the job recorded when it published) the manifest's own; the copy appears at
    ``out`` only once it has passed.

    Raises:
        JobError: ``out`` exists, or the source is not a complete artifact.
        ArtifactError: a file fails verification (the copy is removed).
    """
    if out.exists():
        raise JobError(f"{out} already exists; fetch never overwrites (choose another --out)")
    if read_bytes(join(location, MANIFEST_FILE)) is None:
        if is_uri(location):
            raise JobError(f"{location}: no {MANIFEST_FILE}: not a complete artifact")
        raise JobError(f"{Path(location)}: no {MANIFEST_FILE}: not a complete artifact (or not reachable from here)")
    with atomic_dir(out) as partial:
        if is_uri(location):
            import pyarrow.fs as pafs

            pafs.copy_files(location, str(partial), destination_filesystem=pafs.LocalFileSystem())
        else:
            shutil.copytree(location, partial, dirs_exist_ok=True)
        try:
            verify_artifact(partial, digest=digest)
        except ArtifactError as e:
            raise ArtifactError(f"{location}: {e}; the artifact was changed since it was published, and nothing "
                                f"was fetched") from None
    return out


# --- the roots a job's files go under -------------------------------------------------------------

def output_root() -> Path:
    """Where a cluster's local artifacts may go: $LORA_DIST_OUTPUT_ROOT, else the current directory."""
    return Path(os.environ.get("LORA_DIST_OUTPUT_ROOT") or os.getcwd()).expanduser().resolve()


def cache_root() -> Path:
    """This machine's cache: the converted base model, fingerprints, the embedded-job registry."""
    return Path(os.environ.get("LORA_DIST_CACHE", Path.home() / ".cache" / "lora-dist")).expanduser()


def multi_node_storage_problem(output_dir: str, workers: int, shared: bool) -> str | None:
    """Why a job of ``workers`` workers cannot write to ``output_dir`` from several nodes, or None.

    Checkpoints, metrics and the artifact live under output.dir, and a restarted worker may land
    on any node: a plain local directory is seen by one node only, so a multi-node job needs a
    storage URI or a local dir declared ``output.shared: true`` (mounted by every node; workers
    check that they all see it before training).
    """
    if workers > 1 and not is_uri(output_dir) and not shared:
        return (f"output.dir: {output_dir} is a local directory, and this job's {workers} "
                f"workers may run on different nodes of the cluster, which would not see each other's "
                f"checkpoints: use a storage URI (s3://..., gs://...), or set output.shared: true if every "
                f"node mounts {output_dir} at the same path")
    return None


def output_root_problem(output_dir: str) -> str | None:
    """Why ``output_dir`` is not under the output root, or None: a local output.dir, or a
    ``file://`` one, must be under it (other storage URIs, on the scheme allow-list, are the
    storage's business: its credentials decide).

    The cluster side of a Jobs API submission checks this (``jobrun``): a spec sent to a shared
    cluster writes only under that cluster's ``LORA_DIST_OUTPUT_ROOT``. A job on the embedded
    default runs as the user on the user's machine and may write to any directory it can.
    """
    local = output_dir
    if is_uri(local):
        scheme, rest = local.split("://", 1)
        if scheme.lower() != "file":
            return None
        local = "/" + rest.lstrip("/")  # file:///a/b and file://a/b (no host) both name /a/b
    root = output_root()
    target = Path(local).expanduser().resolve()
    if target == root or root in target.parents:
        return None
    why = ("" if os.environ.get("LORA_DIST_OUTPUT_ROOT") else
           "; LORA_DIST_OUTPUT_ROOT is not set here, so the root is the working directory: start Ray with "
           "it set, e.g. LORA_DIST_OUTPUT_ROOT=/mnt/shared ray start ...")
    return (f"output.dir: {target} is outside the output root {root} (use a directory under it, "
            f"or a storage URI{why})")
