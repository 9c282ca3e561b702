"""Resumable checkpoints are the project's own (safetensors + JSON + a sha256 manifest), nothing in
them is unpickled, and a job resumes from them at another worker count and ZeRO stage.

The fast tests check the format on its own; the slow one runs the worker code in gloo processes
(tests/zero_run.py: real DeepSpeed ZeRO-3, no Ray) on the tiny Llama: stop after a checkpoint,
restore it at other world sizes, refuse it under a changed spec, skip a torn one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lora_dist import checkpoint as ckpt
from lora_dist.errors import ArtifactError
from lora_dist.records import CheckpointState


def _state(step: int, spec: dict) -> CheckpointState:
    return CheckpointState(step=step, next_index=step, world_size=1, scalars={"optimizer_step": float(step)},
                           rng=[{}], spec=spec, spec_digest="sha256:0")


def _write(root: Path, step: int) -> str:
    tensors = {"param/x": torch.full((2, 3), float(step)), "exp_avg/x": torch.zeros(2, 3)}
    return ckpt.write(str(root), step, tensors, _state(step, {"name": "a"}), f'{{"step": {step}}}\n')


def test_a_checkpoint_round_trips_and_keeps_the_newest_two(tmp_path):
    for step in (2, 4, 6):
        _write(tmp_path, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000006"]
    c = ckpt.load(ckpt.latest(str(tmp_path)))
    assert c.step == 6 and c.state == _state(6, {"name": "a"}) and c.metrics == '{"step": 6}\n'
    assert ckpt.latest_state(str(tmp_path)) == c.state
    assert torch.equal(c.tensors["param/x"], torch.full((2, 3), 6.0))


@pytest.mark.parametrize("damage", ["torn", "modified", "unlisted", "pickle"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_complete_one(tmp_path, damage):
    _write(tmp_path, 2)
    newest = Path(_write(tmp_path, 4))
    if damage == "torn":  # the writer died before the manifest
        (newest / ckpt.MANIFEST).unlink()
    elif damage == "modified":
        with open(newest / ckpt.STATE_TENSORS, "r+b") as f:
            f.seek(-4, 2)
            f.write(b"\x00\x01\x02\x03")
    elif damage == "unlisted":
        (newest / "extra.safetensors").write_bytes(b"x")
    else:  # whoever can write to the storage plants a pickle: it is never read
        torch.save({"x": 1}, newest / "mp_rank_00_model_states.pt")
    said: list[str] = []
    assert ckpt.latest(str(tmp_path), say=said.append).endswith("step-00000002")
    assert len(said) == 1 and "step 4 skipped" in said[0], said
    with pytest.raises(ArtifactError):
        ckpt.load(str(newest))


def test_nothing_in_the_package_unpickles():
    """No torch.load, pickle or DeepSpeed checkpoint loading anywhere in lora_dist."""
    package = Path(ckpt.__file__).parent
    found = [f"{p.name}: {needle}" for p in package.glob("*.py") for needle in
             ("torch.load", "import pickle", "load_checkpoint(", "weights_only=False", "cloudpickle")
             if needle in p.read_text()]
    assert not found, found


@pytest.mark.slow
def test_a_job_resumes_at_another_worker_count(tmp_path, tiny_llama_dir):
    from zero_run import job_config, run_ranks

    from lora_dist.store import METRICS_FILE, artifact_location, verify_artifact

    out = tmp_path / "runs"
    extra = ("train.checkpoint_every=2",)

    def job(world: int, *more: str, **mode) -> dict:
        return {**job_config("elastic", tiny_llama_dir, ("q_proj", "v_proj"), out, world, steps=4,
                             extra=extra + more), **mode}

    root = Path(ckpt.checkpoints_dir(str(out), "elastic", "elastic"))
    work = Path(job(2)["work_dir"])
    work.mkdir(parents=True)  # what an earlier attempt lost before its first checkpoint recorded
    (work / METRICS_FILE).write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    run_ranks([job(2, "cluster.zero_stage=2", stop_after=2)], 2)  # two ZeRO-2 workers, lost after step 2
    assert [p.name for p in root.iterdir() if p.name.startswith("step-")] == ["step-00000002"]
    assert not list(root.rglob("*.pt")) and not list(root.rglob("*.pkl"))

    # Restored into three workers under each ZeRO stage (written under 2; 1 and 2 hold the model
    # whole on every rank and partition only the optimizer state, 3 partitions it too), gathered
    # again: exactly the checkpoint in the optimizer's master and in the copy the forward uses,
    # and where it left off.
    probes = {stage: tmp_path / f"restore-{stage}" for stage in (1, 2, 3)}
    run_ranks([job(3, f"cluster.zero_stage={stage}", check_restore=str(probe)) for stage, probe in probes.items()], 3)
    saved = ckpt.load(ckpt.latest(str(root)))
    for stage, probe in probes.items():
        r = json.loads(Path(f"{probe}.0.json").read_text())
        assert r["zero_stage"] == stage and r["resumed"] == 2 and r["max_abs_diff"] == 0.0, r
        assert r["compute_copy_diff"] == 0.0, r
        assert r["optimizer_step"] == r["saved_optimizer_step"] == 2.0
        assert r["index_base"] == r["saved_next_index"] == 2 * 2  # 2 steps x 2 workers x grad_accum 1
        assert r["lr"] == pytest.approx(saved.state.scalars["scheduler"]["_last_lr"][0])

    # A newer checkpoint torn by its writer's death is skipped for step 2.
    shutil.copytree(root / "step-00000002", root / "step-00000003")
    (root / "step-00000003" / ckpt.MANIFEST).unlink()

    # One worker finishes the job from step 2 under zero_stage auto, which replicates the base
    # (ZeRO-1: the host's memory holds it many times): every step once, the artifact complete.
    logs = run_ranks([job(1, "cluster.zero_stage=auto")], 1)
    assert "checkpoint of step 3 skipped" in logs[0] and "written by 2 workers, now 1" in logs[0], logs[0][-3000:]
    artifact = Path(artifact_location(str(out), "elastic", "elastic"))
    manifest = verify_artifact(artifact)
    assert manifest.resumed_from_step == 2 and manifest.world_size == 1
    assert manifest.zero_stage == 1 and manifest.zero_stage_reason.startswith("auto: "), manifest
    history = [json.loads(x) for x in (artifact / METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in history if "loss" in m] == [1, 2, 3, 4], history
    assert all(m["loss"] != 9.0 for m in history if "loss" in m)  # the lost attempt's records are gone
    assert not root.exists()  # published: its checkpoints are gone

    # A retry after the publishing rename (a worker lost before its final report): the worker
    # reports the published artifact and trains nothing; it used to fail with "already exists".
    logs = run_ranks([job(1)], 1)
    assert "artifact already published" in logs[0] and "step 1/4" not in logs[0], logs[0][-3000:]
    final = json.loads((work / "reports0.jsonl").read_text().splitlines()[-1])
    assert final["artifact"] == str(artifact) and final["manifest_digest"].startswith("sha256:")
    assert verify_artifact(artifact, digest=final["manifest_digest"]) == manifest


@pytest.mark.slow
def test_early_stop_exports_the_best_adapter_and_survives_a_restart(tmp_path, tiny_llama_dir):
    """Two ZeRO-3 workers validate every step and stop 2 validations after the best (a learning
    rate high enough for the validation loss to turn). A job lost after the checkpoint of step 3,
    one validation past the best, resumes from it with the best adapter and the count it carried,
    stops where the uninterrupted job stopped, and exports the same best adapter (within 1e-6)."""
    from zero_run import job_config, run_ranks

    from lora_dist.adapter import read_lora_tensors
    from lora_dist.store import METRICS_FILE, artifact_location, verify_artifact

    out = tmp_path / "runs"
    extra = ("train.eval_every=1", "train.early_stop_patience=2", "train.lr=0.3", "train.checkpoint_every=1",
             "cluster.zero_stage=3", "train.eval_batches=4")

    def job(name: str, **mode) -> dict:
        return {**job_config(name, tiny_llama_dir, ("q_proj", "v_proj"), out, 2, steps=12, extra=extra), **mode}

    run_ranks([job("whole"), job("lost", lose_after=3)], 2)
    whole = Path(artifact_location(str(out), "whole", "whole"))
    manifest = verify_artifact(whole)
    vals = {m["step"]: m["val_loss"] for m in map(json.loads, (whole / METRICS_FILE).read_text().splitlines())
            if "val_loss" in m}
    best, stopped = manifest.best_step, manifest.stopped_at
    assert stopped is not None and stopped < 12 and manifest.steps == stopped, manifest
    assert best == min((s for s in vals if 1 <= s <= stopped), key=lambda s: vals[s]) and stopped - best == 2
    assert manifest.best_val_loss == manifest.val_loss_after == vals[best] < vals[stopped]
    assert best == 2, vals  # the case the restart below is about: lost one validation after the best

    saved = ckpt.load(ckpt.latest(ckpt.checkpoints_dir(str(out), "lost", "lost")))
    assert saved.step == 3 and saved.state.early_stop.best_step == best
    assert saved.state.early_stop.since == 1
    logs = run_ranks([job("lost")], 2)
    assert "resumed from the checkpoint of step 3" in logs[0] and f"early stop at step {stopped}" in logs[0]
    resumed = verify_artifact(Path(artifact_location(str(out), "lost", "lost")))
    assert (resumed.best_step, resumed.stopped_at, resumed.resumed_from_step) == (best, stopped, 3)
    a = read_lora_tensors(whole)
    b = read_lora_tensors(Path(artifact_location(str(out), "lost", "lost")))
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert any(v.any() for k, v in a.items() if "lora_B" in k)


def test_a_resubmit_of_a_published_job_returns_its_artifact_without_running(tiny_trained, tmp_path):
    """Same job id, same spec: the artifact (nothing started, Ray not even imported for it); the
    same job id with a spec that trains something else: refused before anything runs, naming
    the field; a field a resumed job may change (the worker count) is not a difference."""
    import io

    from lora_dist.launch import run_job
    from lora_dist.spec import SpecError, spec_from_dict
    from lora_dist.store import read_manifest

    artifact, _ = tiny_trained
    spec = spec_from_dict(read_manifest(artifact).spec)
    log = io.StringIO()
    assert run_job(spec, job_id="tiny", stream=log) == artifact
    assert "already published" in log.getvalue()
    wider = spec_from_dict({**spec.to_dict(), "cluster": {**spec.to_dict()["cluster"], "workers": 4}})
    assert run_job(wider, job_id="tiny", stream=log) == artifact
    changed = spec_from_dict({**spec.to_dict(), "lora": {**spec.to_dict()["lora"], "r": 16}})
    with pytest.raises(SpecError, match=r"lora\.r: 4 -> 16"):
        run_job(changed, job_id="tiny", stream=log)


def test_a_changed_spec_cannot_continue_a_checkpoint(tiny_llama_dir, tmp_path):
    import io

    from conftest import E2E_CSV, MAIN_JOB
    from lora_dist.launch import run_job
    from lora_dist.runtime_env import redacted
    from lora_dist.spec import SpecError, load_spec

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}",
                                f"output.dir={tmp_path / 'runs'}"]).with_absolute_paths()
    root = ckpt.checkpoints_dir(spec.output.dir, spec.name, "j1")
    ckpt.write(root, 3, {"param/x": torch.zeros(1)}, _state(3, redacted(spec.to_dict())), "")
    changed = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}",
                                   f"output.dir={tmp_path / 'runs'}", "train.max_steps=999"])
    with pytest.raises(SpecError, match=r"train\.max_steps: \d+ -> 999.*use a new --job-id"):
        run_job(changed, job_id="j1", stream=io.StringIO())
    assert Path(root, "step-00000003").is_dir()  # the checkpoint is untouched


def test_the_same_spec_is_told_which_checkpoint_it_resumes_from(tiny_llama_dir, tmp_path):
    import io

    from conftest import E2E_CSV, MAIN_JOB
    from lora_dist.launch import published_or_resumable
    from lora_dist.runtime_env import redacted
    from lora_dist.spec import load_spec

    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}",
                                f"output.dir={tmp_path / 'runs'}"]).with_absolute_paths()
    ckpt.write(ckpt.checkpoints_dir(spec.output.dir, spec.name, "j1"), 3, {"param/x": torch.zeros(1)},
               _state(3, redacted(spec.to_dict())), "")
    said = io.StringIO()
    assert published_or_resumable(spec, "j1", said) is None  # the job runs, from its checkpoint
    assert said.getvalue() == f"job {spec.name}-j1 resumes from its checkpoint of step 3\n"


@pytest.mark.parametrize("entry", ["run_job", "train_local"])
def test_a_job_id_that_is_a_path_is_refused_on_every_entry(tmp_path, entry):
    """A job id names directories (artifact, work dir, checkpoints): '../../x' must never reach one."""
    import io

    from conftest import MAIN_JOB
    from lora_dist import launch, train
    from lora_dist.errors import JobError
    from lora_dist.spec import load_spec

    spec = load_spec(MAIN_JOB, [f"output.dir={tmp_path / 'runs'}"])
    run = launch.run_job if entry == "run_job" else train.train_local
    with pytest.raises(JobError, match="is not a job id"):
        run(spec, job_id="../../x", stream=io.StringIO())
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_the_same_spec_and_seed_give_a_byte_identical_adapter(tiny_trained, tmp_path):
    import io

    from lora_dist.spec import spec_from_dict
    from lora_dist.store import ADAPTER_FILE, read_manifest
    from lora_dist.train import train_local

    first, _ = tiny_trained
    spec = spec_from_dict(read_manifest(first).spec)
    again = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": str(tmp_path)})})
    second = train_local(again, job_id="tiny", stream=io.StringIO())
    assert (second / ADAPTER_FILE).read_bytes() == (first / ADAPTER_FILE).read_bytes()
