"""The embedded default's job lifecycle, slow: a real `lora-dist submit` with no cluster address
starts its own local Ray, and `status`, `list`, `logs` and `stop`, a signal to the command and a
killed raylet each end the job as a user would expect. Kept apart from test_jobs.py (the Jobs API
against a real head) so that CI's two test processes (--dist loadfile) share the slow tier evenly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import store

from test_jobs import JOB, QUICK, _cli, _name, _running


def _private_registry(tmp_path: Path, smollm2_dir: Path) -> dict:
    """An environment whose registry (LORA_DIST_CACHE) is the test's own; the model is linked in."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LORA_DIST_CACHE"] = str(tmp_path / "cache")
    (tmp_path / "cache" / "models").mkdir(parents=True)
    (tmp_path / "cache" / "models" / "smollm2-135m").symlink_to(smollm2_dir)
    return env


@pytest.mark.slow
def test_embedded_job_lifecycle_status_logs_stop(tmp_path, e2e_csv, smollm2_dir):
    """The embedded default: status, list and logs see a running job; a second submit of its job
    id is refused while it runs; stop ends it STOPPED; a later submit of that id is a new run
    whose own outcome is recorded (a finished job's recorded digest: the fast
    test_fetch_checks_the_manifest_digest_the_job_recorded)."""
    env = _private_registry(tmp_path, smollm2_dir)
    out = tmp_path / "runs"
    base = [sys.executable, "-m", "lora_dist.cli", "submit", JOB, f"--set=data.path={e2e_csv}"]
    submit = [*base, "--job-id=life", *[f"--set={o}" for o in QUICK if "max_steps" not in o]]
    proc = subprocess.Popen([*submit, f"--set=output.dir={out}", "--set=train.max_steps=500"],
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
        t0 = time.time()
        twice = subprocess.run([*submit, f"--set=output.dir={out}", "--set=train.max_steps=500"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=120)
        assert twice.returncode == 3 and f"job {sid} is already running" in twice.stderr, twice.stderr
        assert f"pid {proc.pid}" in twice.stderr and time.time() - t0 < 60  # refused before loading torch
        stop = _cli("stop", sid, cwd=tmp_path, env=env, timeout=300)
        assert stop.returncode == 0 and "STOPPED" in stop.stdout, stop.stdout + stop.stderr
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    # Ray Train's placement-group cleaner reaches its controller through the State API (the
    # dashboard's): without it, it warns every second of the job and never cleans up.
    assert "State API may be temporarily unavailable" not in proc.stdout.read()
    st = _cli("status", sid, cwd=tmp_path, env=env)
    assert "STOPPED" in st.stdout and st.returncode == 1
    assert not [p for p in out.glob("*") if (p / store.MANIFEST_FILE).exists()]

    # The stop request belonged to that run: the next run of the id fails for its own reason (the
    # output.dir the job id is bound to is now a file).
    shutil.rmtree(out)
    out.write_text("")
    failed = subprocess.run([*submit, f"--set=output.dir={out}", "--set=train.max_steps=500"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, failed.stdout[-2000:] + failed.stderr[-2000:]
    st = _cli("status", sid, cwd=tmp_path, env=env)
    assert "FAILED" in st.stdout and "Not a directory" in st.stdout and "stopped" not in st.stdout, st.stdout



@pytest.mark.slow
def test_a_signal_to_the_submitting_command_stops_its_embedded_job(tmp_path, e2e_csv, smollm2_dir):
    """SIGTERM (or Ctrl-C) to a running `lora-dist submit` is passed on to its job, which stops:
    exit 1, "stopped; no artifact was published", recorded STOPPED, none of its processes left."""
    import psutil

    env = _private_registry(tmp_path, smollm2_dir)
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "submit", JOB, f"--set=data.path={e2e_csv}",
                             f"--set=output.dir={tmp_path / 'runs'}", "--set=train.max_steps=500", "--job-id=term",
                             *[f"--set={o}" for o in QUICK if "max_steps" not in o]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submitter, tree = psutil.Process(proc.pid), []
    try:
        deadline = time.time() + 600
        while time.time() < deadline:  # until it trains
            if "step " in _cli("status", "smollm2-e2e-term", cwd=tmp_path, env=env).stdout:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(2)
        tree = submitter.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    st = _cli("status", "smollm2-e2e-term", cwd=tmp_path, env=env)
    assert proc.returncode == 1 and "job smollm2-e2e-term stopped; no artifact was published" in err, \
        (st.stdout, err[-3000:], out[-3000:])
    assert st.returncode == 1 and "STOPPED" in st.stdout, st.stdout
    _, alive = psutil.wait_procs([p for p in tree if _running(p)], timeout=30)
    for p in alive:
        p.kill()
    assert not alive, [p.pid for p in alive]


@pytest.mark.slow
def test_embedded_job_says_when_its_local_ray_stops_under_it(tmp_path, e2e_csv, smollm2_dir):
    """The raylet of the job's own local Ray is killed (as the OOM killer would): the command
    says that the local Ray stopped under the job and how to resume, exits 1, and the registry
    records it FAILED with that reason. Nothing of that Ray is left running."""
    import psutil

    env = _private_registry(tmp_path, smollm2_dir)
    proc = subprocess.Popen([sys.executable, "-m", "lora_dist.cli", "submit", JOB, f"--set=data.path={e2e_csv}",
                             f"--set=output.dir={tmp_path / 'runs'}", "--set=train.max_steps=500", "--job-id=lost",
                             *[f"--set={o}" for o in QUICK if "max_steps" not in o]],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submitter, tree, raylet = psutil.Process(proc.pid), [], None
    try:
        deadline = time.time() + 600
        while time.time() < deadline and raylet is None:
            tree = submitter.children(recursive=True)  # only this job's processes: never another Ray's
            cmdlines = {}
            for p in tree:
                try:
                    cmdlines[p] = " ".join(p.cmdline())
                except psutil.Error:
                    continue
            if any("RayTrainWorker" in c for c in cmdlines.values()):  # the job runs on its Ray
                raylet = next(p for p in tree if _name(p) == "raylet")
            else:
                assert proc.poll() is None, proc.communicate()
                time.sleep(1)
        assert raylet is not None, "the job's Ray Train worker never started"
        t0 = time.time()
        raylet.kill()
        out, err = proc.communicate(timeout=300)
        print(f"raylet killed: the submit ended {time.time() - t0:.1f} s later")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert ("error: the local Ray started for job smollm2-e2e-lost stopped under it (its raylet (pid "
            f"{raylet.pid}) exited") in err and "rerun the same command with --job-id lost" in err, err[-3000:]
    st = _cli("status", "smollm2-e2e-lost", cwd=tmp_path, env=env)
    assert st.returncode == 1 and "FAILED" in st.stdout and "stopped under it" in st.stdout, st.stdout
    _, alive = psutil.wait_procs([p for p in tree if _running(p)], timeout=30)
    for p in alive:
        p.kill()
    assert not alive, [p.pid for p in alive]
