"""Real checkpoint layouts (bench/layouts.py builds them), refused checkpoints, special tokens,
and every rank loading its own share (tests/zero_run.py runs the worker code in gloo processes)."""

import json
import shutil
import sys

import pytest

from conftest import MAIN_JOB, REPO, run_cli

sys.path.insert(0, str(REPO / "bench"))
from layouts import LAYOUTS, compare, peft_difference, write_layout, write_refused  # noqa: E402


@pytest.fixture(scope="module")
def layout_dirs(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("layouts")
    return {f: write_layout(f, root / f, tiny_llama_dir) for f in LAYOUTS}


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_layout_loads_like_from_pretrained(layout_dirs, family):
    """Sharded bf16/fp16 checkpoints, base-class keys (GPT-2, OPT), GQA, tied embeddings, qkv
    bias: our loader gives from_pretrained's logits (fp32 tolerance), and the int8 base mostly
    the same next token."""
    d = layout_dirs[family]
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("model-*.safetensors"))) > 1
    r = compare(d, LAYOUTS[family][4])
    assert r["none_max_abs"] <= 1e-5
    assert r["int8_top1"] >= 0.9


def test_only_the_indexed_files_are_read_and_fingerprinted(layout_dirs, tmp_path):
    from lora_dist.base import fingerprint, weight_files
    from lora_dist.model import load_model

    d = tmp_path / "mistral"
    shutil.copytree(layout_dirs["mistral"], d)
    before = fingerprint(d)
    # Mistral publishes consolidated.safetensors beside the shards; a stray copy is the same case
    (d / "consolidated.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    shutil.copy(next(iter(sorted(d.glob("model-*.safetensors")))), d / "model-copy.safetensors")
    listed = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert [f.name for f in weight_files(d)] == listed
    assert fingerprint(d) == before
    assert load_model(str(d), None, "none", with_tokenizer=False).fingerprint == before


def test_refused_checkpoints_are_named_before_anything_is_submitted(tmp_path, tiny_llama_dir):
    """Each unsupported kind is refused on the meta skeleton and the file headers, naming what is
    wrong; `submit` exits 2 with that message before it contacts the cluster (the address here
    has nothing listening)."""
    from lora_dist.errors import ModelError
    from lora_dist.model import check_model

    refused = write_refused(tmp_path, tiny_llama_dir)
    for kind, (d, phrase) in refused.items():
        with pytest.raises(ModelError, match=phrase.replace(".", r"\.")):
            check_model(str(d), None, "int8")
    d, phrase = refused["pickle-only (.bin)"]
    proc = run_cli("submit", str(MAIN_JOB), f"--set=model.base={d}", "--address=http://127.0.0.1:9", cwd=REPO,
                   check=False, timeout=120)
    assert proc.returncode == 2 and phrase in proc.stderr and "Supported: dense decoder-only" in proc.stderr
    assert "127.0.0.1:9" not in proc.stderr


def test_prompts_get_bos_where_the_tokenizer_adds_one(tiny_llama_dir, tmp_path):
    from tokenizers import processors
    from transformers import AutoTokenizer

    from lora_dist.data import adds_bos, special_tokens, tokenize

    from lora_dist.sources import Example
    from lora_dist.generate import encode_prompts

    plain = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert not adds_bos(plain)
    d = tmp_path / "bos-tok"
    plain.save_pretrained(d)
    spec = json.loads((d / "tokenizer.json").read_text())
    spec["added_tokens"].append({"id": len(plain), "content": "<s>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (d / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(d, bos_token="<s>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert adds_bos(tok) and special_tokens(tok) == {"bos": True, "bos_token": "<s>", "eos_token": "</s>"}
    [item] = tokenize([Example("name[Aromi]", " Aromi is a pub.")], tok, 64)
    assert item.input_ids[0] == tok.bos_token_id and item.input_ids.count(tok.bos_token_id) == 1
    assert item.input_ids[-1] == tok.eos_token_id and item.labels[-1] == tok.eos_token_id
    [plain_item] = tokenize([Example("name[Aromi]", " Aromi is a pub.")], plain, 64)
    assert plain_item.input_ids == item.input_ids[1:]

    enc = encode_prompts(tok, ["name[Aromi]", "name[The Wrestlers] area[riverside]"], bos=True)
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        first = int((mask == 0).sum())  # left padding
        assert int(ids[first]) == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
    assert not (encode_prompts(plain, ["name[Aromi]"], bos=False)["input_ids"] == tok.bos_token_id).any()


@pytest.mark.slow
def test_each_rank_fills_its_own_partitions_exactly(layout_dirs, tmp_path):
    """At N=3 (ZeRO-3 padding: sizes that do not divide by 3), every rank reads only its rows and
    the gathered int8 weights, scales and float tensors equal a whole-tensor single-process load,
    bit for bit; GPT-2's transposed Conv1D included. The fingerprint comes out as the
    single-process one."""
    from lora_dist.base import fingerprint
    from zero_run import job_config, run_ranks

    world, jobs = 3, []
    for fam in ("llama", "gpt2"):
        job = job_config(fam, layout_dirs[fam], LAYOUTS[fam][4], tmp_path / "runs", world)
        job["check_partitions"] = str(tmp_path / fam)
        jobs.append(job)
    run_ranks(jobs, world)
    for fam in ("llama", "gpt2"):
        results = [json.loads((tmp_path / f"{fam}.{r}.json").read_text()) for r in range(world)]
        for r in results:
            assert r["max_abs_diff"] == 0.0 and r["compared"] > 10 and "torch.int8" in r["dtypes"], r
            assert r["bytes_read"] < 0.6 * r["checkpoint_bytes"], r  # about 1/3 each, not all of it
            assert r["fingerprint"] == fingerprint(layout_dirs[fam])
        assert sum(r["bytes_read"] for r in results) >= 0.9 * results[0]["checkpoint_bytes"]


@pytest.mark.slow
def test_adapters_trained_at_n2_load_in_peft(layout_dirs, tmp_path):
    """A 2-step LoRA run of each family at N=2 under ZeRO-3 makes an adapter that PEFT loads onto
    the from_pretrained model with our logits, and it changes the base's logits."""
    from zero_run import train_adapters

    arts = train_adapters({f: (d, LAYOUTS[f][4]) for f, d in layout_dirs.items()}, tmp_path / "runs", world=2)
    for fam, art in arts.items():
        manifest = json.loads((art / "manifest.json").read_text())
        assert manifest["world_size"] == 2 and manifest["zero_stage"] == 3
        assert manifest["data"]["special_tokens"]["eos_token"] == "</s>"
        diff, effect = peft_difference(layout_dirs[fam], art)
        assert effect > 1e-3, (fam, effect)
        assert diff <= 1e-5, (fam, diff)


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_packed_rows_keep_their_examples_apart_where_packing_is_allowed(layout_dirs, family):
    """data.batching: packed lays examples end to end with restarting positions. For each
    architecture it allows, the loss of packed rows is the sum of the examples' own losses (no
    example sees another); for those it refuses, the packed loss really differs."""
    import torch
    from transformers import AutoModelForCausalLM

    from lora_dist.data import PACKING_MODEL_TYPES, Tokenized, check_packing, collate, collate_packed

    from lora_dist.sources import DataError

    model = AutoModelForCausalLM.from_pretrained(layout_dirs[family], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    items = []
    for n, prompt in ((7, 3), (11, 4), (5, 2)):
        ids = torch.randint(5, 200, (n,), generator=g).tolist()
        items.append(Tokenized(ids, [-100] * prompt + ids[prompt:]))

    def loss_sum(batch) -> float:
        with torch.no_grad():
            logits = model(**batch, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                        ignore_index=-100, reduction="sum"))

    alone = sum(loss_sum(collate([t], pad_id=0)) for t in items)
    packed = [loss_sum(collate_packed(rows, pad_id=0)) for rows in ([items], [items[:2], items[2:]])]
    apart = [abs(p - alone) <= 1e-5 * abs(alone) for p in packed]
    print(f"{family}: examples alone {alone:.6f}, packed {packed}")
    if model.config.model_type in PACKING_MODEL_TYPES:
        assert all(apart), (alone, packed)
        check_packing(model.config.model_type)
    else:
        assert not any(apart), (alone, packed)
        with pytest.raises(DataError, match="data.batching: packed"):
            check_packing(model.config.model_type)
        # and `submit` refuses it before contacting the cluster (nothing listens at that address)
        proc = run_cli("submit", str(MAIN_JOB), f"--set=model.base={layout_dirs[family]}", "--set=data.batching=packed",
                       "--set=lora.targets=[q_proj,v_proj]", "--address=http://127.0.0.1:9", cwd=REPO, check=False,
                       timeout=120)
        assert proc.returncode == 2 and "data.batching: packed" in proc.stderr and "'opt'" in proc.stderr, proc.stderr
