import math

import pytest
import torch
from torch import nn

from lora_dist.lora import LoRALinear, is_lora_param, lora_parameters, set_trainable, trainable_parameters
from lora_dist.quant import Int8Linear


def _trained(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return layer


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_equals_hand_computed_w0x_plus_scaled_bax(use_rslora):
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = _trained(LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora))
    x = torch.randn(3, 5, 32)
    s = 8 / math.sqrt(4) if use_rslora else 8 / 4
    expected = x @ base.weight.t() + base.bias + s * (x @ layer.lora_A.t() @ layer.lora_B.t())
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_int8_base_forward_is_dequantized_w0x_plus_lora():
    torch.manual_seed(0)
    w = torch.randn(24, 32)
    layer = _trained(LoRALinear(Int8Linear.from_float(w), r=4, alpha=4))
    x = torch.randn(6, 32)
    w0 = layer.base.dequantized_weight()
    expected = x @ w0.t() + (x @ layer.lora_A.t() @ layer.lora_B.t())
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_fresh_adapter_is_a_no_op_and_inits_follow_loralib():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))
    assert (layer.lora_B == 0).all()
    bound = 1 / math.sqrt(64)  # kaiming_uniform_(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound
    g = LoRALinear(nn.Linear(64, 64), r=8, alpha=16, init="gaussian")
    assert abs(g.lora_A.std().item() - 1 / 8) < 0.02


def test_merge_unmerge_round_trip_on_float_base():
    torch.manual_seed(0)
    layer = _trained(LoRALinear(nn.Linear(32, 16), r=4, alpha=8))
    x = torch.randn(7, 32)
    w_before = layer.base.weight.detach().clone()
    y = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)
    assert torch.allclose(layer.base.weight, w_before + layer.delta_weight(), atol=1e-6)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, w_before, atol=1e-6)
    assert torch.allclose(layer(x), y, atol=1e-5)


def test_merge_on_int8_base_yields_equivalent_float_layer():
    torch.manual_seed(0)
    layer = _trained(LoRALinear(Int8Linear.from_float(torch.randn(16, 32)), r=4, alpha=8))
    deq = layer.base.dequantized_weight()
    x = torch.randn(7, 32)
    y = layer(x)
    layer.merge()
    assert isinstance(layer.base, nn.Linear) and layer.base.weight.dtype == torch.float32
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base.weight, deq, atol=1e-6)


def test_slices_put_lora_on_q_and_v_rows_only():
    torch.manual_seed(0)
    d = 8
    layer = _trained(LoRALinear(nn.Linear(d, 3 * d), r=2, alpha=2, slices=[(0, d), (2 * d, 3 * d)]))
    assert layer.lora_A.shape == (4, d) and layer.lora_B.shape == (2 * d, 2)
    x = torch.randn(5, d)
    delta = layer(x) - layer.base(x)
    a_q, a_v = layer.lora_A[:2], layer.lora_A[2:]
    b_q, b_v = layer.lora_B[:d], layer.lora_B[d:]
    assert torch.allclose(delta[:, :d], x @ a_q.t() @ b_q.t(), atol=1e-6)
    assert torch.equal(delta[:, d:2 * d], torch.zeros(5, d))
    assert torch.allclose(delta[:, 2 * d:], x @ a_v.t() @ b_v.t(), atol=1e-6)
    assert torch.allclose(layer.delta_weight() @ x.t(), delta.t(), atol=1e-6)


def test_only_lora_tensors_train():
    model = nn.Sequential(LoRALinear(nn.Linear(8, 8), r=2, alpha=2), nn.LayerNorm(8))
    n = set_trainable(model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B"} == set(lora_parameters(model))
    assert n == 2 * 8 + 8 * 2
    assert is_lora_param("x.lora_A") and not is_lora_param("x.base.weight")


def test_full_fine_tuning_trains_every_float_weight_outside_int8_linears():
    """``train.method: full``: set_trainable(full=True) makes every float parameter trainable,
    tied weights counted once, and leaves an int8 linear frozen, its float row scales included."""
    emb = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = emb.weight  # tied, as tie_word_embeddings does
    model = nn.ModuleDict({"emb": emb, "head": head, "norm": nn.LayerNorm(8), "q": Int8Linear(8, 4)})
    model.requires_grad_(False)
    n = set_trainable(model, full=True)
    assert list(trainable_parameters(model)) == ["emb.weight", "norm.weight", "norm.bias"]
    assert n == 10 * 8 + 8 + 8
    assert not any(p.requires_grad for p in model["q"].parameters())
    set_trainable(model)  # back to LoRA only: nothing here is LoRA
    assert trainable_parameters(model) == {}


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="init"):
        LoRALinear(nn.Linear(4, 4), r=1, alpha=1, init="xavier")
