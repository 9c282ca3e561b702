"""Where artifacts live: a local path or a storage URI, job ids, publish, fetch, verify. No torch.

Every "is this a URI or a path" question in the package is answered here (:func:`is_uri`), and
so is the artifact's on-disk contract: its file names and the manifest of sha256 digests that
:func:`verify_artifact` checks. URIs (``s3://``, ``gs://``, ``hdfs://``, ``file://``, ...) go
through pyarrow's filesystems, which Ray already depends on.

    <output.dir>/<name>-<job id>/          the artifact (appears only when complete)
    <output.dir>/.<name>-<job id>.work/    a running job's metrics (local output.dir only)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_dist.errors import ArtifactError, JobError

URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FULL_MODEL_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
FORMAT = "lora-dist-adapter/1"


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


def fsync(path: Path) -> None:
    """Flush a file or directory to disk (before a rename that makes something look complete)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def read_manifest(artifact: Path) -> dict[str, Any]:
    """The parsed manifest of a local artifact directory.

    Raises:
        ArtifactError: not a directory, no manifest, or not a lora-dist manifest.
    """
    path = Path(artifact) / MANIFEST_FILE
    if not Path(artifact).is_dir():
        raise ArtifactError(f"{artifact}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: not a complete lora-dist artifact")
    return parse_manifest(path.read_text(), str(path))


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{where}: not a {FORMAT} manifest")
    return manifest


SIGNING_KEY_ENV = "LORA_DIST_SIGNING_KEY"


def signing_key() -> bytes | None:
    """The HMAC key artifacts are signed and checked with (``$LORA_DIST_SIGNING_KEY``), if set."""
    key = os.environ.get(SIGNING_KEY_ENV)
    return key.encode() if key else None


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


def read_bytes(location: str) -> bytes | None:
    """The bytes of a file at a path or URI; None where it does not exist or cannot be reached."""
    try:
        if not is_uri(location):
            return Path(location).read_bytes()
        import pyarrow.fs as pafs

        fs, path = pafs.FileSystem.from_uri(location)
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def digest_at(artifact_location: str) -> str | None:
    """:func:`manifest_digest` of an artifact at a path or URI; None where it cannot be read."""
    data = read_bytes(join(str(artifact_location), MANIFEST_FILE))
    return None if data is None else "sha256:" + hashlib.sha256(data).hexdigest()


def verify_artifact(artifact: Path, digest: str | None = None) -> dict[str, Any]:
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
    manifest = read_manifest(artifact)
    if digest is not None and manifest_digest(artifact) != digest:
        raise ArtifactError(f"{artifact / MANIFEST_FILE}: sha256 is {manifest_digest(artifact)}, expected {digest}: "
                            f"the manifest was replaced")
    key = signing_key()
    if key is not None:
        signature = manifest.get("signature")
        if not isinstance(signature, str):
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: not signed, and {SIGNING_KEY_ENV} is set")
        if not hmac.compare_digest(signature, manifest_signature(manifest, key)):
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: the signature does not match (the manifest was "
                                f"changed, or signed with another key)")
    unlisted = sorted(p.name for p in artifact.iterdir() if p.name != MANIFEST_FILE and p.name not in manifest["files"])
    if unlisted:
        raise ArtifactError(f"{artifact}: {unlisted[:5]} not listed in the manifest; an artifact holds only "
                            f"the files its manifest lists")
    required_files = (FULL_MODEL_FILE,) if manifest.get("kind") == "full" else (ADAPTER_FILE, CONFIG_FILE)
    for required in required_files:
        if required not in manifest["files"]:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: does not list {required}")
    for name, digest in manifest["files"].items():
        if Path(name).name != name:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: file name {name!r} is not a plain name")
        f = artifact / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch (modified or truncated)")
    return manifest


def read_text(location: str) -> str | None:
    """The text of a file at a path or URI; None where it does not exist or cannot be reached."""
    data = read_bytes(location)
    return None if data is None else data.decode(errors="replace")


# --- moving artifacts -----------------------------------------------------------------------------

def publish(local_artifact: Path, uri: str) -> str:
    """Upload a finished local artifact to a URI, manifest last: without it nothing looks complete.

    Raises:
        JobError: an artifact of that name already exists there.
    """
    import pyarrow.fs as pafs

    fs, base = pafs.FileSystem.from_uri(uri.rstrip("/"))
    dest = f"{base}/{local_artifact.name}"
    if fs.get_file_info(f"{dest}/{MANIFEST_FILE}").type != pafs.FileType.NotFound:
        raise JobError(f"{join(uri, local_artifact.name)} already exists; an artifact is never overwritten")
    fs.create_dir(dest, recursive=True)
    files = sorted(p for p in local_artifact.iterdir() if p.is_file())
    for f in sorted(files, key=lambda p: p.name == MANIFEST_FILE):
        with fs.open_output_stream(f"{dest}/{f.name}") as o:
            o.write(f.read_bytes())
    return join(uri, local_artifact.name)


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
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        if is_uri(location):
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(location)
            if fs.get_file_info(f"{path}/{MANIFEST_FILE}").type == pafs.FileType.NotFound:
                raise JobError(f"{location}: no {MANIFEST_FILE}: not a complete artifact")
            partial.mkdir()  # pyarrow copies into an existing directory only
            pafs.copy_files(location, str(partial), destination_filesystem=pafs.LocalFileSystem())
        else:
            src = Path(location)
            if not (src / MANIFEST_FILE).is_file():
                raise JobError(f"{src}: no {MANIFEST_FILE}: not a complete artifact (or not reachable from here)")
            shutil.copytree(src, partial)
        try:
            verify_artifact(partial, digest=digest)
        except ArtifactError as e:
            raise ArtifactError(f"{location}: {e}; the artifact was changed since it was published, and nothing "
                                f"was fetched") from None
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
