"""The planner: exact counts against hand-computed values, bytes arithmetic by a table of cases."""

from pathlib import Path

import pytest

from lora_dist.counting import count_activations, count_model
from lora_dist.plan import AUTO_MEMORY_SHARE, GiB, Activations, ModelCounts, Setup, checkpoint_bytes, \
    choose_zero_stage, make_plan, memory_terms, min_workers, parse_bytes, per_worker_bytes
from lora_dist.spec import SHAPES, LoraSpec

REPO = Path(__file__).resolve().parents[1]


def test_gpt3_175b_counts_are_the_papers():
    c = count_model(SHAPES["gpt3-175b"], LoraSpec(r=4, targets=("c_attn",)))
    d, L, V = 12288, 96, 50257
    per_layer = 12 * d * d + 13 * d  # qkv, proj, mlp weights and biases, two layer norms
    assert c.total_params == L * per_layer + V * d + 2048 * d + 2 * d == 174_604_259_328
    assert c.lora_params == 18_874_368  # r=4 on Wq and Wv: 96 x (2 x (4 x 12288 + 12288 x 4))
    assert c.quantized_linear_params == L * 12 * d * d
    plan = make_plan(c, Setup(workers=8, micro_batch=1, seq_len=2048), 80 * 10**9, {"lora": ACTS, "full": ACTS})
    assert plan.to_dict()["adapter_bytes"] == 37_748_736  # fp16: the paper's "35MB"
    # PEFT has no LoRA on slices of the fused c_attn: B is exported full width (3d x 2r), zero rows for k
    assert c.lora_export_params == L * (2 * 4 * d + 3 * d * 2 * 4)
    assert plan.to_dict()["adapter_file_bytes"] == 2 * c.lora_export_params == 75_497_472


def test_llama_counts_by_hand():
    c = count_model(SHAPES["llama2-7b"], LoraSpec(r=8, targets=("q_proj", "v_proj")))
    d, f, L, V = 4096, 11008, 32, 32000
    assert c.total_params == L * (4 * d * d + 3 * d * f + 2 * d) + 2 * V * d + d == 6_738_415_616
    assert c.lora_params == L * 2 * (8 * d + d * 8) == 4_194_304
    # untied: the embedding and the head, V x d each, and the final norm; ZeRO-3 holds one at a time
    assert c.outside_params == 2 * V * d + d and c.largest_outside_params == V * d


@pytest.mark.slow
def test_smollm2_counts_by_hand(smollm2_dir):
    s = count_model("smollm2-135m", LoraSpec(r=8, targets=("q_proj", "v_proj")))
    assert s.total_params == 134_515_008 and s.lora_params == 460_800
    assert s.quantized_linear_params == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)


def _counts(**kw) -> ModelCounts:
    base = dict(architecture="X", layers=10, hidden=1000, heads=10, vocab=1000, total_params=1_000_000_000,
                quantized_linear_params=900_000_000, quantized_rows=100_000, float_params=100_000_000,
                lora_params=1_000_000, lora_tensors_persistent=False, largest_block_params=90_000_000,
                largest_linear_params=30_000_000, small_float_params=0, block_quantized_params=89_000_000,
                block_rows=10_000, block_float_params=1_000_000, outside_params=60_000_000,
                largest_outside_params=40_000_000)
    base.update(kw)
    return ModelCounts(**base)


ACTS = Activations(per_block=1_000_000, per_block_checkpointed=10_000, head=5_000_000, logits=2_000_000)
BLOCK_BF16 = 89_000_000 + 10_000 * 4 + 1_000_000 * 2  # int8 weights, fp32 scales, bf16 norms
BLOCK_FP32 = 89_000_000 + 10_000 * 4 + 1_000_000 * 4

