"""The embedded default: each job on a local Ray of its own, in a process that this one starts,
watches and records; a registry under ``<cache>/jobs/`` lets any process find it.

    submitting process                                    the job's process
    ------------------                                    -----------------
    holds <registry>/<run>.lock (flock)                   python -m lora_dist.embedded
    a supervisor thread: spawns the job's process,  --->  own process group; dies with its
      watches the Ray it starts (raylet, GCS),            parent; checks the model, runs the job
      writes the job's record                       <---  one JSON line: how it ended (a pipe)

Ray's core worker ends a driver whose raylet died with _exit(1), past every Python handler, so
only a process outside the job can still say what happened: the supervisor is the one watcher
of the job's Ray and the one writer of its record (``stop`` adds only its request) in the
registry (``registry.py``), which ``status``, ``logs``, ``stop``, ``list`` and ``fetch`` read.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from lora_dist.errors import ArtifactError, JobError, JobFailed, ModelError, SettingError
from lora_dist.jobs import TERMINAL, JobStatus, binding, check_binding, progress, quiet_libraries, until_ended
from lora_dist.registry import lock_job, new_record, process_start, read_record, record, registry_dir, \
    require_record, restore_record, same_process, stop_requested
from lora_dist.spec import JobSpec, SpecError, spec_from_dict
from lora_dist.store import run_name

RAY_CORE = ("raylet", "gcs_server")
# After the local Ray is known lost, the job's process gets this long to end by itself (a lost GCS
# leaves the driver waiting ~60 s for it to come back) before it and its processes are killed.
RAY_LOST_GRACE_S = 15.0
# ray.shutdown() reaps the raylet and GCS within milliseconds of ending them; one that stays dead
# and unreaped this long died under the job (killed, out of memory).
UNREAPED_S = 1.0
POLL_S = 0.25  # as often as the supervisor looks at the job's processes (its report wakes it at once)
LOG_CHUNK = 1 << 20  # what `logs` reads of a local log at a time


class EmbeddedJobs:
    """Jobs on this machine, each on an embedded local Ray (the backend without an address).

    Args:
        attached: as ``lora-dist submit`` runs a job: its output also on this process's stdout
            and stderr, and an interrupt (Ctrl-C, SIGTERM) while :meth:`wait` runs stops it.
    """

    def __init__(self, attached: bool = False) -> None:
        self.attached = attached
        self._supervisors: dict[str, _Supervisor] = {}

    def submit(self, spec: JobSpec, job_id: str, source: str | None = None) -> str:
        """Start ``spec`` as job ``job_id`` under this process and return its run name at once.

        A spec that the job id's first submission does not bind (another output.dir or trained
        field: ``jobs.check_binding``) starts nothing and leaves the record as it was; :meth:`wait`
        raises its SpecError, as for any job refused before it ran.

        Raises:
            JobError: another process runs this job id now; its record cannot be read.
        """
        from lora_dist.launch import recorded_spec

        sid, spec = run_name(spec.name, job_id), spec.with_absolute_paths()
        lock = lock_job(sid)  # before anything is written or started; held until the job has ended
        supervisor = _Supervisor(spec, job_id, sid, lock, self.attached)
        try:
            check_binding(sid, job_id, read_record(sid), spec, lambda: recorded_spec(spec, job_id))
        except SpecError as e:
            supervisor.refused(e)
        except BaseException:
            lock.close()
            raise
        else:
            supervisor.start_job()
        self._supervisors[sid] = supervisor
        return sid

    def status(self, job_id: str) -> JobStatus:
        r = require_record(job_id)
        state = r.get("state", "PENDING")
        if state in ("PENDING", "RUNNING") and not same_process(r.get("pid"), r.get("pid_started")):
            state = "FAILED"
            r["message"] = "the submitting process is gone"
        step, loss = progress(r.get("output_dir"), r.get("name"), r.get("job"), finished=state == "SUCCEEDED")
        done = state == "SUCCEEDED"
        return JobStatus(job_id, state, step, r.get("max_steps"), loss, r.get("artifact") if done else None,
                         r.get("message"), manifest=r.get("manifest_digest") if done else None)

    def logs(self, job_id: str, follow: bool) -> Iterator[str]:
        r = require_record(job_id)
        log = Path(r.get("log", ""))
        if not log.is_file():
            return
        with open(log, errors="replace") as f:
            while True:
                chunk = f.read(LOG_CHUNK)  # streamed: a long log is never held whole
                if chunk:
                    yield chunk
                elif not follow or self.status(job_id).state in TERMINAL:
                    while rest := f.read(LOG_CHUNK):
                        yield rest
                    return
                else:
                    time.sleep(0.5)

    def stop(self, job_id: str, timeout: float = 120) -> str:
        """Ask the job to stop (SIGINT: it stops Ray and is recorded STOPPED); kill it if it has not
        stopped within ``timeout`` seconds. Returns the state it ended in."""
        st = self.status(job_id)
        if st.state in TERMINAL:
            return st.state
        driver = self._interrupt(job_id)
        st = until_ended(self.status, job_id, timeout)
        if st.state not in TERMINAL and driver and same_process(*driver):
            _signal(driver[0], signal.SIGKILL)  # its supervisor records it STOPPED
            st = until_ended(self.status, job_id, 30)
        return st.state

    def list(self) -> list[JobStatus]:
        out = []
        for p in sorted(registry_dir().glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                out.append(self.status(p.stem))
            except (JobError, ValueError, KeyError):
                continue
        return out

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        """The job's status once it has ended, or when ``timeout`` seconds have passed.

        Raises:
            SpecError, ModelError, DataError, JobError: the job, started by this process, was
                refused (its record is as before) or ended on bad input.
        """
        supervisor = self._supervisors.get(job_id)
        if supervisor is None:  # started by another process: its record says when it ends
            return until_ended(self.status, job_id, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        routed = self.attached and threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGTERM, signal.default_int_handler) if routed else None
        try:
            while not supervisor.done.is_set() and (deadline is None or time.monotonic() < deadline):
                try:  # not Thread.join: in Python 3.11 an interrupted join marks a running thread stopped
                    supervisor.done.wait(0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic())))
                except KeyboardInterrupt:
                    if not self.attached:
                        raise
                    self._interrupt(job_id)  # the job stops and records it; keep waiting for that
        finally:
            if routed:
                signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
        if supervisor.done.is_set() and supervisor.error is not None:
            raise supervisor.error
        return self.status(job_id)

    def _interrupt(self, job_id: str) -> tuple[int, float | None] | None:
        """Record the stop request, then SIGINT the job's process (Ray installs signal handlers of
        its own and may turn the interrupt into another error: the record says what it was). Only
        the process recorded, pid and start time, is signalled: its pid may be another's by now.
        Returns (its pid, its start time), or None when it is not running."""
        r = require_record(job_id)
        driver = (r.get("driver_pid"), r.get("driver_started"))
        record(job_id, stop_requested=True)
        if not same_process(*driver):
            return None
        _signal(driver[0], signal.SIGINT)
        return driver


# --- the supervisor: in the submitting process -----------------------------------------------------

class _Supervisor(threading.Thread):
    """Spawns the job's process, watches it and the Ray it starts, and records how it ended."""

    def __init__(self, spec: JobSpec, job_id: str, sid: str, lock, echo: bool) -> None:
        super().__init__(name=f"lora-dist {sid}", daemon=True)
        self.spec, self.job_id, self.sid, self.lock, self.echo = spec, job_id, sid, lock, echo
        self.error: BaseException | None = None  # raised by wait(): a refusal or bad input
        self.done, self._spawned = threading.Event(), threading.Event()
        self._log = registry_dir() / f"{sid}.log"

    def refused(self, e: BaseException) -> None:
        """End before anything started: ``e`` is what wait() raises."""
        self.lock.close()
        self.error = e
        self.done.set()
        self._spawned.set()

    def start_job(self) -> None:
        """Start the thread; return once the job's process exists (or raise why it does not)."""
        try:
            self.start()
        except BaseException:
            self.lock.close()
            raise
        self._spawned.wait()
        if self.done.is_set() and self.error is not None:
            raise self.error

    def run(self) -> None:
        try:
            # The thread that spawns the job's process is its parent for PR_SET_PDEATHSIG: this
            # one, which lives until the process has ended.
            proc, report, previous = self._spawn()
        except BaseException as e:  # noqa: BLE001 - handed to start_job
            self.error = e
            self.lock.close()
            self.done.set()
            self._spawned.set()
            return
        self._spawned.set()
        try:
            self._finish(*self._watch(proc, report), previous)
        except BaseException as e:  # noqa: BLE001 - a thread has nobody else to tell
            self.error = e
            record(self.sid, state="FAILED", message=f"its supervisor failed: {type(e).__name__}: {e}"[:300])
        finally:
            os.close(report)
            self.lock.close()
            self.done.set()

    def _spawn(self) -> tuple[subprocess.Popen, int, dict | None]:
        spec = self.spec
        read, write = os.pipe()
        out = None if self.echo else open(self._log, "a")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)}
        if out is not None:
            env["PYTHONUNBUFFERED"] = "1"  # the log shows each line as it is written
        try:
            proc = subprocess.Popen([sys.executable, "-m", "lora_dist.embedded", str(write), str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    pass_fds=(write,), process_group=0, env=env, text=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)
            if out is not None:
                out.close()
        previous = new_record(self.sid, state="RUNNING", pid=os.getpid(), pid_started=process_start(os.getpid()),
                              driver_pid=proc.pid, driver_started=process_start(proc.pid), name=spec.name,
                              job=self.job_id, max_steps=spec.train.max_steps, log=str(self._log),
                              started=time.time(), where="embedded", **binding(spec))
        try:
            with proc.stdin:
                proc.stdin.write(json.dumps({"spec": spec.to_dict(), "job_id": self.job_id, "sid": self.sid,
                                             "log": str(self._log), "echo": self.echo}))
        except BaseException:  # it did not start: as if never submitted
            proc.kill()
            proc.wait()
            os.close(read)
            restore_record(self.sid, previous)
            raise
        return proc, read, previous

    def _watch(self, proc: subprocess.Popen, report: int) -> tuple[dict | None, str | None, str | None, int]:
        """Wait for the job's process, reading its report and watching its raylet and GCS.

        Returns (its report or None, the Ray loss seen while it ran or None, the first of its Ray
        processes seen dead or None, its exit code)."""
        import psutil

        me = psutil.Process(proc.pid)
        tracked: dict[int, tuple[Any, str]] = {}
        dead: dict[int, float] = {}  # pid -> when first seen dead
        text, eof, lost, lost_at, tree = "", False, None, None, []
        while True:
            if eof or not select.select([report], [], [], POLL_S)[0]:
                time.sleep(POLL_S if eof else 0)
            else:
                data = os.read(report, 1 << 16)
                text, eof = text + data.decode(errors="replace"), not data
            try:
                tree = me.children(recursive=True) or tree
                for p in _core_children(me):
                    tracked.setdefault(p.pid, (p, p.name()))
            except psutil.Error:
                pass
            now = time.monotonic()
            for pid, (p, name) in tracked.items():
                if not _running(p):
                    dead.setdefault(pid, now)
                    if lost is None and _zombie(p) and now - dead[pid] >= UNREAPED_S:
                        lost, lost_at = _exited(name, pid), now
            if proc.poll() is not None:
                break
            if lost_at is not None and now - lost_at > RAY_LOST_GRACE_S:
                proc.kill()
                proc.wait()
                break
        text += _read_all(report)
        first = min(dead, key=dead.get) if dead else None
        gone = _exited(tracked[first][1], first) if first else None
        try:
            outcome = json.loads(text) if text.strip() else None
        except ValueError:  # cut off mid-line: it was killed while reporting
            outcome = None
        if lost or outcome is None:
            _kill_all(tree)  # what is left of the job's own Ray (its process tree only)
        return outcome, lost, gone, proc.returncode

    def _finish(self, outcome: dict | None, lost: str | None, gone: str | None, code: int,
                previous: dict | None) -> None:
        """Record how the job ended: the one writer of its state."""
        sid = self.sid
        if lost or (outcome is None and gone):
            self._say(f"error: the local Ray started for job {sid} stopped under it ({lost or gone}); rerun the "
                      f"same command with --job-id {self.job_id} to resume from its last checkpoint")
            record(sid, state="FAILED", ray_lost=lost or gone,
                   message=f"the local Ray started for this job stopped under it ({lost or gone})")
        elif outcome is None and stop_requested(sid):
            record(sid, state="STOPPED", message="killed after not stopping in time")
        elif outcome is None:
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            record(sid, state="FAILED", message=f"the job's process ended without a result ({how})")
            self._say(f"error: job {sid}: the job's process ended without a result ({how}); rerun the same "
                      f"command with --job-id {self.job_id} to resume from its last checkpoint")
        elif "refused" in outcome:  # before anything ran: the record is as it was
            restore_record(sid, previous)
            self.error = _error_from(outcome["refused"])
        else:
            error = outcome.pop("error", None)
            record(sid, **outcome)
            if error is not None:
                self.error = _error_from(error)

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, file=sys.stderr, flush=True)
        try:
            with open(self._log, "a") as f:
                f.write(text + "\n")
        except OSError:
            pass


