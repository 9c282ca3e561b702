"""Experiment tracking (tracking.py) read back with MLflow's own client and TensorBoard's own
reader, and train.epochs (epochs.py): the steps it means, and a job that trains them."""

from __future__ import annotations

import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli

from lora_dist.store import METRICS_FILE, digest_at


def _tiny_spec(tiny_llama_dir, tmp_path, *extra):
    from lora_dist.spec import load_spec

    return load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}",
                                f"output.dir={tmp_path / 'runs'}", *TINY_OVERRIDES, *extra])


def _history(artifact: Path) -> list[dict]:
    return [json.loads(line) for line in (artifact / METRICS_FILE).read_text().splitlines() if line.strip()]


def test_an_mlflow_run_and_tensorboard_events_hold_what_metrics_jsonl_holds(tiny_llama_dir, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_dist.train import train_local

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _tiny_spec(tiny_llama_dir, tmp_path, f"tracking.mlflow={store}", "tracking.experiment=tiny-exp",
                      f"tracking.tensorboard={tmp_path / 'tb'}", "train.eval_every=2")
    log = io.StringIO()
    artifact = train_local(spec, job_id="tracked", stream=log)
    history = _history(artifact)
    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4], log.getvalue()

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("tiny-exp").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "loss"),
                                              key=lambda m: m.step)] == losses
    vals = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"),
                                              key=lambda m: m.step)] == vals and len(vals) == 3  # 0, 2, the end
    for name in ("lr", "real_tokens_per_s", "pad_tokens", "peak_memory_bytes", "epoch"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 4, name
    params = run.data.params
    assert params["train.lr"] == "0.005" and params["lora.r"] == "4" and params["name"] == spec.name
    assert params["data.path"] == str(E2E_CSV) and params["tracking.experiment"] == "tiny-exp"
    assert run.data.tags["artifact"] == str(artifact)
    assert run.data.tags["manifest_digest"] == digest_at(str(artifact)) and digest_at(str(artifact))
    assert run.data.tags["lora_dist.job_id"] == "tracked"

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")  # float32 in the event file
    assert [e.step for e in scalars] == [1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert [e.step for e in events.Scalars("val_loss")] == [s for s, _ in vals]


def test_a_failed_job_ends_its_run_failed_with_the_steps_it_trained(tiny_llama_dir, tmp_path):
    """The artifact cannot be published (output.dir a file:// URI under a regular file): the job
    fails after training, and its run says so."""
    from mlflow import MlflowClient

    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    (tmp_path / "a-file").write_text("not a directory")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", *TINY_OVERRIDES,
                                f"output.dir=file://{tmp_path / 'a-file' / 'runs'}", f"tracking.mlflow={store}"])
    with pytest.raises(Exception):
        train_local(spec, job_id="fails", stream=io.StringIO())
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert "artifact" not in run.data.tags


def test_an_unreachable_tracking_server_costs_the_tracking_not_the_training(tiny_llama_dir, tmp_path):
    import socket

    from lora_dist.train import train_local

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = _tiny_spec(tiny_llama_dir, tmp_path, f"tracking.mlflow=http://127.0.0.1:{port}")
    log = io.StringIO()
    artifact = train_local(spec, job_id="offline", stream=log)
    assert [r["step"] for r in _history(artifact) if "loss" in r] == [1, 2, 3, 4]
    said = [line for line in log.getvalue().splitlines() if line.startswith("tracking:")]
    assert len(said) == 1 and f"http://127.0.0.1:{port} failed" in said[0] and "goes on without it" in said[0], said


