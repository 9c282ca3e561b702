"""The job service: the embedded registry and the cluster-side entrypoint (fast), and the Jobs API
against a real `ray start --head` on this machine with token auth on (slow)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lora_dist import store

from conftest import E2E_CSV, REPO

JOB = str(REPO / "jobs" / "smollm2-e2e.yaml")
# The main job, short; ZeRO stage auto (ZeRO-1 here: the base fits each worker), since these tests
# are about submitting, stopping and fetching, and a ZeRO-3 step at N=2 costs ~10 s of gathers on
# this machine whatever its size (ZeRO-3 itself: test_distributed, test_checkpoint, test_layouts).
QUICK = ["train.max_steps=2", "train.micro_batch_size=2", "data.max_length=48", "train.eval_batches=1",
         "train.log_every=1", "cluster.zero_stage=auto"]
DASHBOARD_PORT = 8275
HEAD_MEMORY = 8 << 30  # the module head's memory resource: QUICK's workers plan ~1.3 GB each
HEAD_DIRS: dict[str, Path] = {}  # the module head's --temp-dir, by address


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_head(temp_dir: Path, env: dict, port: int, dashboard_port: int | None, memory: int | None = None) -> None:
    """`ray start --head` whose files live under ``temp_dir`` and whose ports are its own (another
    Ray on this machine, another agent's or another head's, keeps its ports); ``memory``: the
    node's memory resource (what its tasks and actors may reserve), where the test sets it."""
    ray = str(Path(sys.executable).parent / "ray")
    args = [ray, "start", "--head", "--num-cpus=2", f"--port={port}", f"--temp-dir={temp_dir}",
            *([f"--memory={memory}"] if memory else []),
            "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    args += ([f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
             if dashboard_port else ["--include-dashboard=false"])
    start = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    if start.returncode != 0:
        _stop_head(temp_dir)
        pytest.fail(f"ray start --head failed:\n{start.stdout[-3000:]}\n{start.stderr[-3000:]}")


def _name(p) -> str:
    """A process's name; '' for one that has just ended (a head's short-lived workers do)."""
    import psutil

    try:
        return p.name()
    except psutil.Error:
        return ""


