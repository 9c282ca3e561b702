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
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from lora_dist import safejson
from lora_dist.confine import URI_RE, confine, private_dir, under
from lora_dist.errors import ArtifactError, JobError
from lora_dist.records import ADAPTER_FORMAT as FORMAT
from lora_dist.records import Manifest
from lora_dist.signing import SIGNING_KEY_ENV, manifest_signature, signing_key  # noqa: F401 (re-exported)

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
    a URI, where the artifact is staged before :func:`publish` uploads it: under a directory of
    this user's own (:func:`make_work_dir` makes it private), never one another user could make first."""
    if is_uri(output_dir):
        return Path(tempfile.gettempdir()) / f"lora-dist-work-{os.getuid()}" / run_name(name, job_id)
    return Path(output_dir).expanduser() / f".{run_name(name, job_id)}.work"


def job_root(output_dir: str, cluster_root: str | None = None) -> str:
    """The place every file of a job goes under: its output.dir as :func:`confine` reads it, once,
    when the job starts (under ``cluster_root``, the output root, on a cluster); writers and
    deleters confine to it as they write. Raises JobError: outside ``cluster_root``, or refused."""
    return confine(output_dir, cluster_root)


def make_work_dir(output_dir: str, name: str, job_id: str, within: str | None = None) -> Path:
    """Create job ``job_id``'s :func:`work_dir` (if it is not there) and return it: under the
    job's root ``within`` for a local output.dir; private to this user (mode 0700) for a URI's
    node-local staging.

    Raises:
        JobError: the directory is outside ``within``, or a staging directory of another user's.
    """
    work = work_dir(output_dir, name, job_id)
    if is_uri(output_dir):
        return private_dir(work)
    confine(work, within)
    work.mkdir(parents=True, exist_ok=True)
    return work


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

    Yields a hidden sibling (``.<name>.<pid>-<random>.partial``: one per call, so that writers of
    the same ``final``, in processes or threads, never share it) to fill. When the block ends, its files and the directory
    are flushed to disk, it is renamed to ``final`` and the parent flushed, so that a crash
    leaves either no ``final`` or a complete one. If the block raises, the partial directory is
    removed and ``final`` untouched.

    Args:
        final: the directory to create.
        replace: drop an existing ``final`` just before the rename (else the rename fails on one).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.parent / f".{final.name}.{os.getpid()}-{os.urandom(4).hex()}.partial"
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