def _exited(name: str, pid: int) -> str:
    return f"its {name} (pid {pid}) exited: killed, or out of memory"


def _read_all(fd: int) -> str:
    chunks = []
    while select.select([fd], [], [], 0)[0]:
        data = os.read(fd, 1 << 16)
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def _core_children(proc) -> list:
    """The raylet and GCS server among ``proc``'s children."""
    import psutil

    found = []
    for p in proc.children():
        try:
            if p.name() in RAY_CORE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _zombie(p) -> bool:
    """Dead and not reaped by its parent (the job's process)."""
    import psutil

    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_all(procs: list) -> None:
    """SIGKILL these processes (none of them this process's child: psutil would reap it)."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


# --- errors that cross from the job's process --------------------------------------------------------

def _bad_input() -> tuple[type, ...]:
    from lora_dist.sources import DataError

    return SpecError, ModelError, DataError, JobError, SettingError


def _error_payload(e: BaseException) -> dict[str, Any]:
    if isinstance(e, SpecError):
        return {"type": "SpecError", "problems": e.problems, "source": e.source}
    return {"type": type(e).__name__ if type(e) in _bad_input() else "JobError", "message": str(e)}


def _error_from(payload: dict[str, Any]) -> Exception:
    if payload["type"] == "SpecError":
        return SpecError(payload["problems"], payload["source"])
    kinds = {kind.__name__: kind for kind in _bad_input()}
    return kinds[payload["type"]](payload["message"])


# --- the job's process -------------------------------------------------------------------------------

class _Tee:
    """Write to the terminal and to the job's log file (Ray's worker logs arrive via print)."""

    def __init__(self, stream, path: str) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _job_process(report: int, parent: int) -> None:
    """``python -m lora_dist.embedded REPORT_FD PARENT_PID``, the spec on stdin: run the job, write
    one JSON line saying how it ended to REPORT_FD, then _exit."""
    outcome: dict[str, Any] = {"state": "FAILED", "message": "the job's process failed before it ran"}
    try:
        _die_with(parent)
        payload = json.loads(sys.stdin.read())
        quiet_libraries()
        outcome = _run(payload)
    except BaseException:  # noqa: BLE001 - a bug: said, and reported as the job's failure
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            os.write(report, (json.dumps(outcome) + "\n").encode())
        finally:
            os._exit(0)


def _die_with(parent: int) -> None:
    """Linux: SIGKILL this process when its supervisor's thread ends (with the submitting process);
    Ray's own processes die with this one."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)


