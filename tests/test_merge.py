"""lora-dist merge: the adapter folded into its base as a Hugging Face model directory.

On a Llama and a GPT-2 layout (fused ``c_attn`` with LoRA on q and v only, Conv1D weights stored
(in, out), keys saved from the base class, fp16 shards), the merged directory loaded by
``AutoModelForCausalLM.from_pretrained`` gives the logits of base + adapter in lora-dist: within
1e-4 against the float base (``--from float``), 1e-3 against the int8 base (``--from int8``).
Shards, index, dtype, chat template, record; and every refusal through the real CLI, leaving
nothing at ``--out``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli
from test_chat import CHAT_DATA, TINY

sys.path.insert(0, str(REPO / "bench"))
from layouts import write_layout  # noqa: E402


def _train(base: Path, out: Path, *overrides: str) -> Path:
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    spec = load_spec(MAIN_JOB, [f"model.base={base}", f"data.path={E2E_CSV}", f"output.dir={out}",
                                *TINY_OVERRIDES, *overrides])
    return train_local(spec, stream=io.StringIO())


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_trained, tiny_llama_dir) -> dict[str, Path]:
    """int8-trained adapters of each layout: the tiny Llama (every linear) and a GPT-2 (c_attn)."""
    root = tmp_path_factory.mktemp("merge")
    gpt2 = write_layout("gpt2", root / "gpt2", tiny_llama_dir)
    return {"llama": tiny_trained[0],
            "gpt2": _train(gpt2, root / "runs", "lora.targets=[c_attn]", "train.lr=2e-2")}


@pytest.fixture(scope="module")
def chat_float_adapter(tmp_path_factory, tiny_llama_dir) -> Path:
    """The tiny Llama trained on chat data with its own template, on a float base."""
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    d = tmp_path_factory.mktemp("merge-chat")
    raw = yaml.safe_load(MAIN_JOB.read_text())
    raw["model"] = {"base": str(tiny_llama_dir), "quantization": "none"}
    raw["data"] = {**raw["data"], "source": "chat", "path": str(CHAT_DATA), "chat_template": TINY}
    raw["output"]["dir"] = str(d / "runs")
    (d / "chat.yaml").write_text(yaml.safe_dump(raw))
    return train_local(load_spec(d / "chat.yaml", TINY_OVERRIDES), stream=io.StringIO())


def _prompts(n: int = 3) -> list[str]:
    from lora_dist.sources import E2E_TEMPLATE, render

    with open(E2E_CSV, newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(n), csv.DictReader(f))]
    return [render(E2E_TEMPLATE, row["mr"]) for row in rows]


def _logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**tok(p, return_tensors="pt")).logits[0].float() for p in _prompts()])


def _from_pretrained(d: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _nothing_at(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_model_gives_the_adapted_logits(adapters, family, tmp_path):
    """--from float against base + adapter on the float base (1e-4), --from int8 against the int8
    base it trained on (1e-3); each merge really folds the update in (far from the base's logits)
    and from the weights named (the float merge is not the int8 base's)."""
    from transformers import AutoTokenizer

    from lora_dist.adapter import load_adapted
    from lora_dist.merge import merge_adapter

    artifact = adapters[family]
    float_ref, manifest = load_adapted(artifact, quantization="none")
    tok = float_ref.tokenizer
    int8_ref, _ = load_adapted(artifact)
    want = {"float": _logits(float_ref.model, tok), "int8": _logits(int8_ref.model, tok)}
    base = _logits(_from_pretrained(float_ref.model_dir), tok)
    for source, tol in (("float", 1e-4), ("int8", 1e-3)):
        out = merge_adapter(artifact, tmp_path / source, dtype="fp32", source=source)
        got = _logits(_from_pretrained(out), AutoTokenizer.from_pretrained(out))
        diff = (got - want[source]).abs().max().item()
        other = (got - want["int8" if source == "float" else "float"]).abs().max().item()
        effect = (got - base).abs().max().item()
        print(f"{family} --from {source}: |dlogit| {diff:.2e}, vs the other base {other:.2e}, adapter effect "
              f"{effect:.2e}")
        assert diff <= tol and effect > 20 * tol and other > 2 * diff
        assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]  # 5GB: one file
        record = json.loads((out / "lora_dist_merge.json").read_text())
        assert record["from"] == source and record["dtype"] == "float32"
        assert record["base_model"]["fingerprint"] == manifest.base_model.fingerprint


def test_cli_writes_shards_and_an_index_that_load(adapters, tmp_path):
    """A small --max-shard-size: model-0000k-of-0000N files (none over the limit unless one
    tensor is), the index naming every tensor once, a line per shard on stderr, the directory on
    stdout, and the record pinning the adapter's manifest."""
    from safetensors import safe_open

    from lora_dist.adapter import load_adapted
    from lora_dist.store import manifest_digest

    artifact, out = adapters["llama"], tmp_path / "merged"
    proc = run_cli("merge", str(artifact), "--out", str(out), "--max-shard-size", "40KB", "--dtype", "fp32",
                   cwd=REPO, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    shards = sorted(out.glob("model-*.safetensors"))
    n = len(shards)
    assert n > 2 and [s.name for s in shards] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert [line.split()[1] for line in proc.stderr.splitlines() if line.startswith("wrote ")] == [s.name for s in shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held = {}
    for s in shards:
        with safe_open(str(s), "pt") as f:
            keys = list(f.keys())
            sizes = [f.get_slice(k).get_shape() for k in keys]
        held.update({k: s.name for k in keys})
        assert s.stat().st_size <= 40_000 + 1024 or len(keys) == 1, (s.name, keys)
    assert index["weight_map"] == held
    assert index["metadata"]["total_size"] == sum(s.stat().st_size for s in shards) - sum(
        8 + int.from_bytes(s.read_bytes()[:8], "little") for s in shards)
    assert sizes  # every shard opened with the safetensors library
    loaded, manifest = load_adapted(artifact, quantization="none")
    got = _logits(_from_pretrained(out), loaded.tokenizer)
    assert (got - _logits(loaded.model, loaded.tokenizer)).abs().max().item() <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    record = json.loads((out / "lora_dist_merge.json").read_text())
    assert record["manifest_digest"] == manifest_digest(artifact)
    assert record["base_model"] == manifest.base_model.to_json() and record["files"] == [s.name for s in shards]
    assert {"torch", "transformers", "safetensors"} <= set(record["versions"])


def test_dtype_defaults_to_the_bases_and_bf16_is_written_as_asked(adapters, tmp_path):
    """The GPT-2 layout is stored in fp16: the merged model is fp16 unless --dtype says otherwise;
    config.json says the dtype written; only the q and v slices of the fused c_attn change."""
    from safetensors import safe_open

    from lora_dist.merge import merge_adapter

    from lora_dist.adapter import load_adapted

    base_dir = load_adapted(adapters["gpt2"], quantization="none")[0].model_dir
    for dtype, want in ((None, torch.float16), ("bf16", torch.bfloat16)):
        out = merge_adapter(adapters["gpt2"], tmp_path / str(dtype), dtype=dtype, max_shard_size="60KB")
        tensors = {}
        for d in (out, base_dir):
            for s in d.glob("model-*.safetensors"):
                with safe_open(str(s), "pt") as f:
                    tensors.update({(d, k): f.get_tensor(k) for k in f.keys()})
        assert {t.dtype for (d, _), t in tensors.items() if d == out and t.is_floating_point()} == {want}
        if dtype is None:  # fp16 as the base: c_attn's k slice is the base's to the bit; q and v changed
            merged, base = tensors[out, "h.0.attn.c_attn.weight"], tensors[base_dir, "h.0.attn.c_attn.weight"]
            assert merged.shape == base.shape == (64, 192)  # Conv1D: stored (in, out), as the base stores it
            assert torch.equal(merged[:, 64:128], base[:, 64:128])
            assert not torch.equal(merged[:, :64], base[:, :64]) and not torch.equal(merged[:, 128:], base[:, 128:])
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
        _from_pretrained(out)


def test_a_chat_adapter_merges_with_the_template_it_trained_with(chat_float_adapter, tmp_path):
    """The tiny Llama's tokenizer has no chat template; the adapter trained with its own, and the
    merged model's tokenizer renders a conversation as `generate --chat` prompts it."""
    from transformers import AutoTokenizer

    from lora_dist.generate import chat_prompt
    from lora_dist.merge import merge_adapter
    from lora_dist.store import verify_artifact

    out = merge_adapter(chat_float_adapter, tmp_path / "chat")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TINY
    manifest = verify_artifact(chat_float_adapter)
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                                       tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt(manifest, tok, "Hi", system="Be brief.")


def test_refusals_exit_with_their_codes_and_leave_nothing(adapters, chat_float_adapter, tiny_llama_dir, tmp_path):
    """Through the real CLI: bad input exits 2 (a missing artifact, --out existing, a bad
    --max-shard-size, a full model, --from int8 for an adapter trained on a float base), a tampered
    or (with a signing key set) unsigned artifact 1; each names what is wrong, no traceback, and
    nothing appears at --out."""
    from lora_dist.store import SIGNING_KEY_ENV

    llama = adapters["llama"]
    tampered = tmp_path / "tampered"
    shutil.copytree(llama, tampered)
    blob = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    blob[-1] ^= 1
    (tampered / "adapter_model.safetensors").write_bytes(bytes(blob))
    full = _train(tiny_llama_dir, tmp_path / "runs", "train.method=full", "model.quantization=none",
                  "train.max_steps=1")
    existing = tmp_path / "existing"
    existing.mkdir()
    cases = [
        ((str(tmp_path / "nowhere"),), 2, "not an artifact directory"),
        ((str(llama), "--max-shard-size", "lots"), 2, "--max-shard-size: 'lots' is not a size"),
        ((str(llama), "--max-shard-size", "0"), 2, "--max-shard-size: must be a positive size"),
        ((str(llama), "--dtype", "int4"), 2, "--dtype: invalid choice"),
        ((str(full),), 2, "kind: full"),
        ((str(chat_float_adapter), "--from", "int8"), 2, "--from int8:"),
        ((str(tampered),), 1, "adapter_model.safetensors: sha256 mismatch"),
    ]
    for k, (args, code, phrase) in enumerate(cases):
        out = tmp_path / f"out{k}"
        proc = run_cli("merge", *args, "--out", str(out), cwd=REPO, check=False, timeout=300)
        assert proc.returncode == code and phrase in proc.stderr, (args, proc.returncode, proc.stderr)
        assert "Traceback" not in proc.stderr and _nothing_at(out), args
    proc = run_cli("merge", str(llama), "--out", str(existing), cwd=REPO, check=False)
    assert proc.returncode == 2 and f"--out: {existing} exists" in proc.stderr and not any(existing.iterdir())
    # with a signing key set, an unsigned adapter is refused as verify refuses it
    proc = run_cli("merge", str(llama), "--out", str(tmp_path / "signed"), cwd=REPO, check=False,
                   env={**os.environ, SIGNING_KEY_ENV: "k1"})
    assert proc.returncode == 1 and "not signed" in proc.stderr and _nothing_at(tmp_path / "signed"), proc.stderr


def test_a_base_whose_weights_changed_is_refused_naming_both_fingerprints(adapters, tmp_path):
    from lora_dist.errors import ArtifactError
    from lora_dist.merge import merge_adapter

    art = tmp_path / "art"
    shutil.copytree(adapters["llama"], art)
    manifest = json.loads((art / "manifest.json").read_text())
    recorded = manifest["base_model"]["fingerprint"]
    manifest["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (art / "manifest.json").write_text(json.dumps(manifest))  # unsigned: verify_artifact passes
    with pytest.raises(ArtifactError, match=f"fingerprint sha256:0{{64}}, but .* has fingerprint {recorded}"):
        merge_adapter(art, tmp_path / "out")
    assert _nothing_at(tmp_path / "out")


@pytest.mark.slow
def test_smollm2_merges_to_the_adapted_logits(trained, tmp_path):
    """The main job's adapter on SmolLM2-135M (30 blocks, GQA, tied embeddings): both merges give
    lora-dist's logits, in shards of 100MB."""
    from transformers import AutoTokenizer

    from lora_dist.adapter import load_adapted
    from lora_dist.merge import merge_adapter

    artifact, _ = trained
    for source, quantization, tol in (("float", "none", 1e-4), ("int8", None, 1e-3)):
        loaded, _ = load_adapted(artifact, quantization=quantization)
        want = _logits(loaded.model, loaded.tokenizer)
        del loaded
        out = merge_adapter(artifact, tmp_path / source, dtype="fp32", source=source, max_shard_size="100MB")
        assert len(list(out.glob("model-*.safetensors"))) > 1
        diff = (_logits(_from_pretrained(out), AutoTokenizer.from_pretrained(out)) - want).abs().max().item()
        print(f"SmolLM2 --from {source}: |dlogit| {diff:.2e}")
        assert diff <= tol
        shutil.rmtree(out)


@pytest.mark.slow
def test_an_adapter_on_a_hub_base_merges_into_the_commit_it_trained_on(tmp_path, tiny_llama_dir):
    """A base named by hub id (offline cache, tests/test_hub.py): main moves on to other weights
    after training, and the merge still folds into the commit trained on; the record names id,
    revision and commit; the token in the environment is written nowhere."""
    from safetensors.torch import load_file

    from test_hub import C1, C2, REPO_ID, TOKEN, _other_weights, env_for, files_of, lay_out

    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir))
    env = env_for(hf_home, tmp_path)
    proc = run_cli("train", str(MAIN_JOB), f"--set=model.base={REPO_ID}", f"--set=data.path={E2E_CSV}",
                   *[f"--set={o}" for o in TINY_OVERRIDES], "--set=train.max_steps=1",
                   f"--set=output.dir={tmp_path / 'runs'}", cwd=REPO, env=env)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(hf_home / "hub" / "models--tiny-org--tiny-llama")
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir), ref=None)
    lay_out(hf_home, REPO_ID, C2, _other_weights(tiny_llama_dir, tmp_path))
    out = tmp_path / "merged"
    merged = run_cli("merge", str(artifact), "--out", str(out), cwd=REPO, env=env)
    record = json.loads((out / "lora_dist_merge.json").read_text())["base_model"]
    assert (record["id"], record["revision"], record["commit"]) == (REPO_ID, "main", C1)
    key = "model.embed_tokens.weight"  # not adapted: C1's tensor to the bit, not C2's
    assert torch.equal(load_file(str(out / "model.safetensors"))[key],
                       load_file(str(tiny_llama_dir / "model.safetensors"))[key])
    assert not any(TOKEN.encode() in f.read_bytes() for f in out.iterdir()) and TOKEN not in merged.stderr
