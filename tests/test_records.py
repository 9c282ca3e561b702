"""The typed records (records.py) and their JSON contract: an artifact and a checkpoint written by
the code at 4eee545 (tests/data/, made by the script in that commit's message) still load and
verify, and reading then writing a record gives the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_dist.errors import ArtifactError
from lora_dist.records import CheckpointState, Manifest

DATA = Path(__file__).resolve().parent / "data"
ARTIFACT = DATA / "artifact-4eee545"
CHECKPOINT = DATA / "checkpoint-4eee545"
SIGNING_KEY = "tests-data-4eee545"  # what the artifact was signed with ($LORA_DIST_SIGNING_KEY)
MANIFEST_DIGEST = "sha256:48cd188f59d4a5e361d72220cdd490c3f1cc03a70d3199b81671d2b127276e24"


def test_an_artifact_written_by_4eee545_verifies_and_loads(monkeypatch):
    from lora_dist.adapter import read_lora_tensors
    from lora_dist.store import ADAPTER_FILE, CONFIG_FILE, SIGNING_KEY_ENV, read_manifest, verify_artifact

    monkeypatch.setenv(SIGNING_KEY_ENV, SIGNING_KEY)
    manifest = verify_artifact(ARTIFACT, digest=MANIFEST_DIGEST)
    assert isinstance(manifest, Manifest) and manifest == read_manifest(ARTIFACT)
    assert manifest.job_id == "4eee545" and manifest.kind == "adapter" and manifest.steps == 2
    assert manifest.base_model.architecture == "LlamaForCausalLM"
    assert manifest.spec["lora"]["targets"] == ["q_proj", "v_proj"] and manifest.lora["r"] == 4
    assert manifest.data.special_tokens["eos_token"] == "</s>" and manifest.data.source == "e2e"
    assert manifest.precision["compute_dtype"] == "fp32" and manifest.world_size == 1
    assert manifest.nodes is None and "nodes" not in manifest.to_json()  # a single process records none
    assert {ADAPTER_FILE, CONFIG_FILE} <= set(manifest.files)
    tensors = read_lora_tensors(ARTIFACT)
    assert len(tensors) == 2 * 2 * 2  # 2 blocks x (q_proj, v_proj) x (A, B)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)


def test_the_4eee545_manifest_reads_back_to_the_same_bytes():
    """Every key is a field, in the order written: the record writes the file it was read from."""
    from lora_dist.store import MANIFEST_FILE, read_manifest

    text = (ARTIFACT / MANIFEST_FILE).read_text()
    assert json.dumps(read_manifest(ARTIFACT).to_json(), indent=2) + "\n" == text


def test_a_manifest_written_now_has_the_keys_4eee545_wrote(tiny_trained):
    from lora_dist.store import MANIFEST_FILE

    artifact, _ = tiny_trained
    now = json.loads((artifact / MANIFEST_FILE).read_text())
    then = json.loads((ARTIFACT / MANIFEST_FILE).read_text())
    added = ["torch_threads", "mfu", "model_flops_per_token", "peak_flops_per_s"]  # since (issue 32), in order
    assert [k for k in now if k not in added] == [k for k in then if k != "signature"]  # the same, in order
    assert [k for k in now if k in added] == added
    assert list(now["data"]) == list(then["data"]) and list(now["base_model"]) == list(then["base_model"])


def test_a_tampered_copy_of_the_4eee545_artifact_fails(tmp_path, monkeypatch):
    from lora_dist.store import MANIFEST_FILE, SIGNING_KEY_ENV, verify_artifact

    copy = tmp_path / "copy"
    shutil.copytree(ARTIFACT, copy)
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "final_loss": 0.001}))
    assert verify_artifact(copy).final_loss == 0.001  # without the key, the files still match
    with pytest.raises(ArtifactError, match="manifest was replaced"):
        verify_artifact(copy, digest=MANIFEST_DIGEST)
    monkeypatch.setenv(SIGNING_KEY_ENV, SIGNING_KEY)
    with pytest.raises(ArtifactError, match="signature does not match"):
        verify_artifact(copy)


def test_a_manifest_with_a_key_or_value_it_does_not_know_is_refused(tmp_path):
    from lora_dist.store import MANIFEST_FILE, verify_artifact

    for change, match in (({"stepz": 2}, "stepz: Extra inputs"), ({"steps": "two"}, "steps: Input should be")):
        copy = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(ARTIFACT, copy)
        raw = json.loads((copy / MANIFEST_FILE).read_text())
        (copy / MANIFEST_FILE).write_text(json.dumps({**raw, **change}))
        with pytest.raises(ArtifactError, match=f"not a Manifest \\({match}"):
            verify_artifact(copy)


def test_a_checkpoint_written_by_4eee545_loads():
    from lora_dist import checkpoint as ckpt

    c = ckpt.load(str(CHECKPOINT))
    state = c.state
    assert isinstance(state, CheckpointState) and ckpt.latest_state(str(DATA)) is None  # not a checkpoints dir
    assert c.step == state.step == 2 and state.world_size == 2 and state.next_index == 4
    assert len(state.rng) == 2 and state.scalars["optimizer_step"] == 2.0
    assert state.spec["name"] == "ckpt" and state.spec_digest.startswith("sha256:")
    assert state.early_stop.best_step == 2 and state.node_history == [[]]
    assert state.loss > 0 and state.val_loss_before > 0
    assert any(k.startswith("param/") for k in c.tensors) and any(k.startswith("best/") for k in c.tensors)
    history = [json.loads(line) for line in c.metrics.splitlines()]
    assert {m["step"] for m in history} == {0, 1, 2}  # validation before step 1, then each step
    # read, then written as checkpoint.write writes it: the same bytes
    raw = (CHECKPOINT / ckpt.STATE_JSON).read_text()
    assert json.dumps(state.to_json(), sort_keys=True) == raw


def test_a_record_leaves_out_what_its_writer_did_not_set():
    state = CheckpointState(step=1, next_index=2, world_size=1, scalars={}, rng=[], spec={}, spec_digest="d")
    assert "early_stop" not in state.to_json() and "loss" not in state.to_json()
    assert state.early_stop is None and state.node_history == []
    with_none = Manifest(steps=3, resumed_from_step=None)  # a worker's fresh start records null
    assert with_none.to_json() == {"steps": 3, "resumed_from_step": None}
    assert with_none.updated(kind="full").to_json() == {"steps": 3, "resumed_from_step": None, "kind": "full"}
    with pytest.raises(ValueError):
        Manifest(kind="lora")  # adapter | full
    with pytest.raises(ValueError):
        with_none.steps = 4  # frozen
    # readers use fields: a key the writer did not set is None, and there is no view by key
    assert with_none.steps == 3 and with_none.nodes is None and not hasattr(with_none, "get")
    with pytest.raises(TypeError):
        with_none["steps"]


def test_the_4eee545_adapter_loads_onto_its_base_and_the_cli_verifies_it(tiny_llama_dir, tmp_path):
    """The base is the tiny Llama the fixture builds (the same weights: the fingerprint matches);
    the manifest names where it was then, so the copy is pointed at where it is now."""
    from conftest import run_cli
    from lora_dist.adapter import load_adapted
    from lora_dist.lora import LoRALinear
    from lora_dist.store import MANIFEST_FILE

    assert "4 files verified" in run_cli("verify", str(ARTIFACT), cwd=tmp_path).stdout
    copy = tmp_path / "copy"
    shutil.copytree(ARTIFACT, copy)
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    raw["base_model"]["id"] = raw["spec"]["model"]["base"] = str(tiny_llama_dir)
    del raw["signature"]
    (copy / MANIFEST_FILE).write_text(json.dumps(raw))
    loaded, manifest = load_adapted(copy)
    assert manifest.base_model.fingerprint == raw["base_model"]["fingerprint"]
    assert sum(isinstance(m, LoRALinear) for m in loaded.model.modules()) == 4  # q_proj, v_proj of 2 blocks
    assert any(m.lora_B.any() for m in loaded.model.modules() if isinstance(m, LoRALinear))


def test_a_checkpoint_from_4eee545_resumes_under_todays_spec_and_a_changed_field_is_still_refused(tiny_llama_dir):
    """Fields added since (data.columns, train.epochs, tracking, ...) take their defaults: the
    recorded spec matches the same job read today, and a field that differs is still named."""
    from lora_dist import checkpoint as ckpt
    from lora_dist.checkpoint import SpecChanged, check_same_spec
    from lora_dist.spec import JobSpec

    from conftest import E2E_CSV

    spec = ckpt.load(str(CHECKPOINT)).state.spec
    # where the devset and a tiny Llama are on this machine (the recording machine's paths need not exist)
    recorded = {**spec, "data": {**spec["data"], "path": str(E2E_CSV)},
                "model": {**spec["model"], "base": str(tiny_llama_dir)}}
    today = JobSpec.model_validate(recorded).to_dict()  # the same job, with every field of today
    assert set(today["data"]) > set(recorded["data"]) and "tracking" in today and "tracking" not in recorded
    check_same_spec(recorded, today, "the checkpoint")
    changed = {**today, "lora": {**today["lora"], "r": 8}}
    with pytest.raises(SpecChanged, match="lora.r: 4 -> 8"):
        check_same_spec(recorded, changed, "the checkpoint")
