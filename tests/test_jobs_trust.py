"""A job id on a shared cluster or machine (issue 31): bound by its first submission, so another
token holder's resubmit cannot redirect `status` and `fetch`; `stop` signals only the process it
recorded; an unreadable registry record is a one-line error. Fast: the Jobs API's selection
logic over recorded JobDetails (the records Ray's `list_jobs` returns), the embedded registry and
the CLI for real."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import jobs, registry
from lora_dist.spec import SpecError, load_spec
from lora_dist.specid import spec_digest

from conftest import E2E_CSV, MAIN_JOB, REPO

NAME, JID = "smollm2-e2e", "victim1"
RUN = f"{NAME}-{JID}"


def _cli(*args: str, env: dict, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _spec(out: Path, *extra: str):
    return load_spec(MAIN_JOB, [f"data.path={E2E_CSV}", f"output.dir={out}", *extra]).with_absolute_paths()


def _submission(sid: str, spec, status: str, start: int):
    """A lora-dist submission as Ray's list_jobs reports it (metadata as submit_remote writes it)."""
    from ray.job_submission import JobDetails, JobStatus, JobType

    meta = {jobs.METADATA_TAG: "1", "name": NAME, "job_id": JID, "max_steps": "2", "output_dir": spec.output.dir,
            "spec_digest": spec_digest(spec.to_dict())}
    return JobDetails(type=JobType.SUBMISSION, submission_id=sid, entrypoint=jobs.ENTRYPOINT,
                      status=JobStatus(status), metadata=meta, start_time=start)


# --- item 2: the Jobs API ------------------------------------------------------------------------------

def test_a_resubmit_with_another_output_dir_is_no_part_of_the_job(tmp_path):
    """The victim's job (first submission, then a resume .r2 that published); an attacker's .r3 with
    the same name and job id but its own output.dir and data. The job's submissions, which status,
    fetch, logs and stop follow, are the first and the .r2 only."""
    victim, evil = _spec(tmp_path / "victim"), _spec(tmp_path / "evil", f"data.val_path={E2E_CSV}")
    listed = [_submission(RUN, victim, "STOPPED", 1), _submission(f"{RUN}.r2", victim, "SUCCEEDED", 2),
              _submission(f"{RUN}.r3", evil, "SUCCEEDED", 3), _submission("other-x", evil, "RUNNING", 4)]
    for ref in (RUN, f"{RUN}.r2", f"{RUN}.r3"):
        assert [j.submission_id for j in jobs.job_submissions(listed, ref)] == [RUN, f"{RUN}.r2"], ref
    # the first submission gone from the job table: nothing vouches for the job
    assert jobs.job_submissions(listed[1:], RUN) == []
    assert jobs.job_submissions(listed, "no-such-job") == []


def test_status_reads_the_output_dir_from_the_first_submission_and_the_digest_from_a_bound_one(tmp_path,
                                                                                               monkeypatch):
    """status_remote over a recorded job table where the newest submission is the attacker's: the
    artifact is the victim's, and the digest is the one the victim's submission logged."""
    victim, evil = _spec(tmp_path / "victim"), _spec(tmp_path / "evil")
    listed = [_submission(RUN, victim, "SUCCEEDED", 1), _submission(f"{RUN}.r2", evil, "SUCCEEDED", 2)]
    logs = {RUN: "step 2/2\nartifact: x\nmanifest: sha256:" + "a" * 64 + "\n",
            f"{RUN}.r2": "manifest: sha256:" + "e" * 64 + "\n"}

    class RecordedJobTable:  # what the cluster answered; status_remote's choice among them is under test
        def list_jobs(self):
            return listed

        def get_job_info(self, sid):
            return next(j for j in listed if j.submission_id == sid)

        def get_job_logs(self, sid):
            return logs[sid]

    monkeypatch.setattr(jobs, "client", lambda address, retry=None: RecordedJobTable())
    st = jobs.status_remote("http://head:8265", RUN)
    assert st.job_id == RUN and st.state == "SUCCEEDED"
    assert st.artifact == str(tmp_path / "victim" / RUN) and st.manifest == "sha256:" + "a" * 64