def test_a_resumed_job_continues_its_run_and_no_secret_is_a_parameter(tmp_path):
    from mlflow import MlflowClient

    from lora_dist.spec import spec_from_dict
    from lora_dist.tracking import tracked

    store = f"sqlite:///{tmp_path / 'm.db'}"
    raw = {"name": "resumed", "tracking": {"mlflow": store},
           # a value under an allowed name (a *KEY* name is refused outright: test_runtime_env)
           "cluster": {"runtime_env": {"env_vars": {"WANDB_PROJECT": "s3cret-value"}}}}
    said: list[str] = []
    with pytest.raises(RuntimeError):
        with tracked(spec_from_dict(raw), "j1", main=True, say=said.append) as tracker:
            tracker.log({"step": 1, "loss": 2.5, "peak_memory_bytes": [10, 30]})
            raise RuntimeError("a worker died")
    with tracked(spec_from_dict({**raw, "cluster": {**raw["cluster"], "workers": 2}}), "j1", main=True,
                 say=said.append) as tracker:
        tracker.log({"step": 2, "loss": 2.0, "peak_memory_bytes": [20, 5]})
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert run.info.status == "FINISHED" and "continues" in said[-1], said
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.5), (2, 2.0)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "peak_memory_bytes")] == [30, 20]
    assert run.data.params["cluster.workers"] == "1"  # parameters keep the first start's values
    assert "s3cret-value" not in json.dumps(run.data.params)
    assert json.loads(run.data.params["cluster.runtime_env"]) == {"env_vars": {"WANDB_PROJECT": "<redacted>"}}


def test_tracking_uris_are_checked_and_made_absolute(tmp_path, monkeypatch):
    from lora_dist.spec import SpecError, spec_from_dict

    monkeypatch.chdir(tmp_path)
    spec = spec_from_dict({"name": "x", "tracking": {"mlflow": "sqlite:///m.db", "tensorboard": "tb"}})
    t = spec.with_absolute_paths().tracking
    assert (t.mlflow, t.tensorboard) == (f"sqlite:///{tmp_path}/m.db", str(tmp_path / "tb"))
    assert spec_from_dict({"name": "x", "tracking": {"mlflow": "file:mlruns"}}).with_absolute_paths() \
        .tracking.mlflow == f"file://{tmp_path}/mlruns"
    for uri, expected in (("mysql://db/x", "expected sqlite:///PATH"), ("sqlite://m.db", "three slashes"),
                          ("https://user:pw@mlflow.example", "no credentials")):
        with pytest.raises(SpecError, match=f"tracking.mlflow: .*{expected}"):
            spec_from_dict({"name": "x", "tracking": {"mlflow": uri}})


def test_tracking_without_its_package_is_refused_before_anything_runs(tmp_path):
    code = ("import sys\nsys.modules['mlflow'] = None\nfrom lora_dist.cli import main\n"
            f"sys.exit(main(['train', {str(MAIN_JOB)!r}, '--set=tracking.mlflow=sqlite:///{tmp_path}/m.db', "
            f"'--set=output.dir={tmp_path}/runs']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "tracking.mlflow: needs the mlflow package" in out.stderr and "lora-dist[tracking]" in out.stderr
    assert not (tmp_path / "runs").exists()


# --- train.epochs --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["padded", "grouped", "packed"])
def test_epoch_steps_count_the_micro_batches_of_a_pass(mode):
    from lora_dist.data import GROUP_WINDOW, BatchPlan
    from lora_dist.epochs import epoch_steps

    lengths = [5 + (7 * j) % 23 for j in range(2 * 4 * GROUP_WINDOW)]  # exactly two windows of 4-example batches
    plan = BatchPlan(len(lengths), 4, seed=3, lengths=lengths, mode=mode, capacity=64)
    per_epoch = plan.micro_batches(plan.n)
    # the micro-batches that make one pass hold every example exactly once
    seen = sorted(j for i in range(round(per_epoch)) for j in plan.indices(i))
    assert seen == list(range(plan.n)) and per_epoch == round(per_epoch)
    if mode == "packed":
        assert per_epoch < plan.n / 4  # rows hold several examples
    else:
        assert per_epoch == plan.n / 4
    assert epoch_steps(3, per_epoch, workers=2, grad_accum=1) == math.ceil(3 * per_epoch / 2)
    assert epoch_steps(1, 10, workers=2, grad_accum=2) == 3  # the last step runs into the next epoch
    assert epoch_steps(0.01, 10, workers=8, grad_accum=8) == 1


def test_a_one_epoch_job_trains_one_pass_and_records_it(tiny_llama_dir, tmp_path):
    from lora_dist.records import Manifest
    from lora_dist.sources import read_jsonl, split_examples
    from lora_dist.spec import load_spec
    from lora_dist.store import MANIFEST_FILE
    from lora_dist.train import train_local

    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: what is {i} plus {i}?", "completion": f" {2 * i}"}) + "\n"
                            for i in range(40)))
    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", "data.source=jsonl", f"data.path={data}",
                                f"output.dir={tmp_path / 'runs'}", *TINY_OVERRIDES, "train.max_steps=null",
                                "train.epochs=1", "data.batching=padded"])
    n_train = len(split_examples(read_jsonl(data), spec.data)[0])
    expected = math.ceil(n_train / 4)
    log = io.StringIO()
    artifact = train_local(spec, job_id="epoch", stream=log)
    assert f"train.epochs: 1 = {expected} steps at 1 workers x 4 x 1" in log.getvalue()
    steps = [r for r in _history(artifact) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, expected + 1))
    assert steps[-1]["epoch"] == pytest.approx(expected * 4 / n_train) and steps[-1]["epoch"] >= 1
    assert re.search(rf"step {expected}/{expected}  loss \S+  lr \S+  epoch 1\.\d\d  real tok/s", log.getvalue())
    manifest = Manifest.model_validate_json((artifact / MANIFEST_FILE).read_text())
    assert manifest.steps == expected and manifest.epoch_plan.steps == expected
    assert manifest.epoch_plan.micro_batches_per_epoch == n_train / 4 and manifest.spec["train"]["epochs"] == 1


