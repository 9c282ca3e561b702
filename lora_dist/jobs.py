"""Ray Jobs API client: submit, status, logs, stop, list, fetch; and the local job registry.

Remote jobs (``--address`` or ``RAY_ADDRESS``) go through Ray's Jobs API with token
authentication (Ray 2.60 turns it on for local clusters; DESIGN.md decision 5). The entrypoint is
the constant :data:`ENTRYPOINT`; the spec travels as a JSON data file in the job's
``working_dir``; only allow-listed ``runtime_env`` keys are passed through.

Jobs on the embedded default run in the submitting process; they are recorded in a registry
under ``<cache>/jobs/`` (state, pid, progress file, log file, artifact) so that ``status``,
``logs``, ``stop`` and ``list`` work for them too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_dist.jobrun import ARTIFACT_PREFIX, WORKER_ENV
from lora_dist.spec import RUNTIME_ENV_KEYS as ALLOWED_RUNTIME_ENV_KEYS
from lora_dist.spec import JobSpec, cache_root

ENTRYPOINT = "python -m lora_dist.jobrun job-spec.json"
SPEC_FILE = "job-spec.json"
METADATA_TAG = "lora-dist"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
RAY_PREFIX_RE = re.compile(r"^(\x1b\[[0-9;]*m)?\([A-Za-z]+ pid=\d+(, ip=[0-9.]+)?\)(\x1b\[[0-9;]*m)?\s*")
STEP_RE = re.compile(r"step (\d+)/(\d+)\s+loss ([0-9.]+|nan)")


class JobError(RuntimeError):
    """A job cannot be found, reached or acted on; the message says which and why."""


@dataclass
class JobStatus:
    job_id: str
    state: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    artifact: str | None = None
    message: str | None = None
    where: str = "embedded"

    def line(self) -> str:
        parts = [f"{self.job_id}  {self.state}"]
        if self.step is not None:
            parts.append(f"step {self.step}/{self.total_steps}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.artifact:
            parts.append(f"artifact {self.artifact}")
        if self.message and self.state == "FAILED":
            parts.append(f"({self.message})")
        return "  ".join(parts)


def parse_progress(text: str) -> tuple[int | None, int | None, float | None, str | None]:
    """(step, total, loss, artifact) from a job's log text: its last progress line and artifact line."""
    step = total = loss = artifact = None
    for m in STEP_RE.finditer(text):
        step, total = int(m.group(1)), int(m.group(2))
        loss = float(m.group(3))
    for line in text.splitlines():
        if line.startswith(ARTIFACT_PREFIX):
            artifact = line[len(ARTIFACT_PREFIX):].strip()
    return step, total, loss, artifact


# --- remote: the Ray Jobs API ------------------------------------------------------------------

def _enable_token_auth() -> None:
    """Send the cluster token when one is available (Ray reads RAY_AUTH_TOKEN or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def client(address: str):
    """A JobSubmissionClient for ``address`` (http://host:8265 or ray://...)."""
    from ray.job_submission import JobSubmissionClient

    _enable_token_auth()
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, 401/403: say which and what to do
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {_short(e)}. Is the cluster up "
                       f"(ray start --head), and is its token in RAY_AUTH_TOKEN or ~/.ray/auth_token?") from None


def submit_remote(spec: JobSpec, job_id: str, address: str) -> str:
    """Submit ``spec`` through the Jobs API; return the submission id (``<name>-<job_id>``)."""
    runtime_env = dict(spec.cluster.runtime_env)
    bad = sorted(set(runtime_env) - set(ALLOWED_RUNTIME_ENV_KEYS))
    if bad:
        raise JobError(f"cluster.runtime_env: keys {bad} are not allowed (allowed: {', '.join(ALLOWED_RUNTIME_ENV_KEYS)})")
    c = client(address)
    submission_id = f"{spec.name}-{job_id}"
    with tempfile.TemporaryDirectory(prefix="lora-dist-submit-") as tmp:
        (Path(tmp) / SPEC_FILE).write_text(json.dumps({"spec": spec.to_dict(), "job_id": job_id}))
        env = {**runtime_env, "working_dir": tmp}
        env.setdefault("env_vars", {})
        env["env_vars"] = {**env["env_vars"], **WORKER_ENV}
        try:
            return c.submit_job(entrypoint=ENTRYPOINT, submission_id=submission_id, runtime_env=env,
                                metadata={METADATA_TAG: "1", "name": spec.name, "job_id": job_id,
                                          "max_steps": str(spec.train.max_steps)})
        except Exception as e:
            raise JobError(f"submitting {submission_id} to {address} failed: {_short(e)}") from None