def remove_tree(location: str, within: str | None = None) -> None:
    """Remove a directory at a path or URI, and everything in it; nothing where there is none.

    Raises:
        JobError: the directory is not under ``within`` (:func:`confine`); nothing is removed.
    """
    confine(location, within)
    if not is_uri(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    try:
        fs, base = filesystem(location)
        fs.delete_dir(base)
    except (OSError, ValueError):
        pass


def upload(files: dict[str, bytes | Path], uri: str, within: str | None = None) -> None:
    """Write ``files`` (name -> bytes, or a local file streamed) into a directory at a URI, in
    their order: object stores have no rename, so whoever needs "complete or not at all" writes
    the file that says complete last.

    Raises:
        JobError: the directory is not under ``within`` (:func:`confine`); nothing is written.
    """
    confine(uri, within)
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
    return _manifest_json(_manifest_bytes(artifact), str(artifact / MANIFEST_FILE))  # bytes: not UTF-8 is a clear error


def _manifest_bytes(artifact: Path) -> bytes:
    path = artifact / MANIFEST_FILE
    if not artifact.is_dir():
        raise ArtifactError(f"{artifact}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: not a complete lora-dist artifact")
    return _manifest_at(str(artifact))


MANIFEST_LIMIT = 16 << 20  # a manifest lists a few files and the spec: a few kB


def _manifest_at(location: str) -> bytes:
    with _open_listed(location, MANIFEST_FILE) as (f, size):
        if size > MANIFEST_LIMIT:
            raise ArtifactError(f"{join(location, MANIFEST_FILE)}: {size} bytes, more than a manifest "
                                f"holds ({MANIFEST_LIMIT})")
        return f.read(size)


def _manifest_json(source: str | bytes | Path, where: str) -> dict[str, Any]:
    """The manifest's JSON object as written (its signature is over exactly this), from its text
    or its file (bounded in size and nesting: safejson)."""
    try:
        manifest = safejson.read(source, MANIFEST_LIMIT) if isinstance(source, Path) else \
            safejson.loads(source, MANIFEST_LIMIT)
    except (OSError, ValueError) as e:  # a file not UTF-8 included
        raise ArtifactError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{where}: not a {FORMAT} manifest")
    return manifest


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
    return verify_with_digest(artifact, digest)[0]


def verify_with_digest(artifact: Path, digest: str | None = None) -> tuple[Manifest, str]:
    """:func:`verify_artifact`, and the sha256 of the manifest it checked: read once, so that the
    digest reported is that of the manifest verified, never of one that replaced it since."""
    artifact = Path(artifact)
    data = _manifest_bytes(artifact)
    manifest = check_manifest(data, str(artifact / MANIFEST_FILE), digest)
    _refuse_unlisted(str(artifact), [p.name for p in artifact.iterdir()], manifest)
    for name, sha in manifest.files.items():
        copy_listed(str(artifact), name, sha)
    return manifest, "sha256:" + hashlib.sha256(data).hexdigest()


def _refuse_unlisted(location: str, names: list[str], manifest: Manifest) -> None:
    if unlisted := sorted(set(names) - set(manifest.files) - {MANIFEST_FILE}):
        raise ArtifactError(f"{location}: {unlisted[:5]} not listed in the manifest; an artifact holds only "
                            f"the files its manifest lists")


def check_manifest(data: bytes, where: str, digest: str | None = None) -> Manifest:
    """The manifest in ``data`` (the bytes of ``where``), checked as :func:`verify_artifact` checks
    it before any file: its sha256 against ``digest``, its signature where a key is set, the files
    an artifact must list, each a plain name.

    Raises:
        ArtifactError: naming what does not match.
    """
    import hmac

    key = signing_key()  # first: a set-but-empty key is refused whatever the manifest
    if digest is not None and (actual := "sha256:" + hashlib.sha256(data).hexdigest()) != digest:
        raise ArtifactError(f"{where}: sha256 is {actual}, expected {digest}: the manifest was replaced")
    raw = _manifest_json(data, where)
    if key is not None:  # over the JSON object as written, before it is read as a record
        signature = raw.get("signature")
        if not isinstance(signature, str):
            raise ArtifactError(f"{where}: not signed, and {SIGNING_KEY_ENV} is set")
        if not hmac.compare_digest(signature, manifest_signature(raw, key)):
            raise ArtifactError(f"{where}: the signature does not match (the manifest was "
                                f"changed, or signed with another key)")
    manifest = Manifest.from_json(raw, where)
    required_files = (FULL_MODEL_FILE,) if manifest.kind == "full" else (ADAPTER_FILE, CONFIG_FILE)
    for required in required_files:
        if required not in manifest.files:
            raise ArtifactError(f"{where}: does not list {required}")
    for name in manifest.files:
        if Path(name).name != name or name in (".", "..", MANIFEST_FILE):
            raise ArtifactError(f"{where}: file name {name!r} is not a plain name")
    return manifest


@contextmanager
def _open_listed(location: str, name: str) -> Iterator[tuple[Any, int]]:
    """(binary stream, size) of the file ``name`` in the directory at a path or URI, opened only
    if it is a regular file: never through a symlink (O_NOFOLLOW), never a FIFO or a device,
    whose reads could block or never end.

    Raises:
        ArtifactError: it is missing, a link, or not a regular file.
    """
    where = join(location, name)
    local = confine(location) if is_uri(location) and location.lower().startswith("file://") else location
    if is_uri(local):
        import pyarrow.fs as pafs

        fs, base = filesystem(local)
        info = fs.get_file_info(f"{base}/{name}")
        if info.type != pafs.FileType.File:
            raise ArtifactError(f"{where}: {'missing' if info.type == pafs.FileType.NotFound else 'not a file'}")
        with fs.open_input_stream(f"{base}/{name}") as f:
            yield f, info.size
        return
    try:  # O_NONBLOCK: opening a FIFO does not wait for a writer; it is refused below
        fd = os.open(Path(local) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ArtifactError(f"{where}: missing") from None
    except OSError as e:  # ELOOP: the last component is a symlink
        raise ArtifactError(f"{where}: cannot be opened as a plain file ({e.strerror}; a symlink is never "
                            f"followed)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ArtifactError(f"{where}: not a regular file (a directory, FIFO or device is never read as "
                                f"part of an artifact)")
        yield f, st.st_size


def copy_listed(location: str, name: str, sha: str, dest: Path | None = None) -> None:
    """Read the listed file ``name`` of the artifact at ``location`` (:func:`_open_listed`), no
    more than its size, checking its sha256 as it is read; with ``dest``, write it there as read.

    Raises:
        ArtifactError: the file is not a regular file, changed size while read, or fails its sha256.
    """
    where = join(location, name)
    h, n = hashlib.sha256(), 0
    with _open_listed(location, name) as (f, size), (open(dest, "xb") if dest else nullcontext()) as o:
        while n <= size and (block := f.read(min(1 << 22, size + 1 - n))):
            n += len(block)
            h.update(block)
            if o is not None:
                o.write(block)
    if n != size:
        raise ArtifactError(f"{where}: {n if n <= size else 'more than ' + str(size)} bytes read where its size "
                            f"is {size} (it changed while read)")
    if h.hexdigest() != sha:
        raise ArtifactError(f"{where}: sha256 mismatch (modified or truncated)")


# --- moving artifacts -----------------------------------------------------------------------------

def publish(local_artifact: Path, uri: str, within: str | None = None) -> str:
    """Upload a finished local artifact to a URI, manifest last: without it nothing looks complete.

    Raises:
        JobError: an artifact of that name already exists there, or it is not under ``within``.
    """
    dest = join(uri, local_artifact.name)
    confine(dest, within)
    if read_bytes(join(dest, MANIFEST_FILE)) is not None:
        raise JobError(f"{dest} already exists; an artifact is never overwritten")
    files = sorted((p for p in local_artifact.iterdir() if p.is_file()), key=lambda p: p.name == MANIFEST_FILE)
    upload({f.name: f for f in files}, dest, within)
    return dest


def fetch(location: str, out: Path, digest: str | None = None) -> Path:
    """Copy an artifact (local path or URI) to ``out``: its manifest, checked first (with
    ``digest``, what the job recorded when it published, its sha256 too), then only the files it
    lists, each a regular file read no further than its size and checked against its sha256 as it
    is copied (:func:`copy_listed`); the copy appears at ``out`` only once all have passed.

    Raises:
        JobError: ``out`` exists, or the source is not a complete artifact.
        ArtifactError: a file fails verification (the copy is removed).
    """
    out = Path(out)
    if out.exists():
        raise JobError(f"{out} already exists; fetch never overwrites (choose another --out)")
    where = join(location, MANIFEST_FILE)
    try:
        data = _manifest_at(location)
    except (ArtifactError, OSError, ValueError) as e:
        raise JobError(f"{location}: no readable {MANIFEST_FILE} ({e}): not a complete artifact"
                       f"{'' if is_uri(location) else ' (or not reachable from here)'}") from None
    try:
        manifest = check_manifest(data, where, digest)
        _refuse_unlisted(location, list_dir(location), manifest)
        with atomic_dir(out) as partial:  # only the listed files, each checked as it is copied
            (partial / MANIFEST_FILE).write_bytes(data)
            for name, sha in manifest.files.items():
                copy_listed(location, name, sha, partial / name)
    except ArtifactError as e:
        raise ArtifactError(f"{e}; the artifact was changed since it was published, and nothing was "
                            f"fetched") from None
    except OSError:  # the rename: another fetch to the same out finished first
        if not out.exists():
            raise
        mine = "sha256:" + hashlib.sha256(data).hexdigest()
        try:
            verify_artifact(out, digest=mine)
        except ArtifactError:
            raise JobError(f"{out} appeared while this fetch ran and holds another artifact; nothing was "
                           f"overwritten") from None
    return out


# --- the roots a job's files go under -------------------------------------------------------------

def output_root() -> Path:
    """Where a cluster's local artifacts may go: $LORA_DIST_OUTPUT_ROOT, else the current directory."""
    return Path(os.environ.get("LORA_DIST_OUTPUT_ROOT") or os.getcwd()).expanduser().resolve()


def data_roots() -> list[str]:
    """Where a job on a cluster may read local data: the directories of $LORA_DIST_DATA_ROOT
    (one, or several separated by ':'), else the output root; each resolved."""
    roots = [r for r in os.environ.get("LORA_DIST_DATA_ROOT", "").split(os.pathsep) if r]
    return [str(Path(r).expanduser().resolve()) for r in roots] or [str(output_root())]


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
    if is_uri(output_dir) and output_dir.split("://", 1)[0].lower() != "file":
        return None
    root = output_root()
    try:
        target = confine(output_dir)  # the place pyarrow or the OS will write: decoded, symlinks resolved
    except JobError as e:
        return f"output.dir: {e}"
    if under(target, str(root)):
        return None
    why = ("" if os.environ.get("LORA_DIST_OUTPUT_ROOT") else
           "; LORA_DIST_OUTPUT_ROOT is not set here, so the root is the working directory: start Ray with "
           "it set, e.g. LORA_DIST_OUTPUT_ROOT=/mnt/shared ray start ...")
    return (f"output.dir: {target} is outside the output root {root} (use a directory under it, "
            f"or a storage URI{why})")
