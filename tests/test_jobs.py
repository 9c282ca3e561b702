"""The job service: the embedded registry and the cluster-side entrypoint (fast), and the Jobs API
against a real `ray start --head` on this machine with token auth on (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from lora_dist import store

from conftest import REPO

JOB = str(REPO / "jobs" / "smollm2-e2e.yaml")
QUICK = ["train.max_steps=2", "train.micro_batch_size=2", "data.max_length=48", "train.eval_batches=1",
         "train.log_every=1"]
DASHBOARD_PORT = 8275


def _cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head (`ray start --head`), stopped at teardown. Yields (address, env).

    The cluster's output root is pytest's temporary directory: the jobs' output.dirs are under it."""
    import tempfile
    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's unix sockets need a short path
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["LORA_DIST_OUTPUT_ROOT"] = str(tmp_path_factory.getbasetemp())
    ray = str(Path(sys.executable).parent / "ray")
    start = subprocess.run([ray, "start", "--head", "--num-cpus=2", "--port=6389",
                            f"--dashboard-port={DASHBOARD_PORT}", "--dashboard-host=127.0.0.1",
                            "--include-dashboard=true", f"--temp-dir={tmp / 'ray'}", "--disable-usage-stats"],
                           capture_output=True, text=True, env=env, timeout=180)
    if start.returncode != 0:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        pytest.fail(f"ray start --head failed:\n{start.stdout[-3000:]}\n{start.stderr[-3000:]}")
    address = f"http://127.0.0.1:{DASHBOARD_PORT}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 without a token): up
        except OSError:
            time.sleep(1)
    try:
        yield address, env
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_request_without_token_is_refused(head):
    address, _ = head
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code == 401


