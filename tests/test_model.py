"""Injection on each architecture family, and the streaming loader against Hugging Face's own."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

from lora_dist.lora import LoRALinear, is_lora_param
from lora_dist.errors import ModelError
from lora_dist.model import load_model
from lora_dist.quant import Int8Linear
from lora_dist.spec import LoraSpec

TINY = {
    "llama": LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True),
    "opt": OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=128,
                     word_embed_proj_dim=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                     pad_token_id=1),
    "neox": GPTNeoXConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                          vocab_size=128, bos_token_id=0, eos_token_id=1),
    "gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0,
                       eos_token_id=1),
}

# (family, targets, LoRA modules, trainable params at r=4, int8 linears)
CASES = [
    ("llama", ["q_proj", "v_proj"], 4, 2 * (4 * 64 + 64 * 4) + 2 * (4 * 64 + 32 * 4), 14),
    ("opt", ["q_proj", "v_proj"], 4, 4 * (4 * 64 + 64 * 4), 12),
    ("neox", ["query_key_value"], 2, 2 * (4 * 64 + 192 * 4), 8),
    # GPT-2's fused c_attn: LoRA on the q and v slices only (A: 2r x 64, B: 128 x r per layer)
    ("gpt2", ["c_attn"], 2, 2 * (8 * 64 + 128 * 4), 8),
    ("gpt2", ["all-linear"], 8, None, 8),
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    out = {}
    for fam, cfg in TINY.items():
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(cfg)
        d = tmp_path_factory.mktemp(fam)
        m.save_pretrained(d)
        out[fam] = d
    return out


@pytest.mark.parametrize("family,targets,n_lora,n_params,n_int8", CASES)
def test_injection_counts_per_architecture(tiny_dirs, family, targets, n_lora, n_params, n_int8):
    lm = load_model(str(tiny_dirs[family]), LoraSpec(r=4, alpha=8, targets=tuple(targets)), "int8",
                    with_tokenizer=False)
    mods = dict(lm.model.named_modules())
    assert len(lm.injection.lora) == n_lora
    assert len(lm.injection.quantized) == n_int8
    assert sum(isinstance(m, Int8Linear) for m in mods.values()) == n_int8
    if n_params is not None:
        assert lm.trainable_params == n_params
    trainable = [n for n, p in lm.model.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_param(n) for n in trainable)
    # embeddings and the LM head stay float
    assert lm.model.get_input_embeddings().weight.dtype == torch.float32
    assert lm.model.get_output_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("family", sorted(TINY))
def test_full_fine_tuning_loads_every_weight_trainable(tiny_dirs, family):
    """lora=None (train.method: full): the skeleton's trainable set (every weight) survives the
    streamed load, tied weights counted once, and the values are the ones from_pretrained gives."""
    lm = load_model(str(tiny_dirs[family]), None, "none", with_tokenizer=False)
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[family])
    params = dict(lm.model.named_parameters())
    assert all(p.requires_grad for p in params.values()) and not lm.injection.lora
    assert lm.trainable_params == sum(p.numel() for p in params.values()) == ref.num_parameters()
    assert all(torch.equal(p, ref.get_parameter(n)) for n, p in params.items())


@pytest.mark.parametrize("family", sorted(TINY))
def test_streamed_model_equals_hugging_face_load(tiny_dirs, family):
    """Fresh LoRA (B = 0) on a float base streamed by us == the model from_pretrained builds."""
    targets = ("c_attn",) if family == "gpt2" else ("query_key_value",) if family == "neox" else ("q_proj", "v_proj")
    ours = load_model(str(tiny_dirs[family]), LoraSpec(r=4, targets=targets), "none", with_tokenizer=False).model
    ref = AutoModelForCausalLM.from_pretrained(tiny_dirs[family]).eval()
    ids = torch.randint(2, 128, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-5)
    q8 = load_model(str(tiny_dirs[family]), LoraSpec(r=4, targets=targets), "int8", with_tokenizer=False).model
    with torch.no_grad():
        a, b = q8(input_ids=ids).logits, ref(input_ids=ids).logits
    assert ((a - b).norm() / b.norm()) < 0.05


@pytest.mark.parametrize("family", sorted(TINY))
def test_a_frozen_head_keeps_no_view_of_its_weight_for_backward(tiny_dirs, family):
    """Under ZeRO-3 a view of the head's gathered weight saved for backward would keep it alive
    while the backward gathers it again (the head held twice at GPT-3 width): the frozen head
    saves nothing of its weight's storage, stays tied where the model ties it, and gives the
    logits and the input gradient that nn.Linear gives."""
    from lora_dist.model import FrozenHead

    lm = load_model(str(tiny_dirs[family]), LoraSpec(r=4, targets=("all-linear",)), "int8", with_tokenizer=False)
    head = lm.model.get_output_embeddings()
    assert type(head) is FrozenHead and not head.weight.requires_grad
    if lm.model.config.tie_word_embeddings:
        assert head.weight is lm.model.get_input_embeddings().weight
    x = torch.randn(2, 5, head.in_features, requires_grad=True)
    storage = head.weight.untyped_storage().data_ptr()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        y = head(x)
    assert storage not in saved
    (g,) = torch.autograd.grad(y.square().sum(), x)
    ref = torch.nn.functional.linear(x, head.weight, head.bias)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    assert torch.equal(y, ref) and torch.allclose(g, g_ref, atol=1e-6)
    full = load_model(str(tiny_dirs[family]), None, "none", with_tokenizer=False).model
    assert full.get_output_embeddings().weight.requires_grad  # a head that trains keeps nn.Linear's path
    out = full.get_output_embeddings()(x)
    assert out.requires_grad and out.grad_fn.name() != "FrozenMatmulBackward"


def test_target_matching_nothing_names_the_field(tiny_dirs):
    with pytest.raises(ModelError, match=r"lora.targets: \['q_proj'\] match no linear layer .*c_attn"):
        load_model(str(tiny_dirs["gpt2"]), LoraSpec(targets=("q_proj",)), "int8", with_tokenizer=False)


def test_rank_above_layer_dimensions_is_rejected(tiny_dirs):
    with pytest.raises(ModelError, match="lora.r: 100 exceeds"):
        load_model(str(tiny_dirs["llama"]), LoraSpec(r=100), "int8", with_tokenizer=False)


@pytest.mark.slow
def test_smollm2_int8_counts_and_answers(smollm2_dir):
    lm = load_model("smollm2-135m", LoraSpec(r=8, targets=("q_proj", "v_proj")), "int8")
    assert lm.trainable_params == 460_800
    assert len(lm.injection.quantized) == 30 * 7 and len(lm.injection.lora) == 60
    int8_bytes = sum(p.numel() for n, p in lm.model.named_parameters() if p.dtype == torch.int8)
    assert int8_bytes == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert isinstance(lm.model.model.layers[0].self_attn.q_proj, LoRALinear)
    tok = lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_int8_base_agrees_with_float_base_on_held_out_e2e(e2e_csv, smollm2_dir):
    from lora_dist.data import collate, tokenize
    from lora_dist.sources import read_e2e, split_by_prompt
    from lora_dist.evaluate import logit_agreement

    lora = LoraSpec(r=8, targets=("q_proj", "v_proj"))
    fp = load_model("smollm2-135m", lora, "none")
    q8 = load_model("smollm2-135m", lora, "int8", with_tokenizer=False)
    _, val = split_by_prompt(read_e2e(e2e_csv), 0.1)
    items = tokenize(val[:16], fp.tokenizer, 64)
    batches = [collate(items[i:i + 8], fp.tokenizer.pad_token_id) for i in (0, 8)]
    res = logit_agreement(q8.model, fp.model, batches)
    # Stated bounds for row-wise absmax int8 on every decoder linear of SmolLM2 (measured 0.24 / 97.2% on 8 batches).
    assert res["top1_agreement"] > 0.95, res
    assert res["mean_abs_logit_diff"] < 0.4, res


def test_single_device_load_says_what_it_needs_when_it_does_not_fit(tiny_dirs):
    """eval and generate check the weights against the device's free memory before loading:
    the int8 GPT-3 base (about 175 GB) does not fit this machine, and the error says how much
    it needs and how much there is."""
    from lora_dist.counting import check_fits, weights_bytes

    lora = LoraSpec(r=4, targets=("c_attn",))
    with pytest.raises(ModelError, match=r"gpt3-175b with quantization int8 needs 1[6-9]\d\.\d\d GiB .* available"):
        check_fits("gpt3-175b", lora, "int8")
    small = str(tiny_dirs["gpt2"])
    assert check_fits(small, lora, "int8") == weights_bytes(small, lora, "int8") < weights_bytes(small, lora, "none")
