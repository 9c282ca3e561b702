"""The real entry point end to end: `lora-dist train` on SmolLM2 (int8 base) with E2E data."""

import json

import torch

from lora_dist import adapter

from conftest import run_cli


def test_short_run_lowers_validation_loss_and_writes_artifact(trained):
    artifact, proc = trained
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == str(artifact) and artifact.is_dir()
    assert any(line.startswith("step 1/12") and "tok/s" in line for line in lines)  # progress shown
    manifest = adapter.verify_artifact(artifact)
    print(f"validation loss {manifest['val_loss_before']:.4f} -> {manifest['val_loss_after']:.4f} in 12 steps")
    # Stated margin: 12 steps of r=8 LoRA on E2E lower held-out loss by at least 0.3 nats/token
    # (SmolLM2 starts near 2.4 on this prompt format; measured runs end near 1.5).
    assert manifest["val_loss_after"] < manifest["val_loss_before"] - 0.3, manifest
    assert manifest["trainable_params"] == 2_442_240  # r=8 on the 7 linears of 30 blocks
    assert manifest["quantization"] == "int8" and manifest["world_size"] == 1 and manifest["zero_stage"] == 0
    assert manifest["steps"] == 12 and manifest["lora"]["targets"] == ["all-linear"]
    assert manifest["base_model"]["id"] == "smollm2-135m"
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert set(manifest["files"]) == {adapter.ADAPTER_FILE, adapter.CONFIG_FILE, adapter.METRICS_FILE,
                                      "loss_curve.png"}
    assert (artifact / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert manifest["adapter_bytes"] == (artifact / adapter.ADAPTER_FILE).stat().st_size
    assert manifest["adapter_bytes"] < 2_442_240 * 4 + 64_000  # fp32 A and B plus the header
    assert {"torch", "transformers", "bitsandbytes"} <= set(manifest["versions"])
    metrics = [json.loads(line) for line in (artifact / adapter.METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, 13))
    assert not list(artifact.parent.glob(".*")), "no partial or work directories left behind"


def test_generate_uses_the_adapter(trained, tmp_path):
    artifact, _ = trained
    proc = run_cli("generate", str(artifact), "--prompt", "name[The Eagle], eatType[coffee shop], area[riverside]",
                   "--max-new-tokens", "30", cwd=tmp_path)
    text = proc.stdout.strip().splitlines()[-1]
    assert "Eagle" in text, text


def test_bad_spec_exits_2_with_field_named(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("name: x\nlora: {r: 0}\n")
    proc = run_cli("train", str(job), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "lora.r: must be an integer from 1" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_is_reported_before_any_work(tmp_path):
    from conftest import REPO
    proc = run_cli("train", str(REPO / "jobs" / "smollm2-e2e.yaml"), "--set", "data.path=nope.csv",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "data.path: file not found" in proc.stderr


def test_full_finetuning_baseline_writes_a_loadable_model(tmp_path, e2e_csv, smollm2_dir):
    """train.method: full (the baseline benchmarks compare against) trains every weight."""
    from conftest import REPO
    from lora_dist.adapter import load_adapted
    from lora_dist.generate import generate

    proc = run_cli("train", str(REPO / "jobs" / "smollm2-e2e.yaml"), f"--set=data.path={e2e_csv}",
                   f"--set=output.dir={tmp_path / 'runs'}", "--set=train.method=full", "--set=model.quantization=none",
                   "--set=train.max_steps=1", "--set=train.micro_batch_size=2", "--set=data.max_length=64",
                   "--set=train.eval_batches=1", "--set=train.lr=1e-4", cwd=tmp_path)
    artifact = proc.stdout.strip().splitlines()[-1]
    loaded, manifest = load_adapted(artifact)
    assert manifest["kind"] == "full" and manifest["method"] == "full"
    assert manifest["trainable_params"] == 134_515_008  # every weight, the tied embedding once
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    w_new = loaded.model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w_new, base.model.layers[0].self_attn.q_proj.weight)
    assert generate(loaded.model, loaded.tokenizer, ["Hello"], max_new_tokens=3)[0] is not None


def test_full_finetuning_needs_a_float_base(tmp_path):
    from conftest import REPO
    proc = run_cli("train", str(REPO / "jobs" / "smollm2-e2e.yaml"), "--set=train.method=full", cwd=REPO, check=False)
    assert proc.returncode == 2 and "train.method: 'full' trains every weight" in proc.stderr


def test_activation_checkpointing_gives_the_same_loss_and_lora_gradients():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lora_dist.lora import LoRALinear
    from lora_dist.model import enable_activation_checkpointing, load_model
    from lora_dist.spec import LoraSpec

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                                     num_attention_heads=4, vocab_size=128)).save_pretrained(d)
        runs = []
        for ckpt in (False, True):
            m = load_model(d, LoraSpec(r=4, dropout=0.0), "int8", seed=1, with_tokenizer=False).model
            for mod in m.modules():
                if isinstance(mod, LoRALinear):
                    torch.nn.init.normal_(mod.lora_B, generator=torch.Generator().manual_seed(2))
            if ckpt:
                enable_activation_checkpointing(m)
            m.train()
            ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            runs.append((loss.item(), [p.grad.clone() for n, p in m.named_parameters() if p.requires_grad]))
    assert abs(runs[0][0] - runs[1][0]) < 1e-6
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
