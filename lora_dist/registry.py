"""The embedded default's registry: one record per job under ``<cache>/jobs/`` (``<run>.json``),
its log (``<run>.log``), and ``<run>.lock``, held (flock) by the one process running that job.

A record holds the job's state, the pids of the process that submitted it and of the job's own
process, each with its start time (a pid alone may name another process by now: after a reboot,
or once the job's processes have ended), its spec digest and output.dir (kept from the job id's
first submission: ``BINDING``), its log, artifact and manifest digest: what ``status``, ``logs``,
``stop``, ``list`` and ``fetch`` read from any process. Its writers are in ``embedded.py``: the
job's supervisor, and ``stop`` adding its request. A record that does not read as one (empty, cut
off) is a JobError naming its file, never a traceback.
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


# What a job id's first submission binds it to; a resubmit keeps them (jobs.check_binding refuses
# one that differs).
BINDING = ("spec_digest", "output_dir")


def record(job_id: str, **fields: Any) -> None:
    """Update fields of a job's record (created if missing, or started afresh if unreadable)."""
    path = _record_path(job_id)
    try:
        data = _read(path, job_id) or {"job_id": job_id}
    except JobError:
        data = {"job_id": job_id}
    data.update(fields)
    _write_record(path, data)


def new_record(job_id: str, **fields: Any) -> dict[str, Any] | None:
    """Start a job's record afresh and return the one it replaces (None if there was none).

    A resubmit of a job id is a new run: what an earlier run left (its stop request, error,
    artifact, digest) must not describe this one: a stop request that outlived its run turned
    the next run's genuine failure into "stopped by the user". What the first submission bound
    the job id to (``BINDING``) stays."""
    path = _record_path(job_id)
    try:
        previous = _read(path, job_id)
    except JobError:
        previous = None
    kept = {k: previous[k] for k in BINDING if previous and previous.get(k) is not None}
    _write_record(path, {"job_id": job_id, **fields, **kept})
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
    """A job's record, or None.

    Raises:
        JobError: the record's file is there but does not read as a record (empty, cut off).
    """
    return _read(_record_path(job_id), job_id)


def _read(path: Path, job_id: str) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"the record of job {job_id} ({path}) cannot be read: {e}") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        what = "empty" if not text.strip() else "not a JSON object (cut off?)"
        raise JobError(f"the record of job {job_id} ({path}) is {what}: the job cannot be followed from here; "
                       f"remove the file to submit its job id afresh") from None
    return data


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22; psutil's
    create_time elsewhere), or None if there is no such process. With the pid, it names one process:
    a pid is reused once its process has ended."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return float(stat[stat.rindex(")") + 2:].split()[19])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # noqa: BLE001 - psutil missing, or no such process
        return None


def same_process(pid: int | None, started: float | None) -> bool:
    """True while the process recorded as (``pid``, ``started``) runs. A record written before
    start times were kept (``started`` None) falls back to the pid alone."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:  # 0 or -N: a process group to os.kill
        return False
    if started is None:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    return process_start(pid) == started


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
    """A job's record.

    Raises:
        JobError: there is none, or it does not read as one.
    """
    data = read_record(job_id)
    if data is None:
        raise JobError(f"no job {job_id} on the embedded default (known: lora-dist list); for a cluster job "
                       f"pass --address or set RAY_ADDRESS")
    return data


def stop_requested(job_id: str) -> bool:
    try:
        return bool(require_record(job_id).get("stop_requested"))
    except JobError:
        return False
