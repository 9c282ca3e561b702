"""Ray Jobs API client: submit, status, logs, stop, list, fetch; and the local job registry.

Remote jobs (``--address`` or ``RAY_ADDRESS``) go through Ray's Jobs API with token
authentication (Ray 2.60 turns it on for local clusters; DESIGN.md decision 5). The entrypoint is
the constant :data:`ENTRYPOINT`; the spec travels as a JSON data file in the job's
``working_dir``; only allow-listed ``runtime_env`` keys are passed through.

Jobs on the embedded default run in the submitting process; they are recorded in a registry
under ``<cache>/jobs/`` (state, pid, work directory, log file, artifact) so that ``status``,
``logs``, ``stop`` and ``list`` work for them too.

Progress comes from the job's own records, never from its log text: ``metrics.jsonl`` in the
job's work directory while it runs, the artifact's manifest once it has finished (both found
from the job's output.dir, which a remote submission records in its metadata).
"""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from lora_dist.errors import ArtifactError, JobError
from lora_dist.spec import JobSpec, cache_root, redacted, runtime_env_problems
from lora_dist.store import MANIFEST_FILE, METRICS_FILE, artifact_location, check_job_id, join, parse_manifest, \
    read_text, run_name, work_dir

ENTRYPOINT = "python -m lora_dist.jobrun job-spec.json"
SPEC_FILE = "job-spec.json"
METADATA_TAG = "lora-dist"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment every Ray process of a job gets (the spec itself travels as data, never here).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
              # Ray Train V2 re-emits print() through logging, so every progress line showed twice.
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
              # glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed
              # activation tensors stay in the heap: a CPU worker's RSS then exceeded what it holds
              # by ~0.6 GiB on the main job. A fixed threshold returns every tensor above 128 KiB to
              # the OS when freed, so the peak RSS is what the planner counts (RESULTS.md, issue 12).
              "MALLOC_MMAP_THRESHOLD_": "131072"}
RAY_PREFIX_RE = re.compile(r"^(\x1b\[[0-9;]*m)?\([A-Za-z]+ pid=\d+(, ip=[0-9.]+)?\)(\x1b\[[0-9;]*m)?\s*")
# Lines of a job's output that --wait echoes (the rest is Ray's own logging).
ECHO_RE = re.compile(r"^(step \d+|error|artifact: |job |parity|resumed)")


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


def progress(output_dir: str | None, name: str | None, job_id: str | None,
             finished: bool) -> tuple[int | None, float | None]:
    """(last step, its loss) from a job's own records: the finished artifact's manifest, or the
    running job's metrics.jsonl; (None, None) where neither can be read from here."""
    if not (output_dir and name and job_id):
        return None, None
    if finished:
        text = read_text(join(artifact_location(output_dir, name, job_id), MANIFEST_FILE))
        if text:
            try:
                manifest = parse_manifest(text, output_dir)
                return manifest.get("steps"), manifest.get("final_loss")
            except ArtifactError:
                return None, None
    step = loss = None
    text = read_text(str(work_dir(output_dir, name, job_id) / METRICS_FILE)) or ""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if "loss" in rec:
            step, loss = rec["step"], rec["loss"]
    return step, loss


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
    problems = runtime_env_problems(runtime_env)
    if problems:  # the spec refuses these already; a JobSpec built in code is checked here too
        raise JobError(f"cluster.runtime_env: {'; '.join(problems)}")
    c = client(address)
    submission_id = run_name(spec.name, job_id)
    with tempfile.TemporaryDirectory(prefix="lora-dist-submit-") as tmp:
        # env var values travel in runtime_env only, never in the spec file Ray stores with the job
        (Path(tmp) / SPEC_FILE).write_text(json.dumps({"spec": redacted(spec.to_dict()), "job_id": job_id}))
        env = {**runtime_env, "working_dir": tmp}
        env.setdefault("env_vars", {})
        env["env_vars"] = {**env["env_vars"], **WORKER_ENV}
        try:
            return c.submit_job(entrypoint=ENTRYPOINT, submission_id=submission_id, runtime_env=env,
                                metadata={METADATA_TAG: "1", "name": spec.name, "job_id": job_id,
                                          "max_steps": str(spec.train.max_steps),
                                          "output_dir": spec.output.dir})
        except Exception as e:
            raise JobError(f"submitting {submission_id} to {address} failed: {_short(e)}") from None


def status_remote(address: str, job_id: str) -> JobStatus:
    """State from the Jobs API; step, loss and the artifact from the job's own records."""
    c = client(address)
    try:
        info = c.get_job_info(job_id)
    except Exception as e:
        raise JobError(f"job {job_id} at {address}: {_short(e)}") from None
    state = str(info.status.value if hasattr(info.status, "value") else info.status)
    meta = info.metadata or {}
    out, name, jid = meta.get("output_dir"), meta.get("name"), meta.get("job_id")
    step, loss = progress(out, name, jid, finished=state == "SUCCEEDED")
    # only a finished job has published an artifact
    artifact = artifact_location(out, name, jid) if state == "SUCCEEDED" and out and name and jid else None
    total = int(meta["max_steps"]) if meta.get("max_steps") else None
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
            if ECHO_RE.match(line):
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
    return registry_dir() / f"{check_job_id(job_id)}.json"


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
    step, loss = progress(r.get("output_dir"), r.get("name"), r.get("job"), finished=state == "SUCCEEDED")
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


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