def test_max_steps_and_epochs_together_exit_2_naming_both(tmp_path):
    out = run_cli("train", str(MAIN_JOB), "--set=train.epochs=2", f"--set=output.dir={tmp_path}", cwd=REPO,
                  check=False)
    assert out.returncode == 2, out.stderr
    assert "train.max_steps, train.epochs: set one of them, not both" in out.stderr


@pytest.mark.slow
def test_a_sharded_job_by_epochs_is_tracked_and_resumed_at_another_worker_count(tmp_path, tiny_llama_dir):
    """The worker's own code (tests/zero_run.py: real DeepSpeed ZeRO-3, 2 ranks, no Ray): a job
    by epochs, lost after its step-2 checkpoint (its run ends FAILED), then resumed by one worker:
    it keeps the steps its first start derived for two, and continues the same run, whose loss
    history is then the artifact's metrics.jsonl."""
    from mlflow import MlflowClient
    from zero_run import job_config, run_ranks

    from lora_dist.records import Manifest
    from lora_dist.sources import read_jsonl, split_examples
    from lora_dist.spec import spec_from_dict
    from lora_dist.store import MANIFEST_FILE, artifact_location

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"name[Pub {i}]", "completion": f" Pub {i} is a pub."}) + "\n"
                            for i in range(40)))
    store, out = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"

    def job(world: int, **mode) -> dict:
        return {**job_config("by-epochs", tiny_llama_dir, ("q_proj", "v_proj"), out, world, extra=(
            "data.source=jsonl", f"data.path={data}", "train.max_steps=null", "train.epochs=1",
            "train.checkpoint_every=2", f"tracking.mlflow={store}")), **mode}

    spec = spec_from_dict(job(2)["spec"])
    expected = math.ceil(len(split_examples(read_jsonl(data), spec.data)[0]) / 2 / 2)  # 2 per micro-batch, 2 ranks
    client = MlflowClient(tracking_uri=store)

    logs = run_ranks([job(2, lose_after=2)], 2)
    assert f"train.epochs: 1 = {expected} steps at 2 workers x 2 x 1" in logs[0], logs[0][-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("by-epochs").experiment_id])
    assert run.info.status == "FAILED" and [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]

    logs = run_ranks([job(1)], 1)
    assert "as the job's first start fixed them" in logs[0] and "continues" in logs[0], logs[0][-3000:]
    artifact = Path(artifact_location(str(out), "by-epochs", "by-epochs"))
    manifest = Manifest.model_validate_json((artifact / MANIFEST_FILE).read_text())
    assert manifest.resumed_from_step == 2 and manifest.steps == expected
    assert (manifest.epoch_plan.workers, manifest.epoch_plan.steps) == (2, expected)
    losses = [(r["step"], r["loss"]) for r in _history(artifact) if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, expected + 1))
    (run,) = client.search_runs([client.get_experiment_by_name("by-epochs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["cluster.workers"] == "2"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")) == losses
    assert run.data.tags["manifest_digest"] == digest_at(str(artifact))
