"""The Python SDK (`from lora_dist import Client`): errors are the package's exceptions (fast, on the
tiny model), and a real 2-step job on the embedded default is submitted, waited for and fetched
into an artifact that `lora-dist verify` accepts (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import Client, store
from lora_dist.errors import ArtifactError, JobError, ModelError, NoArtifact
from lora_dist.spec import SpecError, load_spec

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES


@pytest.fixture
def registry(tmp_path, monkeypatch) -> Path:
    """This test's own registry (LORA_DIST_CACHE) and output root; no cluster address."""
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return tmp_path / "cache"


def test_errors_are_the_packages_exceptions_never_system_exit(registry, tmp_path, tiny_llama_dir):
    client = Client()
    with pytest.raises(SpecError, match="spec file not found"):
        client.submit(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="train.max_steps"):
        client.submit(MAIN_JOB, overrides={"train.max_steps": "many"})
    with pytest.raises(JobError, match="is not a job id"):
        client.submit(MAIN_JOB, overrides={"model.base": str(tiny_llama_dir)}, job_id="../x")
    with pytest.raises(JobError, match="no job nope on the embedded default"):
        client.job("nope").status()
    with pytest.raises(JobError, match="no job nope"):
        list(client.job("nope").logs())
    with pytest.raises(JobError, match="no job nope"):
        client.job("nope").fetch(tmp_path / "out")
    assert client.jobs() == []
    assert not (tmp_path / "runs").exists()


def test_a_spec_as_path_mapping_or_jobspec_and_overrides_as_dict_or_strings(registry, tiny_llama_dir):
    """The three forms of a spec and the two of overrides reach the same validation; a held job id
    is refused at once (JobError), before anything is written."""
    import fcntl

    from lora_dist.client import job_spec

    spec = load_spec(MAIN_JOB)
    as_path = job_spec(MAIN_JOB, {"train.max_steps": 2, "lora.targets": ["q_proj"], "data.path": None})
    assert as_path.train.max_steps == 2 and as_path.lora.targets == ("q_proj",) and as_path.data.path is None
    assert job_spec(spec, ["train.max_steps=2", "lora.targets=[q_proj]", "data.path="]) == as_path
    assert job_spec(spec.to_dict(), {"train.max_steps": 2, "lora.targets": "q_proj", "data.path": None}) == as_path
    with pytest.raises(SpecError, match="lora.r"):
        job_spec({**spec.to_dict(), "lora": {"r": 0}})

    (registry / "jobs").mkdir(parents=True)
    held = open(registry / "jobs" / "smollm2-e2e-once.lock", "w")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    held.write(str(os.getpid()))
    held.flush()
    try:
        with pytest.raises(JobError, match=f"already running on the embedded default \\(pid {os.getpid()}"):
            Client().submit(MAIN_JOB, {"model.base": str(tiny_llama_dir)}, job_id="once")
    finally:
        held.close()
    assert not (registry / "jobs" / "smollm2-e2e-once.json").exists()


def test_a_refused_embedded_job_raises_from_wait_and_leaves_no_record(registry, tmp_path, tiny_llama_dir):
    """The job's process checks the model before it runs: a target the model lacks comes back to
    the submitter as a ModelError from wait(); the registry is as it was (no record)."""
    client = Client()
    job = client.submit(MAIN_JOB, {"model.base": str(tiny_llama_dir), "data.path": str(E2E_CSV),
                                   "lora.targets": ["no_such_proj"], "output.dir": str(tmp_path / "runs")},
                        job_id="refused")
    assert job.id == "smollm2-e2e-refused"
    with pytest.raises(ModelError, match="no_such_proj"):
        job.wait(timeout=300)
    with pytest.raises(JobError, match="no job smollm2-e2e-refused"):
        job.status()
    assert not (tmp_path / "runs").exists()