@pytest.mark.slow
def test_submit_wait_fetch_verify_through_the_jobs_api(head, tmp_path, e2e_csv, smollm2_dir):
    address, env = head
    out = tmp_path / "runs"
    t0 = time.time()
    proc = _cli("submit", JOB, "--address", address, "--wait", f"--set=data.path={e2e_csv}",
                f"--set=output.dir={out}", *[f"--set={o}" for o in QUICK], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    artifact = Path(lines[-1])
    assert artifact.is_dir() and artifact.parent == out
    assert any(line.startswith("step 2/2") for line in lines), proc.stdout[-3000:]
    sid = lines[0].split()[1]
    print(f"submit --address --wait to verified artifact: {time.time() - t0:.1f} s")

    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout and "step 2/2" in st.stdout and str(artifact) in st.stdout
    ls = _cli("list", "--address", address, cwd=tmp_path, env=env)
    assert sid in ls.stdout

    fetched = tmp_path / "fetched"
    f = _cli("fetch", sid, "--address", address, "--out", str(fetched), cwd=tmp_path, env=env)
    assert f.returncode == 0, f.stderr
    assert store.verify_artifact(fetched)["files"] == store.verify_artifact(artifact)["files"]
    again = _cli("fetch", sid, "--address", address, "--out", str(fetched), cwd=tmp_path, env=env)
    assert again.returncode != 0 and "already exists" in again.stderr  # never overwrites silently
    v = _cli("verify", str(fetched), cwd=tmp_path, env=env)
    assert v.returncode == 0 and "ok:" in v.stdout


@pytest.mark.slow
def test_submit_without_wait_prints_the_job_id(head, tmp_path, e2e_csv):
    address, env = head
    proc = _cli("submit", JOB, "--address", address, f"--set=data.path={e2e_csv}", f"--set=output.dir={tmp_path}/r",
                *[f"--set={o}" for o in QUICK], cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip().splitlines()[-1]
    assert sid.startswith("smollm2-e2e-")
    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 0 and sid in st.stdout
    stop = _cli("stop", sid, "--address", address, cwd=tmp_path, env=env, timeout=300)
    assert "STOPPED" in stop.stdout or "SUCCEEDED" in stop.stdout


@pytest.mark.slow
def test_stop_leaves_no_complete_looking_artifact(head, tmp_path, e2e_csv):
    address, env = head
    out = tmp_path / "runs"
    proc = _cli("submit", JOB, "--address", address, f"--set=data.path={e2e_csv}", f"--set=output.dir={out}",
                "--set=train.max_steps=500", *[f"--set={o}" for o in QUICK if "max_steps" not in o],
                cwd=tmp_path, env=env, timeout=120)
    sid = proc.stdout.strip().splitlines()[-1]
    deadline = time.time() + 600
    while time.time() < deadline:  # wait until it trains, so the stop interrupts real work
        st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
        if "step " in st.stdout:
            break
        assert "FAILED" not in st.stdout, st.stdout
        time.sleep(2)
    stop = _cli("stop", sid, "--address", address, cwd=tmp_path, env=env, timeout=300)
    assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
    st = _cli("status", sid, "--address", address, cwd=tmp_path, env=env)
    assert "STOPPED" in st.stdout and st.returncode == 1 and "artifact" not in st.stdout
    complete = [p for p in out.glob("*") if (p / store.MANIFEST_FILE).exists()] if out.exists() else []
    assert complete == []
    f = _cli("fetch", sid, "--address", address, "--out", str(tmp_path / "x"), cwd=tmp_path, env=env)
    assert f.returncode == 1 and "no artifact" in f.stderr


@pytest.mark.slow
def test_unknown_job_is_a_clear_error(head, tmp_path):
    address, env = head
    st = _cli("status", "no-such-job", "--address", address, cwd=tmp_path, env=env)
    assert st.returncode == 3 and "no-such-job" in st.stderr


@pytest.mark.slow
def test_bad_input_table_is_refused_before_submission(smollm2_dir):
    """Every bad input of the table (at least 30) through `submit --address <unreachable>`: each
    exits 2 with a message naming its field, at most bad_inputs.MAX_MESSAGE characters long."""
    sys.path.insert(0, str(REPO / "bench"))
    from bad_inputs import CASES

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bad_inputs.py"), "--check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(CASES) >= 30 and f"{len(CASES)} passed, 0 failed" in proc.stdout


@pytest.mark.slow
def test_embedded_job_lifecycle_status_logs_stop(tmp_path, e2e_csv, smollm2_dir):
    """The embedded default: status, list and logs see a running job; stop ends it STOPPED."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LORA_DIST_CACHE"] = str(tmp_path / "cache")  # a private registry; the model is linked in
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "smollm2-135m").symlink_to(smollm2_dir)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "submit", JOB, f"--set=data.path={e2e_csv}",
                             f"--set=output.dir={out}", "--set=train.max_steps=500", "--job-id=life",
                             *[f"--set={o}" for o in QUICK if "max_steps" not in o]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sid = "smollm2-e2e-life"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            st = _cli("status", sid, cwd=tmp_path, env=env)
            if "RUNNING" in st.stdout and "step " in st.stdout:
                break
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            time.sleep(2)
        assert "/500" in st.stdout and "loss" in st.stdout, st.stdout + st.stderr
        assert sid in _cli("list", cwd=tmp_path, env=env).stdout
        assert "step 1/500" in _cli("logs", sid, cwd=tmp_path, env=env).stdout
        stop = _cli("stop", sid, cwd=tmp_path, env=env, timeout=300)
        assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    st = _cli("status", sid, cwd=tmp_path, env=env)
    assert "STOPPED" in st.stdout and st.returncode == 1
    assert not [p for p in out.glob("*") if (p / store.MANIFEST_FILE).exists()]


def test_job_queries_answer_without_importing_torch_or_ray(tmp_path):
    """`list`, `status` and `verify` are instant: no torch, no ray at import."""
    code = ("import sys; from lora_dist.cli import main; rc_list = main(['list']); "
            "rc_status = main(['status', 'no-such-job']); rc_verify = main(['verify', 'no-such-dir']); "
            "print(rc_list, rc_status, rc_verify, "
            "sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LORA_DIST_CACHE": str(tmp_path)}, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "0 3 1 []", out.stdout + out.stderr


def test_status_comes_from_the_jobs_own_records_not_its_log(tmp_path, monkeypatch):
    """A running job's step and loss come from metrics.jsonl in its work directory; a finished
    one's from its artifact's manifest. The log says something else and is not read."""
    from lora_dist import jobs
    from lora_dist.store import FORMAT, MANIFEST_FILE, artifact_location, work_dir

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    out, sid = str(tmp_path / "runs"), "demo-j1"
    log = tmp_path / "demo.log"
    log.write_text("step 99/100  loss 0.1000\nartifact: /elsewhere\n")
    jobs.record(sid, state="RUNNING", pid=os.getpid(), name="demo", job="j1", output_dir=out, max_steps=100,
                log=str(log))
    work = work_dir(out, "demo", "j1")
    work.mkdir(parents=True)
    (work / "metrics.jsonl").write_text('{"step": 0, "val_loss": 2.5}\n{"step": 1, "loss": 2.25, "lr": 0.1}\n'
                                        '{"step": 2, "loss": 2.0, "lr": 0.1}\n{"step": 2, "val')  # mid-write
    st = jobs.status_local(sid)
    assert (st.state, st.step, st.total_steps, st.loss, st.artifact) == ("RUNNING", 2, 100, 2.0, None)
    assert st.line() == "demo-j1  RUNNING  step 2/100  loss 2.0000"
    art = Path(artifact_location(out, "demo", "j1"))
    art.mkdir(parents=True)
    (art / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": {}, "steps": 100, "final_loss": 1.25}))
    jobs.record(sid, state="SUCCEEDED", artifact=str(art))
    st = jobs.status_local(sid)
    assert (st.state, st.step, st.loss, st.artifact) == ("SUCCEEDED", 100, 1.25, str(art))
    jobs.record(sid, state="RUNNING", pid=2**22 + 7)  # the submitting process is gone
    assert jobs.status_local(sid).state == "FAILED"


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
    import os

    from lora_dist.launch import _embedded_cpus
    from lora_dist.spec import load_spec

    from conftest import MAIN_JOB

    cores = os.cpu_count() or 1
    out = io.StringIO()
    spec = load_spec(MAIN_JOB, ["data.path=null", f"cluster.workers={cores + 2}"])
    assert _embedded_cpus(spec, out) == cores + 2 and "share them" in out.getvalue()
    assert _embedded_cpus(load_spec(MAIN_JOB, ["data.path=null"]), io.StringIO()) == cores
