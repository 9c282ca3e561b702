"""Ray Jobs API client: submit, status, logs, stop, list, wait; and the JobStatus both backends give.

Remote jobs (``--address`` or ``RAY_ADDRESS``) go through Ray's Jobs API with token
authentication (Ray 2.60 turns it on for local clusters; docs/design.md decision 5). The entrypoint is
the constant :data:`ENTRYPOINT`; the spec travels as a JSON data file in the job's
``working_dir``; only allow-listed ``runtime_env`` keys are passed through. A job (``<name>-<job
id>``: its Ray Train run, checkpoints and artifact) may be submitted several times: the first
submission is ``<name>-<job id>``, a resubmit ``<name>-<job id>.r2``, ``.r3``, ...; commands given
either name act on the newest submission of that job. A job id is bound by its first submission:
its spec digest (``specid.spec_digest``) and output.dir, recorded in that submission's metadata,
are what every later submission must match (:func:`check_binding`), and where ``status`` and
``fetch`` look; a submission that does not match them (made around ``lora-dist submit``) is no part
of the job. Transient cluster errors (5xx, connection
refused or reset, "No available agent") are retried for up to :data:`RETRY_BUDGET_S` seconds.

Jobs on the embedded default (no address) are ``embedded.py``'s; ``client.py`` puts both behind one
interface (the SDK).

Progress comes from the job's own records, never from its log text: ``metrics.jsonl`` in the
job's work directory while it runs, the artifact's manifest once it has finished (both found
from the job's output.dir, which a remote submission records in its metadata).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from lora_dist.errors import ArtifactError, JobError
from lora_dist.runtime_env import redacted, runtime_env_problems
from lora_dist.spec import JobSpec, SpecError
from lora_dist.specid import bound_fields, spec_digest
from lora_dist.store import MANIFEST_FILE, METRICS_FILE, artifact_location, join, parse_manifest, read_text, \
    run_name, work_dir

ENTRYPOINT = "python -m lora_dist.jobrun job-spec.json"
SPEC_FILE = "job-spec.json"
METADATA_TAG = "lora-dist"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Environment every Ray process of a job gets (the spec itself travels as data, never here).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
              # Ray Train V2 re-emits print() through logging, so every progress line showed twice.
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
              # glibc raises its mmap threshold after large frees (up to 32 MiB), after which freed
              # activation tensors stay in the heap, and a CPU worker's RSS exceeds what it holds. A
              # fixed threshold returns every tensor above 128 KiB to the OS when freed, so the peak
              # RSS is what the planner counts (the measurement: bench/RESULTS.md, issue 12).
              "MALLOC_MMAP_THRESHOLD_": "131072"}


def quiet_libraries() -> None:
    """Keep the libraries' own notices out of a job's output (DeepSpeed and bitsandbytes print
    accelerator notices at import; they are not the user's business)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("transformers", "bitsandbytes", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


RAY_PREFIX_RE = re.compile(r"^(\x1b\[[0-9;]*m)?\([A-Za-z]+ pid=\d+(, ip=[0-9.]+)?\)(\x1b\[[0-9;]*m)?\s*")
# Lines of a job's output that --wait echoes (the rest is Ray's own logging).
ECHO_RE = re.compile(r"^(step \d+|error|artifact: |manifest: |job |parity|resumed)")
# jobrun prints these last; status reads the digest from the job's logs (kept by Ray on the head,
# apart from the artifact's storage, so a replaced manifest does not vouch for itself).
ARTIFACT_PREFIX, MANIFEST_PREFIX = "artifact: ", "manifest: "
ACTIVE = {"PENDING", "RUNNING"}
# Seconds a command keeps retrying a cluster that is not ready yet (tests shorten it).
RETRY_BUDGET_S = 60.0
RESUBMIT_RE = re.compile(r"\.r(\d+)$")


@dataclass
class JobStatus:
    """A job as ``status``, ``list`` and :meth:`Job.wait` report it; ``line()`` is how the CLI prints it."""

    job_id: str
    state: str  # PENDING | RUNNING | SUCCEEDED | FAILED | STOPPED
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    artifact: str | None = None
    message: str | None = None
    where: str = "embedded"
    manifest: str | None = None  # "sha256:...", recorded when the job finished

    def line(self) -> str:
        parts = [f"{self.job_id}  {self.state}"]
        if self.step is not None:
            parts.append(f"step {self.step}" + (f"/{self.total_steps}" if self.total_steps else ""))
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.artifact:
            parts.append(f"artifact {self.artifact}")
        if self.artifact and self.manifest:
            parts.append(f"manifest {self.manifest}")
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
                return manifest.steps, manifest.final_loss
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

def enable_token_auth() -> None:
    """Send the cluster token when one is available (Ray reads RAY_AUTH_TOKEN or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
            (Path.home() / ".ray" / "auth_token").is_file():
        os.environ["RAY_AUTH_MODE"] = "token"


def chain_text(e: BaseException) -> str:
    """The messages of ``e`` and of the exceptions it was raised from (Ray's client re-raises a
    refused connection as a ConnectionError that names only the address)."""
    texts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        texts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " | ".join(texts)


def transient(e: BaseException) -> bool:
    """True for errors of a cluster that is starting or busy, which a retry may get past: 5xx
    answers (Ray's "No available agent to submit job"), a refused or reset connection. False for
    everything else: 4xx (no token, unknown job), a duplicate submission id (which Ray reports as
    a 500 too), a host name that does not resolve."""
    text = chain_text(e)
    if "already exists" in text or type(e).__name__ == "AuthenticationError":
        return False
    if re.search(r"NameResolution|Name or service not known|nodename nor servname|getaddrinfo failed", text):
        return False  # a misspelt host: no cluster will appear there
    if "No available agent" in text:
        return True
    if re.search(r"Connection (refused|reset|aborted)|RemoteDisconnected|Failed to connect to Ray", text):
        return True
    code = getattr(getattr(e, "response", None), "status_code", None)
    if code is None:
        m = re.search(r"status code (\d{3})", text)
        code = int(m.group(1)) if m else None
    return code is not None and 500 <= code < 600


class _Retry:
    """One command's retry budget: :data:`RETRY_BUDGET_S` seconds from its start. Right after
    `ray start` the Jobs API refuses connections, then answers 500 "No available agent" until the
    head's job agent registers; a command given then would otherwise fail at once."""

    def __init__(self, address: str) -> None:
        self.address, self.deadline, self.delay = address, time.monotonic() + RETRY_BUDGET_S, 1.0

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried with backoff while it fails transiently and the budget
        lasts; then the last error is raised as it came."""
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                left = self.deadline - time.monotonic()
                if not transient(e) or left <= 0:
                    raise
                wait = max(0.1, min(self.delay, left))
                print(f"cluster not ready ({_short(e)}): retrying in {wait:.0f} s", file=sys.stderr, flush=True)
                time.sleep(wait)
                self.delay = min(self.delay * 2, 10.0)


def _gave_up(e: BaseException) -> str:
    return f" (still failing after {RETRY_BUDGET_S:.0f} s of retries)" if transient(e) else ""


def client(address: str, retry: _Retry | None = None):
    """A JobSubmissionClient for ``address`` (http://host:8265 or ray://...)."""
    from ray.job_submission import JobSubmissionClient

    enable_token_auth()
    retry = retry or _Retry(address)
    try:
        return retry.call(JobSubmissionClient, address)
    except Exception as e:  # connection refused, 401/403: say which and what to do
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {_short(e)}{_gave_up(e)}. Is the cluster up "
                       f"(ray start --head), and is its token in RAY_AUTH_TOKEN or ~/.ray/auth_token?") from None


def _ours(j) -> tuple[str, str] | None:
    """(spec name, job id) of a lora-dist submission; None for anything else on the cluster."""
    meta = j.metadata or {}
    if meta.get(METADATA_TAG) and meta.get("name") and meta.get("job_id") and j.submission_id:
        return meta["name"], meta["job_id"]
    return None


def _revision(j, key: tuple[str, str]) -> tuple[int, float]:
    """Which submission of its job ``j`` is (1 for ``<name>-<job id>``, N for ``.rN``), then
    when it started: the sort key of "newest"."""
    base, sid = run_name(*key), j.submission_id
    m = RESUBMIT_RE.search(sid) if sid.startswith(base) else None
    n = 1 if sid == base else int(m.group(1)) if m and sid == f"{base}{m.group(0)}" else 0
    return n, float(j.start_time or 0)


def _submissions(jobs: list, key: tuple[str, str]) -> list:
    """Every submission carrying one job's spec name and job id in its metadata, oldest first
    (bound to the job or not: see :func:`job_submissions`)."""
    return sorted((j for j in jobs if _ours(j) == key), key=lambda j: _revision(j, key))


def _first(jobs: list, key: tuple[str, str]):
    """The job's first submission (id ``<name>-<job id>``; Ray never reuses an id), or None."""
    return next((j for j in _submissions(jobs, key) if _revision(j, key)[0] == 1), None)


def _bound_by(first, j) -> bool:
    """True when submission ``j`` runs lora-dist's entrypoint (which refuses a spec its metadata
    does not describe: ``jobrun.metadata_problem``) and recorded the binding (output.dir, spec
    digest) of ``first``."""
    f, m = first.metadata or {}, j.metadata or {}
    return getattr(j, "entrypoint", ENTRYPOINT) == ENTRYPOINT and m.get("output_dir") == f.get("output_dir") and \
        (not f.get("spec_digest") or m.get("spec_digest") == f.get("spec_digest"))


def job_submissions(jobs: list, ref: str) -> list:
    """The submissions of the job that ``ref`` names (its run name ``<name>-<job id>`` or any of its
    submission ids), oldest first: its first submission, then each later one that recorded the
    first's binding (every one ``lora-dist submit`` let through). [] when ``ref`` names no
    lora-dist job, or the job's first submission is not in the cluster's job table.

    A submission made around ``lora-dist submit`` with the job's name and id but another output.dir
    or spec is no part of the job: ``status``, ``fetch``, ``logs`` and ``stop`` never follow it.

    Args:
        jobs: the cluster's submissions, as ``JobSubmissionClient.list_jobs`` gives them.
    """
    key = next((_ours(j) for j in jobs if j.submission_id == ref and _ours(j)), None)
    key = key or next((_ours(j) for j in jobs if _ours(j) and run_name(*_ours(j)) == ref), None)
    first = _first(jobs, key) if key else None
    if first is None:
        return []
    return [first] + [j for j in _submissions(jobs, key) if _revision(j, key)[0] > 1 and _bound_by(first, j)]


def binding(spec: JobSpec) -> dict[str, str]:
    """What a job id's first submission binds it to: the spec digest and output.dir."""
    return {"spec_digest": spec_digest(spec.to_dict()), "output_dir": spec.output.dir}


def check_binding(run: str, job_id: str, first: Mapping[str, Any] | None, spec: JobSpec,
                  recorded: Callable[[], Mapping[str, Any] | None] | None = None) -> None:
    """Refuse ``spec`` as a later submission of job ``run`` unless it matches what the job's first
    submission recorded (both backends).

    The message names the job and what differs, never a value of the first submission's spec (the
    job may be another user's); when the output.dir is the same, the NAMES of the differing fields
    are added from the spec that ``recorded`` returns (the one recorded by the job's artifact or
    checkpoint under that output.dir, which the submitter reads with their own access).

    Args:
        first: the first submission's ``spec_digest`` and ``output_dir`` (None: this is the first;
            a record from before the digest was kept binds the output.dir alone).

    Raises:
        SpecError: the output.dir, or a field a resume may not change, differs.
    """
    if first is None:
        return
    mine = binding(spec)
    if first.get("output_dir") != mine["output_dir"]:
        what = "its output.dir differs from the one the job was first submitted with"
    elif first.get("spec_digest") and first["spec_digest"] != mine["spec_digest"]:
        try:
            old = recorded() if recorded else None
        except Exception:  # noqa: BLE001 - the names are a courtesy; the refusal stands without them
            old = None
        a, b = bound_fields(redacted(spec.to_dict())), bound_fields(old) if old else {}
        names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if old else []
        what = (f"it trains something else than the job's first submission ({', '.join(names[:10])} differ)"
                if names else "it trains something else than the job's first submission (a field that a resume "
                              "may not change differs: docs/spec.md lists those it may)")
    else:
        return
    raise SpecError([f"job {run} (--job-id {job_id}): {what}. A job id keeps the spec and output.dir of its first "
                     f"submission: resubmit it with that spec to resume it, or use a new --job-id"])


def _resolve(c, retry: _Retry, address: str, ref: str) -> str:
    """The submission that a command given ``ref`` acts on: the newest submission of the job that
    ``ref`` names (:func:`job_submissions`); ``ref`` itself when no lora-dist job matches, so that
    Ray answers for it."""
    subs = job_submissions(_list(c, retry, address, ref), ref)
    return subs[-1].submission_id if subs else ref


def _list(c, retry: _Retry, address: str, ref: str) -> list:
    try:
        return retry.call(c.list_jobs)
    except Exception as e:
        raise JobError(f"job {ref} at {address}: listing jobs: {_short(e)}{_gave_up(e)}") from None


def _state(status) -> str:
    return str(status.value if hasattr(status, "value") else status)


def submit_remote(spec: JobSpec, job_id: str, address: str,
                  recorded: Callable[[], Mapping[str, Any] | None] | None = None) -> str:
    """Submit ``spec`` through the Jobs API; return the submission id.

    The first submission of a job id is ``<name>-<job id>``; a resubmit (to resume the job) is
    ``<name>-<job id>.rN``, since Ray never reuses a submission id. The job itself (its Ray Train
    run, checkpoints and artifact) keeps the name ``<name>-<job id>``. ``recorded``: see
    :func:`check_binding`.

    Raises:
        SpecError: the job id was first submitted with another output.dir or spec.
        JobError: an earlier submission of this job is still PENDING or RUNNING (two drivers would
            train the same run), or the cluster refused or could not be reached.
    """
    runtime_env = dict(spec.cluster.runtime_env)
    problems = runtime_env_problems(runtime_env)
    if problems:  # the spec refuses these already; a JobSpec built in code is checked here too
        raise JobError(f"cluster.runtime_env: {'; '.join(problems)}")
    retry = _Retry(address)
    c = client(address, retry)
    submission_id = _next_submission_id(c, retry, address, spec, job_id, recorded)
    with tempfile.TemporaryDirectory(prefix="lora-dist-submit-") as tmp:
        # env var values travel in runtime_env only, never in the spec file Ray stores with the job
        (Path(tmp) / SPEC_FILE).write_text(json.dumps({"spec": redacted(spec.to_dict()), "job_id": job_id}))
        env = {**runtime_env, "working_dir": tmp}
        env.setdefault("env_vars", {})
        env["env_vars"] = {**env["env_vars"], **WORKER_ENV}
        try:
            return retry.call(c.submit_job, entrypoint=ENTRYPOINT, submission_id=submission_id, runtime_env=env,
                              metadata={METADATA_TAG: "1", "name": spec.name, "job_id": job_id,
                                        "max_steps": str(spec.train.max_steps or ""),  # train.epochs: not known yet
                                        **binding(spec)})  # what the first submission binds the job id to
        except Exception as e:
            raise JobError(f"submitting {submission_id} (job {run_name(spec.name, job_id)}) to {address} failed: "
                           f"{_short(e)}{_gave_up(e)}") from None


def _next_submission_id(c, retry: _Retry, address: str, spec: JobSpec, job_id: str, recorded) -> str:
    """``<name>-<job id>`` for a job's first submission, ``...rN`` after N-1 earlier ones, none of
    which may still be running, and only for a spec that the first submission binds."""
    name, run = spec.name, run_name(spec.name, job_id)
    try:
        jobs = retry.call(c.list_jobs)
    except Exception as e:
        raise JobError(f"listing jobs at {address} before submitting {run}: {_short(e)}{_gave_up(e)}") from None
    earlier, first = _submissions(jobs, (name, job_id)), _first(jobs, (name, job_id))
    if earlier and first is None:
        raise JobError(f"job {run} (--job-id {job_id}) has submissions at {address} but its first, {run}, is no "
                       f"longer in the cluster's job table: nothing says what the job id is bound to. Use a new "
                       f"--job-id")
    check_binding(run, job_id, first.metadata if first else None, spec, recorded)
    active = [j for j in earlier if _state(j.status) in ACTIVE]
    if active:
        j = active[-1]
        raise JobError(f"job {run} (--job-id {job_id}) is still {_state(j.status)} at {address} as submission "
                       f"{j.submission_id}; wait for it to end, or `lora-dist stop {run} --address {address}`, "
                       f"before submitting it again")
    if not earlier:
        return run
    return f"{run}.r{max(_revision(j, (name, job_id))[0] for j in earlier) + 1}"


def status_remote(address: str, job_id: str) -> JobStatus:
    """State from the Jobs API; step, loss and the artifact from the job's own records; the
    manifest's digest from the job's logs. ``job_id``: the job's run name or a submission id; the
    newest submission of that job answers for its state, and its first submission's metadata says
    where its records are (:func:`job_submissions`)."""
    retry = _Retry(address)
    c = client(address, retry)
    subs = job_submissions(_list(c, retry, address, job_id), job_id)
    if subs:
        newest, meta = subs[-1], subs[0].metadata or {}
        sid, state, message, driver = newest.submission_id, _state(newest.status), newest.message, newest
    else:  # not a lora-dist job: Ray answers for it (404 for an unknown id)
        try:
            info = retry.call(c.get_job_info, job_id)
        except Exception as e:
            raise JobError(f"job {job_id} at {address}: {_short(e)}{_gave_up(e)}") from None
        if (info.metadata or {}).get(METADATA_TAG):
            raise JobError(f"job {job_id} at {address}: the first submission of its job is not in the cluster's "
                           f"job table, so nothing says where its artifact is")
        sid, state, message, meta, driver = job_id, _state(info.status), info.message, {}, info
    out, name, jid = meta.get("output_dir"), meta.get("name"), meta.get("job_id")
    step, loss = progress(out, name, jid, finished=state == "SUCCEEDED")
    # only a finished job has published an artifact
    artifact = artifact_location(out, name, jid) if state == "SUCCEEDED" and out and name and jid else None
    total = int(meta["max_steps"]) if meta.get("max_steps") else None
    # printed by the submission that published: one the first submission binds (same output.dir and spec)
    digest = _logged_digest(c, retry, sid, getattr(driver, "driver_node_id", None)) if artifact else None
    return JobStatus(sid, state, step, total, loss, artifact, message, where=address, manifest=digest)


DIGEST_TAIL_LINES = 200  # jobrun prints the digest last: it is in the log's tail


def _logged_digest(c, retry: _Retry, sid: str, node: str | None) -> str | None:
    """The digest of the ``manifest: sha256:...`` line jobrun printed when the job finished: read
    from the tail of the job's driver log on ``node`` (the dashboard's log API, as ``ray logs``
    reads it), not the whole log; the whole log only where the cluster cannot give its tail."""
    from urllib.parse import urlencode

    query = urlencode({"node_id": node, "filename": f"job-driver-{sid}.log", "lines": DIGEST_TAIL_LINES,
                       "media_type": "file", "timeout": 30})
    try:
        # the Jobs API client's own request: its address, token and cookies (get_log wants a GCS address)
        r = retry.call(c._do_request, "GET", f"/api/v0/logs/file?{query}")
        if not node or r.status_code != 200:
            raise JobError(f"no log tail ({r.status_code})")
        text = r.text
    except Exception:
        try:
            text = retry.call(c.get_job_logs, sid)
        except Exception:
            return None
    found = [line[len(MANIFEST_PREFIX):].strip() for line in text.splitlines() if line.startswith(MANIFEST_PREFIX)]
    return found[-1] if found else None


def logs_remote(address: str, job_id: str, follow: bool) -> Iterator[str]:
    retry = _Retry(address)
    c = client(address, retry)
    sid = _resolve(c, retry, address, job_id)
    try:
        if not follow:
            yield retry.call(c.get_job_logs, sid)
            return
        import asyncio

        # tail_job_logs streams until the job ends; chunks are yielded as they arrive.
        loop = asyncio.new_event_loop()
        agen = c.tail_job_logs(sid)
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
    retry = _Retry(address)
    c = client(address, retry)
    sid = _resolve(c, retry, address, job_id)
    try:
        retry.call(c.stop_job, sid)
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = _state(retry.call(c.get_job_status, sid))
            if state in TERMINAL:
                return state
            time.sleep(1)
    except Exception as e:
        raise JobError(f"job {job_id} at {address}: {_short(e)}{_gave_up(e)}") from None
    raise JobError(f"job {sid} did not stop within {timeout:.0f} s")


def list_remote(address: str) -> list[JobStatus]:
    retry = _Retry(address)
    c = client(address, retry)
    try:
        jobs = retry.call(c.list_jobs)
    except Exception as e:
        raise JobError(f"listing jobs at {address}: {_short(e)}{_gave_up(e)}") from None
    out = []
    for j in jobs:
        if (j.metadata or {}).get(METADATA_TAG) and j.submission_id:
            out.append(JobStatus(j.submission_id, _state(j.status), where=address,
                                 total_steps=int((j.metadata or {}).get("max_steps", 0)) or None))
    return out


def wait_remote(address: str, job_id: str, stream=None, timeout: float | None = None) -> JobStatus:
    """The job's status once it has ended (or when ``timeout`` seconds have passed). With
    ``stream``: follow its logs to the end, echoing progress lines there."""
    if stream is not None:
        for chunk in logs_remote(address, job_id, follow=True):
            for line in chunk.splitlines():
                line = RAY_PREFIX_RE.sub("", line)
                if ECHO_RE.match(line):
                    print(line, file=stream, flush=True)
        timeout = 60  # the logs have ended; the state follows
    return until_ended(lambda ref: status_remote(address, ref), job_id, timeout, poll_s=1)


def until_ended(status: Callable[[str], JobStatus], job_id: str, timeout: float | None,
                poll_s: float = 0.5) -> JobStatus:
    """``status(job_id)`` once it is terminal, or as it stands when ``timeout`` seconds have passed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        st = status(job_id)
        if st.state in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return st
        time.sleep(poll_s)


def _short(e: BaseException) -> str:
    """One line of an error; for a server that answered with a traceback, its first and last line."""
    text = [line for line in str(e).strip().splitlines() if len(line.strip(" .")) > 1]
    if not text:
        return type(e).__name__
    if len(text) > 1 and any(line.startswith("Traceback") or "Traceback (most recent" in line for line in text):
        return f"{text[0][:150]} ... {text[-1].strip()[:250]}"
    return text[0][:300]