def status_remote(address: str, job_id: str) -> JobStatus:
    c = client(address)
    try:
        info = c.get_job_info(job_id)
        logs = c.get_job_logs(job_id)
    except Exception as e:
        raise JobError(f"job {job_id} at {address}: {_short(e)}") from None
    step, total, loss, artifact = parse_progress(logs)
    state = str(info.status.value if hasattr(info.status, "value") else info.status)
    if state != "SUCCEEDED":
        artifact = None  # only a finished job has published an artifact
    return JobStatus(job_id, state, step, total, loss, artifact, info.message, where=address)


def logs_remote(address: str, job_id: str, follow: bool) -> Iterator[str]:
    c = client(address)
    try:
        if not follow:
            yield c.get_job_logs(job_id)
            return
        import asyncio

        # tail_job_logs streams until the job ends; chunks are yielded as they arrive.
        loop = asyncio.new_event_loop()
        agen = c.tail_job_logs(job_id)
        try:
            while True:
                try:
                    yield loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    break
        finally:
            loop.close()
    except JobError:
        raise
    except Exception as e:
        raise JobError(f"job {job_id} at {address}: {_short(e)}") from None


def stop_remote(address: str, job_id: str, timeout: float = 120) -> str:
    c = client(address)
    try:
        c.stop_job(job_id)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = str(c.get_job_status(job_id).value)
            if state in TERMINAL:
                return state
            time.sleep(1)
    except Exception as e:
        raise JobError(f"job {job_id} at {address}: {_short(e)}") from None
    raise JobError(f"job {job_id} did not stop within {timeout:.0f} s")


def list_remote(address: str) -> list[JobStatus]:
    c = client(address)
    try:
        jobs = c.list_jobs()
    except Exception as e:
        raise JobError(f"listing jobs at {address}: {_short(e)}") from None
    out = []
    for j in jobs:
        if (j.metadata or {}).get(METADATA_TAG) and j.submission_id:
            out.append(JobStatus(j.submission_id, str(j.status.value), where=address,
                                 total_steps=int((j.metadata or {}).get("max_steps", 0)) or None))
    return out


def wait_remote(address: str, job_id: str, stream) -> JobStatus:
    """Follow a job's logs to the end, echoing progress lines; return its final status."""
    for chunk in logs_remote(address, job_id, follow=True):
        for line in chunk.splitlines():
            line = RAY_PREFIX_RE.sub("", line)
            if STEP_RE.search(line) or "val_loss" in line or line.startswith(("error", ARTIFACT_PREFIX, "job ",
                                                                                 "parity")):
                print(line, file=stream, flush=True)
    deadline = time.time() + 60
    st = status_remote(address, job_id)
    while st.state not in TERMINAL and time.time() < deadline:
        time.sleep(1)
        st = status_remote(address, job_id)
    return st


# --- the embedded default: a local registry ------------------------------------------------------

def registry_dir() -> Path:
    d = cache_root() / "jobs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _record_path(job_id: str) -> Path:
    if not re.match(r"^[A-Za-z0-9._-]+$", job_id):
        raise JobError(f"job id {job_id!r} is not a job id")
    return registry_dir() / f"{job_id}.json"