def _run(payload: dict[str, Any]) -> dict[str, Any]:
    """Check the model, run the job; how it ended, as the supervisor records it."""
    from lora_dist.launch import run_job
    from lora_dist.store import digest_at
    from lora_dist.validate import validate_job

    sid, job_id = payload["sid"], payload["job_id"]
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    out, err = sys.stdout, sys.stderr
    try:
        spec = spec_from_dict(payload["spec"])
        validate_job(spec, "submit")
    except BaseException as e:  # noqa: BLE001 - sorted by _ended
        return _ended(e, sid, refused=True)
    print(f"job {sid} on an embedded local Ray (lora-dist status {sid})", flush=True)
    if payload["echo"]:
        sys.stdout, sys.stderr = _Tee(out, payload["log"]), _Tee(err, payload["log"])
    try:
        artifact = run_job(spec, job_id=job_id)
    except BaseException as e:  # noqa: BLE001 - sorted by _ended
        sys.stdout, sys.stderr = out, err
        return _ended(e, sid, refused=isinstance(e, SpecError))  # SpecError: another spec made this job id
    finally:
        sys.stdout, sys.stderr = out, err
    # the digest right away: it vouches for the artifact as published
    return {"state": "SUCCEEDED", "artifact": str(artifact), "manifest_digest": digest_at(str(artifact))}


def _ended(e: BaseException, sid: str, refused: bool) -> dict[str, Any]:
    if stop_requested(sid) or isinstance(e, KeyboardInterrupt):
        print(f"job {sid} stopped; no artifact was published", file=sys.stderr)
        return {"state": "STOPPED", "message": "stopped by the user"}
    if refused and isinstance(e, _bad_input()):
        return {"refused": _error_payload(e)}
    text = str(e).strip()
    outcome: dict[str, Any] = {"state": "FAILED", "message": text.splitlines()[-1][:300] if text else type(e).__name__}
    if isinstance(e, _bad_input()):
        outcome["error"] = _error_payload(e)  # the submitter raises it
    elif isinstance(e, (JobFailed, ArtifactError)):
        print(f"error: {e}", file=sys.stderr)
    else:
        import traceback

        traceback.print_exception(e)
    return outcome


if __name__ == "__main__":
    _job_process(int(sys.argv[1]), int(sys.argv[2]))