def test_a_later_submission_must_match_the_first_ones_output_dir_and_spec(tmp_path):
    """check_binding (both backends): another output.dir or a trained field is refused, naming the
    job id and what differs, never a value of the first submission's spec."""
    victim = _spec(tmp_path / "victim-secret-dir", "train.lr=3e-4")
    first = jobs.binding(victim)
    jobs.check_binding(RUN, JID, None, victim)  # the first submission
    jobs.check_binding(RUN, JID, first, _spec(tmp_path / "victim-secret-dir", "train.lr=3e-4", "cluster.workers=1"))
    with pytest.raises(SpecError) as e:
        jobs.check_binding(RUN, JID, first, _spec(tmp_path / "evil"))
    text = str(e.value)
    assert f"job {RUN} (--job-id {JID})" in text and "output.dir differs" in text
    assert "victim-secret-dir" not in text
    with pytest.raises(SpecError) as e:  # same output.dir, another lr: the field is named, not its value
        jobs.check_binding(RUN, JID, first, _spec(tmp_path / "victim-secret-dir", "train.lr=1e-2"),
                           lambda: victim.to_dict())
    assert "train.lr differ" in str(e.value) and "0.0003" not in str(e.value)
    with pytest.raises(SpecError, match="trains something else"):
        jobs.check_binding(RUN, JID, first, _spec(tmp_path / "victim-secret-dir", "train.lr=1e-2"))
    # a first submission recorded before the digest was kept binds its output.dir
    jobs.check_binding(RUN, JID, {"output_dir": first["output_dir"]}, _spec(tmp_path / "victim-secret-dir"))


def test_a_submission_around_the_client_with_copied_metadata_is_no_part_of_the_job(tmp_path):
    """Every token holder can read a job's metadata. A submission that copies it but runs another
    entrypoint is not followed by status and fetch."""
    victim = _spec(tmp_path / "victim")
    copied = _submission(f"{RUN}.r2", victim, "SUCCEEDED", 2)
    copied.entrypoint = "echo manifest: sha256:" + "e" * 64
    listed = [_submission(RUN, victim, "SUCCEEDED", 1), copied]
    assert [j.submission_id for j in jobs.job_submissions(listed, RUN)] == [RUN]


def test_jobrun_refuses_a_spec_its_submissions_metadata_does_not_describe(tmp_path, monkeypatch, capsys):
    """lora-dist's entrypoint with the victim's metadata copied and a spec of the attacker's (its own
    output.dir, or its own training under the victim's output.dir): exit 2 before anything runs.
    The metadata submit_remote writes for a spec passes with that spec."""
    import json

    from lora_dist import jobrun

    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.setenv("LORA_DIST_DATA_ROOT", str(Path(E2E_CSV).parent))
    ran: list[str] = []
    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: ran.append("ran") or tmp_path / "none")
    victim = _spec(tmp_path / "victim")
    meta = {jobs.METADATA_TAG: "1", "name": NAME, "job_id": JID, "max_steps": "2", **jobs.binding(victim)}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}, "metadata": meta}))
    payload = tmp_path / "job-spec.json"
    for spec, differ in ((_spec(tmp_path / "evil"), "output_dir"),
                         (_spec(tmp_path / "victim", "train.lr=0.01"), "spec_digest")):
        payload.write_text(json.dumps({"spec": spec.to_dict(), "job_id": JID}))
        assert jobrun.main([str(payload)]) == 2
        err = capsys.readouterr().err
        assert "metadata names another job than the spec it runs" in err and differ in err, err
    payload.write_text(json.dumps({"spec": victim.to_dict(), "job_id": "other"}))
    assert jobrun.main([str(payload)]) == 2 and "job_id" in capsys.readouterr().err
    assert ran == []
    payload.write_text(json.dumps({"spec": victim.to_dict(), "job_id": JID}))
    assert jobrun.main([str(payload)]) == 0 and ran == ["ran"]


# --- item 2: the embedded registry ----------------------------------------------------------------------

