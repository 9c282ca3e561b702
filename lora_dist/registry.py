"""The embedded default's registry: one record per job under ``<cache>/jobs/`` (``<run>.json``),
its log (``<run>.log``), and ``<run>.lock``, held (flock) by the one process running that job.

A record holds the job's state, the pid of the process that submitted it, its output.dir,
log, artifact and manifest digest: what ``status``, ``logs``, ``stop``, ``list`` and ``fetch``
read from any process. Its writers are in ``embedded.py``: the job's supervisor, and ``stop``
adding its request.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lora_dist.errors import JobError
from lora_dist.store import atomic_file, cache_root, check_job_id


def registry_dir() -> Path:
    d = cache_root() / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _record_path(job_id: str) -> Path:
    return registry_dir() / f"{check_job_id(job_id)}.json"


def record(job_id: str, **fields: Any) -> None:
    """Update fields of a job's record (created if missing)."""
    path = _record_path(job_id)
    data = json.loads(path.read_text()) if path.is_file() else {"job_id": job_id}
    data.update(fields)
    _write_record(path, data)


def new_record(job_id: str, **fields: Any) -> dict[str, Any] | None:
    """Start a job's record afresh and return the one it replaces (None if there was none).

    A resubmit of a job id is a new run: what an earlier run left (its stop request, error,
    artifact, digest) must not describe this one: a stop request that outlived its run turned
    the next run's genuine failure into "stopped by the user"."""
    path = _record_path(job_id)
    previous = json.loads(path.read_text()) if path.is_file() else None
    _write_record(path, {"job_id": job_id, **fields})
    return previous


def restore_record(job_id: str, previous: dict[str, Any] | None) -> None:
    """Put back the record :func:`new_record` replaced (for a submit refused before it ran)."""
    path = _record_path(job_id)
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        _write_record(path, previous)


def _write_record(path: Path, data: dict[str, Any]) -> None:
    atomic_file(path, json.dumps(data).encode())  # supervisors are threads: atomic_file's name has the thread's id


def read_record(job_id: str) -> dict[str, Any] | None:
    """A job's record, or None."""
    path = _record_path(job_id)
    return json.loads(path.read_text()) if path.is_file() else None


def lock_job(run: str):
    """Hold ``<registry>/<run>.lock`` (flock, non-blocking) for as long as the returned file stays
    open: one process runs a job id at a time. The kernel releases it when the holder exits,
    however it exits. The holder's pid is written in the file for the refusal message.

    Raises:
        JobError: another process holds it (naming the job and that process).
    """
    import fcntl

    path = registry_dir() / f"{check_job_id(run)}.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise JobError(f"job {run} is already running on the embedded default (pid {holder} holds {path}); "
                       f"follow it with `lora-dist logs -f {run}` or end it with `lora-dist stop {run}` "
                       f"before submitting it again") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def require_record(job_id: str) -> dict[str, Any]:
    path = _record_path(job_id)
    if not path.is_file():
        raise JobError(f"no job {job_id} on the embedded default (known: lora-dist list); for a cluster job "
                       f"pass --address or set RAY_ADDRESS")
    return json.loads(path.read_text())


def stop_requested(job_id: str) -> bool:
    try:
        return bool(require_record(job_id).get("stop_requested"))
    except JobError:
        return False