def _head_processes(temp_dir: Path) -> list:
    """The processes of the head whose --temp-dir is ``temp_dir``: those whose command line or
    working directory names it (gcs_server, raylet, dashboard, monitors, job drivers) and all
    their descendants (workers, whose command lines are ray::...). No other Ray's."""
    import psutil

    mark = str(temp_dir)
    roots = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if p.pid != os.getpid() and (any(mark in a for a in p.info["cmdline"] or [])
                                         or (p.info["cwd"] or "").startswith(mark)):
                roots.append(p)
        except psutil.Error:
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update((c.pid, c) for c in p.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


def _stop_head(temp_dir: Path) -> list:
    """End that head's processes only (`ray stop --force` ends every Ray on the machine, other
    tests' and other users' too): SIGTERM, then SIGKILL what is left after 15 s. Returns the
    processes that still run (none, unless something is wrong)."""
    import psutil

    procs = _head_processes(temp_dir)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    return [p for p in _head_processes(temp_dir) if _running(p)]


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_for_api(address: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): up
        except OSError:
            time.sleep(1)
    pytest.fail(f"the test head's Jobs API at {address} did not answer in {timeout:.0f} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head (`ray start --head`), whose own processes are ended at teardown. Yields
    (address, env).

    The cluster's output root is pytest's temporary directory: the jobs' output.dirs are under it;
    its data roots are the repository's jobs/data and that directory."""
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's unix sockets need a short path
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["LORA_DIST_OUTPUT_ROOT"] = str(tmp_path_factory.getbasetemp())
    env["LORA_DIST_DATA_ROOT"] = f"{REPO / 'jobs' / 'data'}{os.pathsep}{tmp_path_factory.getbasetemp()}"
    _start_head(tmp / "ray", env, port=6389, dashboard_port=DASHBOARD_PORT, memory=HEAD_MEMORY)
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    HEAD_DIRS[address] = tmp / "ray"
    _wait_for_api(address)
    try:
        yield address, env
    finally:
        left = _stop_head(tmp / "ray")
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"processes of the test head survived its teardown: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def waited(head, tmp_path_factory, e2e_csv, smollm2_dir):
    """One quick job through `lora-dist submit --address --wait` (the CompletedProcess, its output.dir
    and how long it took), shared by the tests of what a finished Jobs API job offers."""
    address, env = head
    cwd = tmp_path_factory.mktemp("waited")
    t0 = time.time()
    proc = _cli("submit", JOB, "--address", address, "--wait", f"--set=data.path={e2e_csv}",
                f"--set=output.dir={cwd / 'runs'}", *[f"--set={o}" for o in QUICK], cwd=cwd, env=env)
    return proc, cwd / "runs", time.time() - t0


@pytest.mark.slow
def test_serve_deploys_a_job_by_id_to_the_clusters_serve(head, waited, tmp_path):
    """`lora-dist serve JOB_ID --address` resolves the job's artifact on the cluster, deploys to the
    cluster's Serve and returns; the adapter then answers through the openai client as `generate`
    does, and the bearer token is in no application config the dashboard shows."""
    import openai

    from lora_dist.generate import generate_from_artifact

    address, env = head
    sub = waited[0]
    assert sub.returncode == 0, sub.stderr[-3000:]
    lines = sub.stdout.strip().splitlines()
    sid, artifact = lines[0].split()[1], Path(lines[-1])
    token = "t-" + os.urandom(16).hex()
    (tmp_path / "token").write_text(token)
    port = free_port()
    dep = _cli("serve", f"mine={sid}", "--address", address, "--port", str(port), "--cpus", "1",
               "--token-file", str(tmp_path / "token"), cwd=tmp_path, env=env)
    assert dep.returncode == 0 and dep.stdout.startswith("deployed ") and ", mine " in dep.stdout, dep.stdout + dep.stderr[-3000:]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0)
    deadline = time.time() + 600
    while True:  # the cluster's Serve starts the replicas after the command returns
        try:
            models = {m.id for m in client.models.list().data}
            break
        except (openai.APIConnectionError, openai.APIStatusError):
            assert time.time() < deadline, "the deployed application never answered"
            time.sleep(3)
    assert "mine" in models
    mr = "name[The Eagle], eatType[coffee shop], food[French]"
    deadline = time.time() + 600
    while True:  # /v1/models answers from the gateway; the base's replica may still be loading
        try:
            reply = client.completions.create(model="mine", prompt=mr, max_tokens=24, temperature=0)
            break
        except openai.APIStatusError:
            assert time.time() < deadline, "the base replica never answered"
            time.sleep(3)
    assert reply.choices[0].text == generate_from_artifact(artifact, mr, max_new_tokens=24)
    details = subprocess.run(  # what every token holder of the cluster sees of the application
        [sys.executable, "-c", "import json, sys; from ray.dashboard.modules.serve.sdk import ServeSubmissionClient; "
                               "print(json.dumps(ServeSubmissionClient(sys.argv[1]).get_serve_details()))", address],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120)
    assert "lora_dist.serving:remote_app" in details.stdout, details.stderr[-3000:]
    assert token not in details.stdout


@pytest.mark.slow
def test_request_without_token_is_refused(head):
    address, _ = head
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_submit_wait_fetch_verify_through_the_jobs_api(head, waited, tmp_path):
    address, env = head
    proc, out, took = waited
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    artifact = Path(lines[-1])
    assert artifact.is_dir() and artifact.parent == out
    assert any(line.startswith("step 2/2") for line in lines), proc.stdout[-3000:]
    sid = lines[0].split()[1]
    print(f"submit --address --wait to verified artifact: {took:.1f} s")

    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "step 2/2" in st.stdout and str(artifact) in st.stdout
    digest = store.manifest_digest(artifact)  # what the job printed when it published (its logs, on the head)
    assert f"manifest {digest}" in st.stdout, st.stdout
    ls = _cli("list", "--address", address, cwd=tmp_path, env=env)
    assert sid in ls.stdout

    fetched = tmp_path / "fetched"
    f = _cli("fetch", sid, "--address", address, "--out", str(fetched), cwd=tmp_path, env=env)
    assert f.returncode == 0, f.stderr
    assert store.verify_artifact(fetched).files == store.verify_artifact(artifact).files
    # cluster.cpus_per_worker auto: the head's free CPUs for its 1 worker (a Serve replica an earlier
    # test deployed may hold one of the 2), never more, so the job does not wait for taken CPUs
    manifest = store.verify_artifact(artifact)
    assert 1 <= manifest.cpus_per_worker == manifest.torch_threads <= 2, manifest
    again = _cli("fetch", sid, "--address", address, "--out", str(fetched), cwd=tmp_path, env=env)
    assert again.returncode != 0 and "already exists" in again.stderr  # never overwrites silently
    v = _cli("verify", str(fetched), cwd=tmp_path, env=env)
    assert v.returncode == 0 and "ok:" in v.stdout

    # A manifest replaced at the artifact's storage still lists files that match it; the digest the
    # job recorded does not.
    # (Put back afterwards: the module's other tests use the same job.)
    original = (artifact / store.MANIFEST_FILE).read_text()
    (artifact / store.MANIFEST_FILE).write_text(json.dumps({**json.loads(original), "final_loss": 0.001}))
    try:
        tampered = tmp_path / "tampered"
        bad = _cli("fetch", sid, "--address", address, "--out", str(tampered), cwd=tmp_path, env=env)
        assert bad.returncode == 1 and digest in bad.stderr and not tampered.exists(), bad.stdout + bad.stderr
    finally:
        (artifact / store.MANIFEST_FILE).write_text(original)


@pytest.mark.slow
def test_submit_without_wait_prints_the_job_id_and_a_resubmit_gets_a_new_one(head, tmp_path, e2e_csv):
    """A job id is submitted once at a time; after it ended, a resubmit (to resume it) goes through
    under a new submission id, and status/stop given the job's name act on the newest. A stop
    that interrupts training leaves nothing that looks like a complete artifact."""
    address, env = head
    out = tmp_path / "r"
    submit = ["submit", JOB, "--address", address, f"--set=data.path={e2e_csv}", f"--set=output.dir={out}",
              "--job-id=nowait", "--set=train.max_steps=500", *[f"--set={o}" for o in QUICK if "max_steps" not in o]]
    proc = _cli(*submit, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip().splitlines()[-1]
    assert sid == "smollm2-e2e-nowait"
    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 0 and sid in st.stdout

    twice = _cli(*submit, cwd=tmp_path, env=env, timeout=300)  # while the first is PENDING or RUNNING
    assert twice.returncode == 3 and f"job {sid} (--job-id nowait) is still" in twice.stderr, twice.stderr
    stop = _cli("stop", sid, "--address", address, cwd=tmp_path, env=env, timeout=300)
    assert "STOPPED" in stop.stdout, stop.stdout + stop.stderr

    again = _cli(*submit, cwd=tmp_path, env=env, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.strip().splitlines()[-1] == f"{sid}.r2"
    for name in (sid, f"{sid}.r2"):  # the job's name (= its first submission's id) finds the newest
        st = _cli("status", name, "--address", address, cwd=tmp_path, env=env)
        assert st.stdout.startswith(f"{sid}.r2  "), st.stdout + st.stderr
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until it trains, so the stop interrupts real work
        st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
        if "step " in st.stdout:
            break
        assert "FAILED" not in st.stdout, st.stdout
        time.sleep(2)
    assert "step " in st.stdout, st.stdout
    stop = _cli("stop", sid, "--address", address, cwd=tmp_path, env=env, timeout=300)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert st.stdout.startswith(f"{sid}.r2  STOPPED"), st.stdout
    assert st.returncode == 1 and "artifact" not in st.stdout, st.stdout
    ls = _cli("list", "--address", address, cwd=tmp_path, env=env).stdout
    assert f"{sid}  STOPPED" in ls and f"{sid}.r2  STOPPED" in ls
    complete = [p for p in out.glob("*") if (p / store.MANIFEST_FILE).exists()] if out.exists() else []
    assert complete == []
    f = _cli("fetch", sid, "--address", address, "--out", str(tmp_path / "x"), cwd=tmp_path, env=env)
    assert f.returncode == 1 and "no artifact" in f.stderr


@pytest.mark.slow
def test_a_resubmit_with_another_output_dir_is_refused_through_the_jobs_api(head, tmp_path, e2e_csv):
    """Issue 31 item 2 on a real head: `submit --job-id` of a job that was first submitted with
    another output.dir exits 2 naming the job (not the first output.dir) and submits nothing."""
    address, env = head
    submit = ["submit", JOB, "--address", address, f"--set=data.path={e2e_csv}", "--job-id=bound",
              "--set=train.max_steps=500", *[f"--set={o}" for o in QUICK if "max_steps" not in o]]
    first = _cli(*submit, f"--set=output.dir={tmp_path / 'victim-dir'}", cwd=tmp_path, env=env, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    try:
        evil = _cli(*submit, f"--set=output.dir={tmp_path / 'evil'}", cwd=tmp_path, env=env, timeout=300)
        assert evil.returncode == 2, evil.stdout + evil.stderr
        assert "job smollm2-e2e-bound (--job-id bound): its output.dir differs" in evil.stderr, evil.stderr
        assert "victim-dir" not in evil.stderr
        assert "smollm2-e2e-bound.r2" not in _cli("list", "--address", address, cwd=tmp_path, env=env).stdout
    finally:
        _cli("stop", "smollm2-e2e-bound", "--address", address, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.slow
def test_a_job_planned_over_the_clusters_node_memory_is_refused_at_submit_with_both_figures(head, tmp_path, e2e_csv):
    """The head offers 8 GiB (its memory resource, set by the test); two workers of micro-batches
    of 16 x 96 tokens plan 5.2 GB each: either alone fits, the two on that node do not. `submit`
    exits 2 with the plan's figure and the node's before anything reaches the cluster."""
    address, env = head
    proc = _cli("submit", JOB, "--address", address, f"--set=data.path={e2e_csv}", "--job-id=toobig",
                f"--set=output.dir={tmp_path / 'runs'}", "--set=cluster.workers=2", "--set=cluster.zero_stage=3",
                "--set=train.micro_batch_size=16", "--set=data.max_length=96", "--set=output.shared=true", cwd=tmp_path,
                env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert re.search(r"cluster\.workers: this job will not fit: the plan needs 5\.\d GB per worker \(ZeRO-3; "
                     rf"`lora-dist plan`\); the cluster at {address} has 8\.6 GB available for its 2 workers, "
                     r"4\.3 GB each", proc.stderr), proc.stderr
    assert "smollm2-e2e-toobig" not in _cli("list", "--address", address, cwd=tmp_path, env=env).stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_unknown_job_is_a_clear_error(head, tmp_path):
    """404 and 401 are answers, not a cluster starting up: no retries, exit 3 at once."""
    address, env = head
    st = _cli("status", "no-such-job", "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 3 and "no-such-job" in st.stderr and "retrying" not in st.stderr
    home = tmp_path / "home"  # no ~/.ray/auth_token there: the request carries no token
    home.mkdir()
    t0 = time.time()
    st = _cli("status", "no-such-job", "--address", address, cwd=tmp_path, env={**env, "HOME": str(home)})
    assert st.returncode == 3 and "retrying" not in st.stderr and "token" in st.stderr, st.stderr
    assert time.time() - t0 < 30


class _FlakyJobsAPI:
    """A proxy in front of the head's Jobs API that answers the first ``failures`` job submissions
    with what Ray's head answers while its job agent has not registered yet (500 "No available
    agent to submit job, please try again later."), and forwards every other request."""

    def __init__(self, port: int, target: str, failures: int) -> None:
        from http.server import BaseHTTPRequestHandler

        proxy = self
        self.refused = 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "POST" and self.path.rstrip("/") == "/api/jobs" and proxy.refused < failures:
                    proxy.refused += 1
                    self._answer(500, b"No available agent to submit job, please try again later.", "text/plain")
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                req = urllib.request.Request(target + self.path, data=body or None, method=self.command,
                                             headers=headers)
                try:
                    with urllib.request.urlopen(req, timeout=60) as r:
                        self._answer(r.status, r.read(), r.headers.get("Content-Type"))
                except urllib.error.HTTPError as e:
                    self._answer(e.code, e.read(), e.headers.get("Content-Type"))

            def _answer(self, code: int, data: bytes, ctype: str | None) -> None:
                self.send_response(code)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

        self.address, self.handler, self.server = ("127.0.0.1", port), Handler, None

    def serve(self) -> None:
        """Listen from now on (until then a connection is refused), answering in a thread."""
        import threading
        from http.server import ThreadingHTTPServer

        self.server = ThreadingHTTPServer(self.address, self.handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.mark.slow
def test_submit_retries_a_cluster_that_is_not_ready_yet(head, tmp_path, e2e_csv):
    """Right after `ray start` the Jobs API first refuses connections, then answers 500 "No
    available agent": submit retries both (a line each on stderr) and goes through. A duplicate
    submission id, which Ray also answers with a 500, is not retried."""
    import threading

    address, env = head
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "submit", JOB, "--address",
                             f"http://127.0.0.1:{port}", f"--set=data.path={e2e_csv}",
                             f"--set=output.dir={tmp_path}/r", "--job-id=retry", "--set=train.max_steps=500",
                             *[f"--set={o}" for o in QUICK if "max_steps" not in o]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    refused = threading.Event()

    def read_stderr() -> None:
        for line in proc.stderr:
            err.append(line)
            if "cluster not ready" in line:
                refused.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    proxy = _FlakyJobsAPI(port, address, failures=2)
    try:
        deadline = time.time() + 300
        while not refused.wait(1):  # nothing listens yet: connection refused
            assert proc.poll() is None and time.time() < deadline, "".join(err)[-3000:]
        proxy.serve()  # now the "head" is up, and its job agent not yet
        out = proc.stdout.read()
        proc.wait(timeout=300)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    stderr = "".join(err)
    assert proc.returncode == 0, out[-3000:] + stderr[-3000:]
    assert re.search(r"cluster not ready \(Failed to connect to Ray at address: http://127\.0\.0\.1:\d+.*\): "
                     r"retrying in \d+ s", stderr), stderr
    assert proxy.refused == 2 and stderr.count("cluster not ready (Request failed with status code 500: No "
                                               "available agent") == 2, stderr
    sid = out.strip().splitlines()[-1]
    assert sid == "smollm2-e2e-retry"
    try:
        code = ("from lora_dist import jobs; jobs.enable_token_auth(); c = jobs.client(%r)\n"
                "try:\n    c.submit_job(entrypoint='true', submission_id=%r)\n"
                "except Exception as e:\n    print('TRANSIENT', jobs.transient(e), jobs._short(e))" % (address, sid))
        dup = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert "TRANSIENT False" in dup.stdout and "already exists" in dup.stdout, dup.stdout + dup.stderr
    finally:
        _cli("stop", sid, "--address", address, cwd=tmp_path, env=env, timeout=300)


@pytest.mark.slow
def test_ending_a_test_head_leaves_every_other_ray_running(head):
    """The fixture's teardown ends its own head's processes only (`ray stop --force` ended every
    Ray on the machine): a second head is started and ended here while the module's keeps running."""
    import tempfile

    address, env = head
    core = ("gcs_server", "raylet")
    module_core = [p for p in _head_processes(HEAD_DIRS[address]) if _name(p) in core]
    assert len(module_core) == 2
    other = Path(tempfile.mkdtemp(prefix="rx", dir="/tmp"))
    try:
        _start_head(other / "ray", env, port=free_port(), dashboard_port=None)
        theirs = _head_processes(other / "ray")
        assert {_name(p) for p in theirs} >= set(core)
        assert not _stop_head(other / "ray")
        assert not [p for p in theirs if _running(p)]
        assert all(_running(p) for p in module_core)
        with pytest.raises(urllib.error.HTTPError) as answered:  # and it still answers (401: no token)
            urllib.request.urlopen(f"{address}/api/version", timeout=10)
        assert answered.value.code == 401
    finally:
        _stop_head(other / "ray")
        shutil.rmtree(other, ignore_errors=True)


def test_a_job_id_runs_once_at_a_time_on_the_embedded_default(tmp_path, monkeypatch, tiny_llama_dir):
    """While a process holds a job's lock (<registry>/<run>.lock, flock), `submit --job-id` of the
    same job is refused at once (exit 3), naming the job and that process, and writes nothing."""
    import fcntl

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "c" / "jobs").mkdir(parents=True)
    held = open(tmp_path / "c" / "jobs" / "smollm2-e2e-once.lock", "w")  # as a running submit holds it
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write(str(os.getpid()))
    held.flush()
    try:
        proc = _cli("submit", JOB, f"--set=model.base={tiny_llama_dir}", f"--set=data.path={E2E_CSV}",
                    f"--set=output.dir={tmp_path / 'r'}", "--job-id=once", cwd=tmp_path, env=dict(os.environ),
                    timeout=120)
    finally:
        held.close()
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"job smollm2-e2e-once is already running on the embedded default (pid {os.getpid()}" in proc.stderr
    assert not (tmp_path / "c" / "jobs" / "smollm2-e2e-once.json").exists() and not (tmp_path / "r").exists()


def test_status_comes_from_the_jobs_own_records_not_its_log(tmp_path, monkeypatch):
    """A running job's step and loss come from metrics.jsonl in its work directory; a finished
    one's from its artifact's manifest. The log says something else and is not read."""
    from lora_dist import registry
    from lora_dist.embedded import EmbeddedJobs
    from lora_dist.store import FORMAT, MANIFEST_FILE, artifact_location, work_dir

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    out, sid = str(tmp_path / "runs"), "demo-j1"
    log = tmp_path / "demo.log"
    log.write_text("step 99/100  loss 0.1000\nartifact: /elsewhere\n")
    registry.record(sid, state="RUNNING", pid=os.getpid(), name="demo", job="j1", output_dir=out, max_steps=100,
                log=str(log))
    work = work_dir(out, "demo", "j1")
    work.mkdir(parents=True)
    (work / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.5}\n{"step": 1, "loss": 2.25, "lr": 0.1}\n'
                                        '{"step": 2, "loss": 2.0, "lr": 0.1}\n{"step": 2, "val')  # mid-write
    st = EmbeddedJobs().status(sid)
    assert (st.state, st.step, st.total_steps, st.loss, st.artifact) == ("RUNNING", 2, 100, 2.0, None)
    assert st.line() == "demo-j1  RUNNING  step 2/100  loss 2.0000"
    art = Path(artifact_location(out, "demo", "j1"))
    art.mkdir(parents=True)
    (art / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": {}, "steps": 100, "final_loss": 1.25}))
    registry.record(sid, state="SUCCEEDED", artifact=str(art))
    st = EmbeddedJobs().status(sid)
    assert (st.state, st.step, st.loss, st.artifact) == ("SUCCEEDED", 100, 1.25, str(art))
    registry.record(sid, state="RUNNING", pid=2**22 + 7)  # the submitting process is gone
    assert EmbeddedJobs().status(sid).state == "FAILED"


def test_the_cluster_side_confines_output_to_its_root_before_running(tmp_path, monkeypatch, capsys):
    """jobrun (the Jobs API entrypoint) refuses a local output.dir outside $LORA_DIST_OUTPUT_ROOT
    with exit 2, before any training starts; a bad job id is refused too."""
    from lora_dist import jobrun

    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path / "root"))
    payload = tmp_path / "job-spec.json"
    spec = {"name": "x", "output": {"dir": str(tmp_path / "elsewhere")}}
    payload.write_text(json.dumps({"spec": spec, "job_id": "j1"}))
    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: pytest.fail("a refused job must not run"))
    assert jobrun.main([str(payload)]) == 2
    assert "is outside the output root" in capsys.readouterr().err
    payload.write_text(json.dumps({"spec": {"name": "x"}, "job_id": "../../x"}))
    assert jobrun.main([str(payload)]) == 2
    assert "is not a job id" in capsys.readouterr().err


def test_embedded_ray_offers_the_cpus_the_workers_ask_for(capsys):
    """Four 1-CPU workers on a smaller machine share its cores instead of waiting forever."""
    import io

    from lora_dist.launch import embedded_cpus, usable_cores
    from lora_dist.spec import load_spec

    from conftest import MAIN_JOB

    cores = usable_cores()
    out = io.StringIO()
    spec = load_spec(MAIN_JOB, ["data.path=null", f"cluster.workers={cores + 2}"])
    assert embedded_cpus(spec, 1, out) == cores + 2 and "share them" in out.getvalue()
    assert embedded_cpus(load_spec(MAIN_JOB, ["data.path=null"]), 1, io.StringIO()) == cores


def test_cpus_per_worker_auto_shares_this_machines_cores_among_the_workers():
    """The default gives a lone worker every core (the README's job through submit runs as fast
    as `lora-dist train`), splits them among several, and never gives a worker none."""
    import os

    from lora_dist.launch import embedded_cpus_per_worker, usable_cores
    from lora_dist.spec import load_spec

    from conftest import MAIN_JOB

    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
    spec = load_spec(MAIN_JOB, ["data.path=null"])
    assert spec.cluster.cpus_per_worker == "auto"  # the default
    assert embedded_cpus_per_worker(spec, 2) == 2
    assert embedded_cpus_per_worker(load_spec(MAIN_JOB, ["data.path=null", "cluster.workers=2"]), 16) == 8
    assert embedded_cpus_per_worker(load_spec(MAIN_JOB, ["data.path=null", "cluster.workers=3"]), 2) == 1
    assert embedded_cpus_per_worker(load_spec(MAIN_JOB, ["data.path=null", "cluster.cpus_per_worker=3"]), 16) == 3


def test_cpus_per_worker_auto_on_a_cluster_is_what_its_largest_nodes_offer_each_worker():
    from lora_dist.launch import cluster_cpus_per_worker

    assert cluster_cpus_per_worker([64.0, 2.0], 1) == 64  # a small head node does not hold it back
    assert cluster_cpus_per_worker([16.0, 16.0, 2.0], 2) == 16  # one worker per large node
    assert cluster_cpus_per_worker([16.0, 16.0], 4) == 8  # two per node
    assert cluster_cpus_per_worker([16.0, 12.0], 3) == 6  # two on the smaller node: 12 // 2
    assert cluster_cpus_per_worker([8.0], 3) == 2
    assert cluster_cpus_per_worker([2.0], 8) == 1  # never none
    assert cluster_cpus_per_worker([0.0], 2) == 1  # a node with no CPUs offers nothing
    # what is free bounds it: a Serve replica holding 1 of a 2-CPU head leaves 1 to a job's worker
    assert cluster_cpus_per_worker([2.0], 1, available=1.0) == 1
    assert cluster_cpus_per_worker([16.0, 16.0], 2, available=8.0) == 4
    assert cluster_cpus_per_worker([16.0], 2, available=0.0) == 1  # all taken: 1, and Ray queues it