def _registry_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LORA_DIST_CACHE"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_an_embedded_resubmit_with_another_output_dir_is_refused_and_the_record_kept(tmp_path, monkeypatch):
    """The victim's finished job in the registry; `submit --job-id` of its id with the attacker's
    output.dir exits 2 naming the job, starts nothing, and status still shows the victim's artifact."""
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    victim = _spec(tmp_path / "victim")
    artifact = str(tmp_path / "victim" / RUN)
    registry.new_record(RUN, state="SUCCEEDED", pid=1, name=NAME, job=JID, max_steps=2, artifact=artifact,
                        manifest_digest="sha256:" + "a" * 64, **jobs.binding(victim))
    before = (tmp_path / "cache" / "jobs" / f"{RUN}.json").read_bytes()
    env = _registry_env(tmp_path)
    r = _cli("submit", str(MAIN_JOB), "--job-id", JID, f"--set=data.path={E2E_CSV}",
             f"--set=output.dir={tmp_path / 'evil'}", "--set=train.max_steps=2", env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"job {RUN} (--job-id {JID}): its output.dir differs" in r.stderr and str(tmp_path / "victim") not in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "evil").exists()
    assert (tmp_path / "cache" / "jobs" / f"{RUN}.json").read_bytes() == before
    st = _cli("status", RUN, env=env, cwd=tmp_path)
    assert st.returncode == 0 and f"artifact {artifact}" in st.stdout, st.stdout + st.stderr


def test_a_resubmits_record_keeps_the_first_submissions_binding(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    registry.new_record(RUN, state="FAILED", spec_digest="sha256:first", output_dir="/first")
    registry.new_record(RUN, state="RUNNING", spec_digest="sha256:later", output_dir="/later")
    r = registry.read_record(RUN)
    assert (r["state"], r["spec_digest"], r["output_dir"]) == ("RUNNING", "sha256:first", "/first")


# --- item 9: stop signals only the process it recorded --------------------------------------------------

def test_stop_leaves_alone_a_process_that_took_the_recorded_pid(tmp_path, monkeypatch):
    """A record whose pids now name a stand-in (started at another time than recorded): stop
    signals nothing, and reports the job as not running."""
    from lora_dist.embedded import EmbeddedJobs

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    stand_in = subprocess.Popen(["sleep", "60"])
    try:
        wrong = 12345.0  # not when the stand-in started
        registry.new_record(RUN, state="RUNNING", pid=stand_in.pid, pid_started=wrong, driver_pid=stand_in.pid,
                            driver_started=wrong, name=NAME, job=JID, output_dir=str(tmp_path / "out"))
        t0 = time.monotonic()
        assert EmbeddedJobs().stop(RUN, timeout=10) == "FAILED"
        assert EmbeddedJobs().status(RUN).message == "the submitting process is gone"
        time.sleep(0.5)
        assert stand_in.poll() is None, "the stand-in was signalled"
        assert time.monotonic() - t0 < 5
        # the submitter alive as recorded, the job's pid someone else's: still not signalled
        registry.record(RUN, pid=os.getpid(), pid_started=registry.process_start(os.getpid()))
        EmbeddedJobs()._interrupt(RUN)
        time.sleep(0.5)
        assert stand_in.poll() is None, "the stand-in was signalled"
        started = registry.process_start(stand_in.pid)
        assert registry.same_process(stand_in.pid, started) and not registry.same_process(stand_in.pid, wrong)
    finally:
        stand_in.kill()
        stand_in.wait()


# --- item 10: an unreadable registry record -------------------------------------------------------------

@pytest.mark.parametrize("content", ["", '{"state": "SUCC', "[]"])
def test_an_empty_or_cut_off_record_is_a_one_line_error(tmp_path, content):
    env = _registry_env(tmp_path)
    (tmp_path / "cache" / "jobs").mkdir(parents=True)
    (tmp_path / "cache" / "jobs" / f"{RUN}.json").write_text(content)
    for args in (["status", RUN], ["fetch", RUN, "--out", str(tmp_path / "f")], ["stop", RUN], ["logs", RUN]):
        r = _cli(*args, env=env, cwd=tmp_path)
        assert r.returncode == 3, (args, r.stdout + r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert f"the record of job {RUN}" in r.stderr and "remove the file" in r.stderr, r.stderr
    assert _cli("list", env=env, cwd=tmp_path).returncode == 0