def record(job_id: str, **fields: Any) -> None:
    path = _record_path(job_id)
    data = json.loads(path.read_text()) if path.is_file() else {"job_id": job_id}
    data.update(fields)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_record(job_id: str) -> dict[str, Any]:
    path = _record_path(job_id)
    if not path.is_file():
        raise JobError(f"no job {job_id} on the embedded default (known: lora-dist list); for a cluster job "
                       f"pass --address or set RAY_ADDRESS")
    return json.loads(path.read_text())


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def status_local(job_id: str) -> JobStatus:
    r = _read_record(job_id)
    state = r.get("state", "PENDING")
    if state in ("PENDING", "RUNNING") and not _alive(r.get("pid")):
        state = "FAILED"
        r["message"] = "the submitting process is gone"
    step = loss = None
    metrics = Path(r["work_dir"]) / "metrics.jsonl" if r.get("work_dir") else None
    if metrics and metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                step, loss = rec["step"], rec["loss"]
    elif r.get("log") and Path(r["log"]).is_file():
        step, _, loss, _ = parse_progress(Path(r["log"]).read_text(errors="replace"))
    if state == "SUCCEEDED":
        step = r.get("max_steps", step)
        loss = r.get("final_loss", loss)
    return JobStatus(job_id, state, step, r.get("max_steps"), loss,
                     r.get("artifact") if state == "SUCCEEDED" else None, r.get("message"))


def logs_local(job_id: str, follow: bool) -> Iterator[str]:
    r = _read_record(job_id)
    log = Path(r.get("log", ""))
    if not log.is_file():
        return
    with open(log, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                yield chunk
            elif not follow or status_local(job_id).state in TERMINAL:
                rest = f.read()
                if rest:
                    yield rest
                return
            else:
                time.sleep(0.5)


def stop_local(job_id: str, timeout: float = 120) -> str:
    r = _read_record(job_id)
    st = status_local(job_id)
    if st.state in TERMINAL:
        return st.state
    record(job_id, stop_requested=True)
    os.kill(r["pid"], signal.SIGINT)  # the submitting process stops Ray and marks the job STOPPED
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = status_local(job_id)
        if st.state in TERMINAL:
            return st.state
        time.sleep(0.5)
    os.kill(r["pid"], signal.SIGKILL)
    record(job_id, state="STOPPED", message="killed after not stopping in time")
    return "STOPPED"


def stop_requested(job_id: str) -> bool:
    try:
        return bool(_read_record(job_id).get("stop_requested"))
    except JobError:
        return False


def list_local() -> list[JobStatus]:
    out = []
    for p in sorted(registry_dir().glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            out.append(status_local(p.stem))
        except (JobError, ValueError, KeyError):
            continue
    return out


# --- artifacts: fetch from local paths or URIs ---------------------------------------------------

def is_uri(location: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location))


def fetch(location: str, out: Path) -> Path:
    """Copy an artifact (local path or pyarrow URI) to ``out`` and verify every sha256.

    Raises:
        JobError: ``out`` exists, or the source is not a complete artifact.
        ArtifactError: a file fails verification (the copy is removed).
    """
    from lora_dist.adapter import MANIFEST_FILE, verify_artifact

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
            pafs.copy_files(location, str(partial), destination_filesystem=pafs.LocalFileSystem())
        else:
            src = Path(location)
            if not (src / MANIFEST_FILE).is_file():
                raise JobError(f"{src}: no {MANIFEST_FILE}: not a complete artifact (or not reachable from here)")
            shutil.copytree(src, partial)
        verify_artifact(partial)
        os.rename(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def publish(local_artifact: Path, uri: str) -> str:
    """Upload a finished local artifact to a URI, manifest last: without it nothing looks complete."""
    import pyarrow.fs as pafs

    from lora_dist.adapter import MANIFEST_FILE

    fs, base = pafs.FileSystem.from_uri(uri.rstrip("/"))
    dest = f"{base}/{local_artifact.name}"
    if fs.get_file_info(f"{dest}/{MANIFEST_FILE}").type != pafs.FileType.NotFound:
        raise JobError(f"{uri.rstrip('/')}/{local_artifact.name} already exists; an artifact is never overwritten")
    fs.create_dir(dest, recursive=True)
    files = sorted(p for p in local_artifact.iterdir() if p.is_file())
    for f in sorted(files, key=lambda p: p.name == MANIFEST_FILE):
        with fs.open_output_stream(f"{dest}/{f.name}") as o:
            o.write(f.read_bytes())
    return f"{uri.rstrip('/')}/{local_artifact.name}"


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
