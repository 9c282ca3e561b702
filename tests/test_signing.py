"""$LORA_DIST_SIGNING_KEY over checkpoints (issue 31, item 7) and an empty key (item 10): with a
key set, checkpoints are signed, and resume refuses an unsigned or badly signed one (the job fails;
the checkpoint stays); without a key, checkpoints behave as before; a key set but empty is refused
wherever it is read. Fast on checkpoint.py and the driver's check; slow through the worker's own
resume on gloo processes (tests/zero_run.py)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_dist import checkpoint as ckpt
from lora_dist.records import CheckpointState
from lora_dist.store import SIGNING_KEY_ENV

from conftest import E2E_CSV, MAIN_JOB, run_cli

KEY = "cluster-key-31"


def _write(root: str, step: int, spec: dict) -> Path:
    state = CheckpointState(step=step, next_index=step, world_size=1, scalars={"optimizer_step": float(step)},
                            rng=[{}], spec=spec, spec_digest="sha256:0")
    return Path(ckpt.write(root, step, {"param/x": torch.full((2, 3), float(step))}, state, ""))


def _job(tmp_path: Path, tiny_llama_dir: Path):
    from lora_dist.runtime_env import redacted
    from lora_dist.spec import load_spec

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}",
                                f"output.dir={tmp_path / 'runs'}"]).with_absolute_paths()
    return spec, ckpt.checkpoints_dir(spec.output.dir, spec.name, "j1"), redacted(spec.to_dict())


def test_a_planted_unsigned_checkpoint_is_refused_with_a_key_set(tmp_path, tiny_llama_dir, monkeypatch):
    """Whoever can write .checkpoints/ plants a self-consistent checkpoint (the job's own spec, every
    sha256 right) as the newest step: with the key set the driver refuses to start the job,
    naming it, and leaves it in place; nothing skips it for the older signed one. Without the
    key, checkpoints are what they were: the newest complete one resumes."""
    from lora_dist.launch import published_or_resumable, run_job

    spec, root, mine = _job(tmp_path, tiny_llama_dir)
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    signed = _write(root, 2, mine)
    assert json.loads((signed / ckpt.MANIFEST).read_text())["signature"].startswith("hmac-sha256:")
    monkeypatch.delenv(SIGNING_KEY_ENV)
    planted = _write(root, 3, mine)  # written without the key: self-consistent, unsigned
    assert "signature" not in json.loads((planted / ckpt.MANIFEST).read_text())
    assert ckpt.latest(root) == str(planted)  # no key: as before

    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    said: list[str] = []
    with pytest.raises(ckpt.UntrustedCheckpoint, match=rf"step-00000003/manifest.json: not signed, and "
                                                       rf"{SIGNING_KEY_ENV} is set.*left in place"):
        ckpt.latest(root, say=said.append)
    assert said == []  # refused, not skipped
    with pytest.raises(ckpt.UntrustedCheckpoint):
        ckpt.load(str(planted))
    with pytest.raises(ckpt.UntrustedCheckpoint):
        published_or_resumable(spec, "j1", io.StringIO())
    with pytest.raises(ckpt.UntrustedCheckpoint):  # the job fails before Ray is started
        run_job(spec, job_id="j1", stream=io.StringIO())
    assert planted.is_dir() and signed.is_dir()  # never deleted

    shutil.rmtree(planted)  # once looked into and removed: the signed one resumes
    log = io.StringIO()
    assert published_or_resumable(spec, "j1", log) is None
    assert log.getvalue() == f"job {spec.name}-j1 resumes from its checkpoint of step 2\n"
    assert ckpt.load(ckpt.latest(root)).step == 2


def test_a_tampered_or_foreign_signature_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    location = _write(str(tmp_path), 4, {"name": "a"})
    manifest_path = location / ckpt.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    good = manifest["signature"]
    assert ckpt.load(str(location)).step == 4

    manifest["signature"] = good[:-4] + ("0000" if not good.endswith("0000") else "1111")
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.UntrustedCheckpoint, match="the signature does not match"):
        ckpt.latest(str(tmp_path))

    manifest["signature"], manifest["step"] = good, 5  # the signature, but over something else
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ckpt.UntrustedCheckpoint, match="the signature does not match"):
        ckpt.load(str(location))

    monkeypatch.setenv(SIGNING_KEY_ENV, "another-cluster")
    other = _write(str(tmp_path / "other"), 4, {"name": "a"})
    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    with pytest.raises(ckpt.UntrustedCheckpoint, match="signed with another key"):
        ckpt.load(str(other))


@pytest.mark.parametrize("value", ["", "   ", "\t\n"])
def test_an_empty_signing_key_is_refused_wherever_it_is_read(tmp_path, tiny_llama_dir, monkeypatch, value):
    """Set but empty, the key used to mean "unsigned" without a word. Now: exit 2 and a message
    from train (before the model is built), verify, the cluster side (jobrun), and a checkpoint
    write or read."""
    import os

    from lora_dist import jobrun
    from lora_dist.errors import SettingError
    from lora_dist.store import signing_key

    monkeypatch.setenv(SIGNING_KEY_ENV, value)
    with pytest.raises(SettingError, match=f"{SIGNING_KEY_ENV} is set but empty"):
        signing_key()
    with pytest.raises(SettingError):
        _write(str(tmp_path / "c"), 1, {"name": "a"})
    env = {**os.environ, SIGNING_KEY_ENV: value}
    args = [f"--set=model.base={tiny_llama_dir}", f"--set=data.path={E2E_CSV}", f"--set=output.dir={tmp_path}/runs"]
    from test_records import ARTIFACT  # signed: an empty key used to pass it unchecked, exit 0

    for command in (["train", str(MAIN_JOB), *args], ["verify", str(ARTIFACT)]):
        proc = run_cli(*command, cwd=tmp_path, check=False, env=env, timeout=300)
        assert proc.returncode == 2 and f"error: {SIGNING_KEY_ENV} is set but empty" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # train refused before anything was written

    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path))
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    payload = tmp_path / "job-spec.json"
    payload.write_text(json.dumps({"spec": {"name": "x", "output": {"dir": str(tmp_path / "runs")}}, "job_id": "j1"}))
    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: pytest.fail("a refused job must not run"))
    assert jobrun.main([str(payload)]) == 2


@pytest.mark.slow
def test_the_worker_resumes_a_signed_checkpoint_and_refuses_a_planted_one(tmp_path, tiny_llama_dir, monkeypatch):
    """The worker's own resume (real DeepSpeed, gloo, no Ray) with the key in every rank's
    environment: a run stopped after its step-2 checkpoint (signed); a self-consistent unsigned
    step 3 planted beside it fails both ranks of a 2-worker restart with the message (neither
    waits on the other) and stays; removed, the job resumes from step 2 and publishes."""
    from zero_run import job_config, run_ranks

    from lora_dist.store import artifact_location, verify_artifact

    monkeypatch.setenv(SIGNING_KEY_ENV, KEY)
    out = tmp_path / "runs"

    def job(world: int, **mode) -> dict:
        return {**job_config("signed", tiny_llama_dir, ("q_proj", "v_proj"), out, world, steps=3,
                             extra=("train.checkpoint_every=2",)), **mode}

    root = Path(ckpt.checkpoints_dir(str(out), "signed", "signed"))
    run_ranks([job(1, stop_after=2)], 1)
    step2 = root / "step-00000002"
    assert json.loads((step2 / ckpt.MANIFEST).read_text())["signature"].startswith("hmac-sha256:")

    planted = root / "step-00000003"
    shutil.copytree(step2, planted)
    manifest = json.loads((planted / ckpt.MANIFEST).read_text())
    del manifest["signature"]
    (planted / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RuntimeError, match="not signed, and LORA_DIST_SIGNING_KEY is set"):
        run_ranks([job(2)], 2, timeout=600)
    assert planted.is_dir()

    shutil.rmtree(planted)
    logs = run_ranks([job(1)], 1)
    assert "resumed from the checkpoint of step 2" in logs[0], logs[0][-3000:]
    manifest = verify_artifact(Path(artifact_location(str(out), "signed", "signed")))  # the key checks it
    assert manifest.resumed_from_step == 2 and manifest.signature.startswith("hmac-sha256:")
