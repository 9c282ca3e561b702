"""An artifact and a checkpoint written by the code at 4eee545 (tests/data/, made by the script in
that commit's message) still load and verify: their JSON keys are contracts."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    assert manifest == read_manifest(ARTIFACT)
    assert manifest["job_id"] == "4eee545" and manifest["kind"] == "adapter" and manifest["steps"] == 2
    assert manifest["base_model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["spec"]["lora"]["targets"] == ["q_proj", "v_proj"] and manifest["lora"]["r"] == 4
    assert manifest["data"]["special_tokens"]["eos_token"] == "</s>"
    assert manifest["precision"]["compute_dtype"] == "fp32" and manifest["world_size"] == 1
    assert {ADAPTER_FILE, CONFIG_FILE} <= set(manifest["files"])
    tensors = read_lora_tensors(ARTIFACT)
    assert len(tensors) == 2 * 2 * 2  # 2 blocks x (q_proj, v_proj) x (A, B)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (32, 4)


def test_a_tampered_copy_of_the_4eee545_artifact_fails(tmp_path, monkeypatch):
    import json
    import shutil

    from lora_dist.errors import ArtifactError
    from lora_dist.store import MANIFEST_FILE, SIGNING_KEY_ENV, verify_artifact

    copy = tmp_path / "copy"
    shutil.copytree(ARTIFACT, copy)
    raw = json.loads((copy / MANIFEST_FILE).read_text())
    (copy / MANIFEST_FILE).write_text(json.dumps({**raw, "final_loss": 0.001}))
    verify_artifact(copy)  # without the key, the files still match
    with pytest.raises(ArtifactError, match="manifest was replaced"):
        verify_artifact(copy, digest=MANIFEST_DIGEST)
    monkeypatch.setenv(SIGNING_KEY_ENV, SIGNING_KEY)
    with pytest.raises(ArtifactError, match="signature does not match"):
        verify_artifact(copy)


def test_a_checkpoint_written_by_4eee545_loads():
    import json

    from lora_dist import checkpoint as ckpt

    c = ckpt.load(str(CHECKPOINT))
    assert c.step == 2 and c.state["step"] == 2 and c.state["world_size"] == 2 and c.state["next_index"] == 4
    assert len(c.state["rng"]) == 2 and c.state["scalars"]["optimizer_step"] == 2.0
    assert c.state["spec"]["name"] == "ckpt" and c.state["spec_digest"].startswith("sha256:")
    assert c.state["early_stop"]["best_step"] == 2 and c.state["node_history"] == [[]]
    assert c.state["loss"] > 0 and c.state["val_loss_before"] > 0
    assert any(k.startswith("param/") for k in c.tensors) and any(k.startswith("best/") for k in c.tensors)
    history = [json.loads(line) for line in c.metrics.splitlines()]
    assert {m["step"] for m in history} == {0, 1, 2}  # validation before step 1, then each step
