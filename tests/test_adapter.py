"""The artifact format: PEFT loads it and agrees with us; tampering and wrong bases are caught."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lora_dist import adapter, store
from lora_dist.adapter import load_adapted, write_artifact
from lora_dist.errors import ArtifactError
from lora_dist.lora import LoRALinear, collect_lora
from lora_dist.model import load_model
from lora_dist.records import Manifest
from lora_dist.spec import LoraSpec
from lora_dist.store import verify_artifact

from conftest import run_cli


def _peft_logits(base_dir, artifact, ids):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(artifact)).eval()
    with torch.no_grad():
        return peft_model(input_ids=ids).logits


def test_peft_loads_our_adapter_with_the_same_logits(tiny_trained, tiny_llama_dir):
    artifact, _ = tiny_trained
    ours, _ = load_adapted(artifact, quantization="none")
    ids = torch.randint(2, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
    assert (a - _peft_logits(tiny_llama_dir, artifact, ids)).abs().max() < 1e-4


@pytest.mark.slow
def test_peft_loads_trained_artifact_with_same_logits(trained, smollm2_dir):
    artifact, _ = trained
    from peft import PeftModel
    from safetensors.torch import load_file

    keys = set(load_file(str(artifact / store.ADAPTER_FILE)))
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(artifact))
    peft_lora = {n for n, _ in peft_model.named_parameters() if "lora_" in n}
    # the main job's all-linear: 7 projections x 30 blocks x (A, B); every saved tensor found a home
    assert len(keys) == len(peft_lora) == 30 * 7 * 2
    ours, _ = load_adapted(artifact, quantization="none")
    ids = torch.randint(10, 40000, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours.model(input_ids=ids).logits
        b = peft_model.eval()(input_ids=ids).logits
    # Tolerance: the same fp32 math in a different order (PEFT adds dropout-free B(A x) the same way).
    assert (a - b).abs().max() < 1e-3
    # and the adapter changes the model: not a no-op
    with peft_model.disable_adapter(), torch.no_grad():
        c = peft_model(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-2


def test_gpt2_fused_qv_export_is_exact_in_peft(tmp_path):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=1)
    base_dir = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(base_dir)
    lm = load_model(str(base_dir), LoraSpec(r=4, alpha=8, targets=("c_attn",)), "none", with_tokenizer=False)
    for m in lm.model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)
    lora = collect_lora(lm.model)
    config = adapter.peft_config(lora, 4, 8.0, 0.0, False, "kaiming", str(base_dir), fan_in_fan_out=True)
    art = write_artifact(tmp_path / "art", lora, config, Manifest(steps=1))
    ids = torch.randint(2, 128, (2, 16))
    with torch.no_grad():
        ours = lm.model(input_ids=ids).logits
    theirs = _peft_logits(base_dir, art, ids)
    assert (ours - theirs).abs().max() < 1e-4


def test_export_refuses_untrained_or_misshapen_adapter(tmp_path, tiny_llama_dir):
    lm = load_model(str(tiny_llama_dir), LoraSpec(r=2, targets=("v_proj",)), "int8", with_tokenizer=False)
    lora = collect_lora(lm.model)
    with pytest.raises(ArtifactError, match="all zero after training"):
        write_artifact(tmp_path / "a", lora, {}, Manifest(steps=10))
    name = next(iter(lora))
    lora[name].A = torch.empty(0)  # what a partitioned (not gathered) ZeRO-3 tensor looks like
    with pytest.raises(ArtifactError, match="wrong shape"):
        write_artifact(tmp_path / "b", lora, {}, Manifest(steps=0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".*partial"))


def test_tampered_or_truncated_file_fails_verification(tiny_trained, tmp_path):
    artifact, _ = tiny_trained
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    verify_artifact(copy)
    cfg = copy / store.CONFIG_FILE
    cfg.write_text(cfg.read_text().replace('"r": 4', '"r": 9'))
    with pytest.raises(ArtifactError, match="adapter_config.json: sha256 mismatch"):
        verify_artifact(copy)
    shutil.copy(artifact / store.CONFIG_FILE, cfg)
    weights = copy / store.ADAPTER_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    proc = run_cli("verify", str(copy), cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "adapter_model.safetensors: sha256 mismatch" in proc.stderr


def test_wrong_base_model_is_refused(tiny_trained, tmp_path):
    artifact, _ = tiny_trained
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / store.MANIFEST_FILE).read_text())
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (copy / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not belong to these weights"):
        load_adapted(copy)


def test_loading_needs_only_the_lora_settings_not_the_training_data(tiny_trained, tmp_path):
    """An adapter moves to where its training data is not: load_adapted rebuilds from the
    manifest's LoRA settings (this was broken for JSONL-trained artifacts)."""
    artifact, _ = tiny_trained
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / store.MANIFEST_FILE).read_text())
    manifest["spec"]["data"] = {"source": "jsonl", "path": "/gone/train.jsonl"}
    manifest["files"] = {k: v for k, v in manifest["files"].items()}
    (copy / store.MANIFEST_FILE).write_text(json.dumps(manifest))
    loaded, _ = load_adapted(copy)
    assert sum(isinstance(m, LoRALinear) for m in loaded.model.modules()) == 14