# (method, workers, device, term, expected bytes)
TERMS = [
    ("lora_int8_zero3", 1, "cuda", "base_weights", 900_000_000 + 400_000),
    ("lora_int8_zero3", 4, "cuda", "base_weights", (900_000_000 + 400_000) // 4),
    ("lora_int8_zero3", 4, "cuda", "float_weights", 100_000_000 * 2 // 4),
    ("lora_int8_zero3", 4, "cpu", "float_weights", 100_000_000 * 4 // 4),
    ("lora_int8_zero3", 4, "cuda", "optimizer_and_gradients", 1_000_000 * (2 + 4 + 8) // 4),
    # fp32: the gradient, DeepSpeed's fp32 master (a clone even in fp32) and two moments
    ("lora_int8_zero3", 4, "cpu", "optimizer_and_gradients", 1_000_000 * (4 + 4 + 8) // 4),
    ("lora_int8_zero3", 4, "cuda", "reduce_bucket", 1_000_000 * 2),  # sized to the LoRA gradients
    # two blocks live (computing, prefetched), the largest parameter outside the blocks (an
    # embedding, or an untied head: one at a time), one dequantized weight block in bf16
    ("lora_int8_zero3", 2, "cuda", "gathered_working_set", 2 * BLOCK_BF16 + 40_000_000 * 2 + 30_000_000 * 2),
    # at N=1 DeepSpeed gathers nothing (each parameter is a view of its partition): the dequantized block only
    ("lora_int8_zero3", 1, "cuda", "gathered_working_set", 30_000_000 * 2),
    ("lora_int8_zero3", 2, "cuda", "activations", 5_000_000 + 10 * 1_000_000 + 2 * 2_000_000),
    # on CPU gloo's all-gather holds a second copy of what it gathers: the largest parameter (here
    # the 30M-value int8 linear, under the slice buffer) once more; fp32 rest; at N=1 nothing
    ("lora_int8_zero3", 2, "cpu", "gathered_working_set", 2 * BLOCK_FP32 + 40_000_000 * 4 + 30_000_000 * 4
     + 30_000_000),
    ("lora_int8_zero3", 1, "cpu", "gathered_working_set", 30_000_000 * 4),
    # full fine-tuning gathers the fp32 linear (120 MB): over the buffer, so in slices through it, twice 64 MiB
    ("full", 2, "cpu", "gathered_working_set", 2 * 90_000_000 * 4 + 60_000_000 * 4 + 2 * (64 << 20)),
    ("full", 2, "cuda", "gathered_working_set", 2 * 90_000_000 * 2 + 60_000_000 * 2),
    ("full", 1, "cuda", "gathered_working_set", 0),
    ("full", 8, "cuda", "base_weights", 1_000_000_000 * 2 // 8),
    ("full", 8, "cuda", "optimizer_and_gradients", 1_000_000_000 * 14 // 8),
    ("lora_fp16", 8, "cuda", "base_weights", 2_000_000_000),  # replicated: N does not help
]


@pytest.mark.parametrize("method,n,device,term,expected", TERMS)
def test_bytes_arithmetic(method, n, device, term, expected):
    terms = memory_terms(_counts(), method, Setup(workers=n, micro_batch=1, seq_len=128, device=device),
                         {"lora": ACTS, "full": ACTS})
    assert terms[term] == expected


# (method, workers, stage, term, expected bytes): stages 1 and 2 hold the base whole on every worker
STAGE_TERMS = [
    ("lora_int8_zero3", 4, 2, "base_weights", 900_000_000 + 400_000),
    ("lora_int8_zero3", 4, 1, "float_weights", 100_000_000 * 2),
    ("lora_int8_zero3", 4, 1, "lora_weights", 1_000_000 * 2),
    ("lora_int8_zero3", 4, 2, "optimizer_and_gradients", 1_000_000 * (2 + 4 + 8) // 4),
    # stage 1 keeps the bf16 gradient whole, partitions the fp32 master and moments
    ("lora_int8_zero3", 4, 1, "optimizer_and_gradients", 1_000_000 * 2 + 1_000_000 * (4 + 8) // 4),
    ("lora_int8_zero3", 4, 2, "gathered_working_set", 30_000_000 * 2),  # nothing gathered: one dequantized block
    ("lora_int8_zero3", 4, 2, "persistent_small_params", 0),
    ("full", 8, 2, "base_weights", 1_000_000_000 * 2),
    ("full", 8, 2, "optimizer_and_gradients", 1_000_000_000 * 14 // 8),
    ("full", 8, 1, "gathered_working_set", 0),
]


@pytest.mark.parametrize("method,n,stage,term,expected", STAGE_TERMS)
def test_bytes_arithmetic_under_stages_1_and_2(method, n, stage, term, expected):
    terms = memory_terms(_counts(), method, Setup(workers=n, micro_batch=1, seq_len=128), {"lora": ACTS, "full": ACTS},
                         stage=stage)
    assert terms[term] == expected


def test_auto_picks_the_cheapest_stage_that_fits():
    """Stage 1 where the replicated base fits a worker, 2 where only its partitioned gradients make
    it fit, 3 where only sharding fits, and 3 with a warning where nothing does."""
    c, acts = _counts(lora_params=200_000_000), {"lora": ACTS, "full": ACTS}
    s = Setup(workers=4, micro_batch=1, seq_len=128)
    need = {stage: per_worker_bytes(c, "lora_int8_zero3", s, acts, stage) for stage in (1, 2, 3)}
    assert need[1] > need[2] > need[3]

    def memory_for(nbytes: int) -> int:  # the smallest worker memory whose auto share holds nbytes
        return int(nbytes / AUTO_MEMORY_SHARE) + 2

    assert choose_zero_stage(c, "lora", s, acts, 100 * GiB).stage == 1
    at1 = choose_zero_stage(c, "lora", s, acts, memory_for(need[1]))
    assert at1.stage == 1 and "ZeRO-1" in at1.reason and "no parameter gathers" in at1.reason
    assert choose_zero_stage(c, "lora", s, acts, memory_for(need[1]) - 4).stage == 2
    at3 = choose_zero_stage(c, "lora", s, acts, memory_for(need[2]) - 4)
    assert at3.stage == 3 and "shards it across 4 worker(s)" in at3.reason and "over it too" not in at3.reason
    none = choose_zero_stage(c, "lora", s, acts, memory_for(need[3]) - 4)
    assert none.stage == 3 and "over it too" in none.reason
    assert at3.per_worker_bytes == need


def test_plan_says_what_auto_picks(capsys, monkeypatch):
    import json

    from lora_dist.cli import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "jobs/llama2-7b-lora.yaml", "--gpus", "1", "--gpu-memory", "80GB", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["zero_stage_auto"]
    assert auto["stage"] == 1 and auto["per_worker_bytes"]["1"] < 0.9 * 80e9  # 7B int8 fits one 80 GB GPU
    assert main(["plan", "jobs/gpt3-175b-lora.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--json"]) == 0
    auto = json.loads(capsys.readouterr().out)["zero_stage_auto"]
    assert auto["stage"] == 3 and auto["per_worker_bytes"]["2"] > 80e9  # 175B int8 does not


def test_activation_checkpointing_keeps_one_input_per_block_and_one_block_recomputed():
    s = Setup(workers=1, micro_batch=1, seq_len=128, activation_checkpointing=True)
    terms = memory_terms(_counts(), "lora_int8_zero3", s, {"lora": ACTS, "full": ACTS})
    assert terms["activations"] == 5_000_000 + 10 * 10_000 + 1_000_000 + 2 * 2_000_000


def test_min_gpus_is_the_smallest_that_fits():
    c, s, acts = _counts(), Setup(workers=1, micro_batch=1, seq_len=128), {"lora": ACTS, "full": ACTS}
    mem = 6 * GiB
    n = min_workers(c, "full", s, mem, acts)
    assert n is not None
    assert sum(memory_terms(c, "full", Setup(workers=n, micro_batch=1, seq_len=128), acts).values()) <= mem
    assert sum(memory_terms(c, "full", Setup(workers=n - 1, micro_batch=1, seq_len=128), acts).values()) > mem
    assert min_workers(c, "lora_fp16", s, 1 * GiB, acts) is None  # a replicated base never fits a smaller GPU


def test_dequant_block_constant_matches_the_int8_matmul():
    from lora_dist import engine, plan, quant

    assert plan.DEQUANT_BLOCK_ELEMENTS == quant.DEQUANT_BLOCK_ELEMENTS
    assert plan.GATHER_BUFFER_BYTES == engine.GATHER_BUFFER_BYTES


SHAPE_CASES = {
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 128, "n_positions": 64},
}


@pytest.mark.parametrize("family", sorted(SHAPE_CASES))
def test_activations_counted_on_meta_equal_what_a_real_forward_saves(family):
    """The planner's count (meta device, nothing allocated) against the same forward on real CPU
    tensors, both under saved_tensors_hooks: one block and the head, byte for byte."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_dist.counting import SavedBytes
    from lora_dist.lora import set_trainable
    from lora_dist.model import embeddings_require_grad, prepare

    lora = LoraSpec(r=4, alpha=8, dropout=0.1, targets=("all-linear",))
    counted = count_activations(SHAPE_CASES[family], lora, "int8", 3, 24, "fp32", device="cpu")
    real = {}
    for layers in (1, 2):
        cfg = dict(SHAPE_CASES[family])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        config.num_hidden_layers = layers
        model = AutoModelForCausalLM.from_config(config)
        prepare(model, lora, "int8", device="cpu")
        set_trainable(model)
        embeddings_require_grad(model)
        model.train()
        ids = torch.randint(0, 128, (3, 24))
        counter = SavedBytes(model)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            model(input_ids=ids, labels=ids, use_cache=False)
        real[layers] = counter.total
    assert counted.per_block == real[2] - real[1]
    assert counted.head == real[1] - (real[2] - real[1])
    assert counted.per_block_checkpointed < counted.per_block / 4  # a checkpointed block keeps its input only


def test_checkpoint_bytes():
    c, s = _counts(), Setup(workers=8, micro_batch=1, seq_len=128)
    assert checkpoint_bytes(c, "lora_int8_zero3", s) == {"deliverable": 2_000_000, "resumable": 12_000_000}
    assert checkpoint_bytes(c, "full", s)["deliverable"] == 2_000_000_000


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 << 20
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_bytes("lots")


def test_every_shape_job_plans(monkeypatch):
    from lora_dist.cli import main

    monkeypatch.chdir(REPO)
    for job in ("gpt3-175b-lora.yaml", "llama2-7b-lora.yaml", "llama2-70b-lora.yaml"):
        assert main(["plan", f"jobs/{job}", "--json"]) == 0, job


@pytest.mark.slow
def test_every_job_plans(monkeypatch, smollm2_dir):
    from lora_dist.cli import main

    monkeypatch.chdir(REPO)
    for job in sorted((REPO / "jobs").glob("*.yaml")):
        assert main(["plan", str(job), "--json"]) == 0, job.name


def test_plan_cli_json_has_stable_keys(capsys, monkeypatch):
    import json

    from lora_dist.cli import main

    monkeypatch.chdir(REPO)
    assert main(["plan", "jobs/gpt3-175b-lora.yaml", "--gpus", "8", "--gpu-memory", "80GB", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("trainable_params", "adapter_bytes", "base_bytes", "per_worker_bytes", "min_gpus", "methods"):
        assert key in out
    assert out["trainable_params"] == 18_874_368 and out["adapter_bytes"] == 37_748_736
    assert set(out["methods"]) == {"full", "lora_fp16", "lora_int8_zero3"}
    assert out["methods"]["lora_fp16"]["min_gpus"] is None  # 349 GB fp16 base on each 80 GB GPU