def test_a_resubmit_through_the_job_process_publishes_once_and_refuses_another_spec(registry, tiny_trained,
                                                                                     tiny_llama_dir):
    """The job's process reaches the run: a job id that already published from this spec answers
    SUCCEEDED with that artifact and its digest (nothing runs again); the same id with train.lr
    changed is refused: SpecError from wait(), naming the field, and the record as it was."""
    artifact = tiny_trained[0]
    same = [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", f"output.dir={artifact.parent}", *TINY_OVERRIDES]
    client = Client()
    job = client.submit(MAIN_JOB, same, job_id="tiny")
    st = job.wait(timeout=300)
    assert (st.state, st.artifact, st.manifest) == ("SUCCEEDED", str(artifact), store.manifest_digest(artifact)), st
    assert any("already published" in line for line in job.logs())
    changed = client.submit(MAIN_JOB, [*same, "train.lr=1e-2"], job_id="tiny")
    with pytest.raises(SpecError, match="train.lr"):
        changed.wait(timeout=300)
    assert client.job("smollm2-e2e-tiny").status() == st


def test_logs_are_lines_and_fetch_checks_the_recorded_digest(registry, tmp_path, tiny_trained):
    """An embedded job's record: logs come back line by line; fetch copies and verifies the
    artifact against the digest recorded when it was published, and refuses when it differs."""
    from lora_dist import registry

    art = tmp_path / "runs" / "demo-j3"
    shutil.copytree(tiny_trained[0], art)
    log = tmp_path / "demo.log"
    log.write_text("job demo-j3 on an embedded local Ray\nstep 1/4  loss 2.0\nno newline at the end")
    registry.record("demo-j3", state="RUNNING", pid=os.getpid(), name="demo", job="j3", output_dir=str(art.parent),
                    max_steps=4, log=str(log))
    job = Client().job("demo-j3")
    assert list(job.logs()) == ["job demo-j3 on an embedded local Ray\n", "step 1/4  loss 2.0\n",
                                "no newline at the end"]
    with pytest.raises(NoArtifact, match="job demo-j3 is RUNNING: it has no artifact to fetch"):
        job.fetch(tmp_path / "early")
    digest = store.manifest_digest(art)
    registry.record("demo-j3", state="SUCCEEDED", artifact=str(art), manifest_digest=digest)
    assert job.wait(timeout=5).manifest == digest
    assert job.fetch(tmp_path / "ok") == tmp_path / "ok" and (tmp_path / "ok" / store.MANIFEST_FILE).is_file()
    manifest = json.loads((art / store.MANIFEST_FILE).read_text())
    (art / store.MANIFEST_FILE).write_text(json.dumps({**manifest, "final_loss": 0.001}))
    with pytest.raises(ArtifactError, match="changed"):
        job.fetch(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_a_two_step_job_through_the_sdk_gives_an_artifact_verify_accepts(registry, tmp_path, smollm2_dir):
    """Client().submit on the embedded default returns while the job runs; wait() ends SUCCEEDED;
    fetch() gives a directory that `lora-dist verify` (a separate process) accepts."""
    (registry / "models").mkdir(parents=True)
    (registry / "models" / "smollm2-135m").symlink_to(smollm2_dir)
    client = Client()
    t0 = time.time()
    job = client.submit(MAIN_JOB, overrides={"train.max_steps": 2, "train.micro_batch_size": 2, "data.max_length": 48,
                                             "train.eval_batches": 1, "train.log_every": 1,
                                             "cluster.zero_stage": "auto", "data.path": str(E2E_CSV),
                                             "output.dir": str(tmp_path / "runs")})
    assert time.time() - t0 < 30 and job.status().state == "RUNNING"  # submit returns at once
    assert [st.job_id for st in client.jobs()] == [job.id]
    st = job.wait()
    assert st.state == "SUCCEEDED" and (st.step, st.total_steps) == (2, 2), (st, "".join(job.logs())[-3000:])
    assert any("step 2/2  loss" in line for line in job.logs())  # a worker's line, prefixed by Ray
    fetched = job.fetch(tmp_path / "fetched")
    assert st.manifest == store.manifest_digest(fetched)
    verify = subprocess.run([sys.executable, "-m", "lora_dist.cli", "verify", str(fetched), f"--digest={st.manifest}"],
                            capture_output=True, text=True, timeout=300, cwd=REPO, env=dict(os.environ))
    assert verify.returncode == 0 and verify.stdout.startswith("ok: "), verify.stdout + verify.stderr
