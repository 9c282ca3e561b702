import pytest
import torch
from torch import nn

from lora_dist.quant import Int8Linear, dequantize_rowwise, quantize_rowwise


def test_rowwise_quantization_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different scale
    q, absmax = quantize_rowwise(w)
    assert q.dtype == torch.int8 and absmax.dtype == torch.float32
    assert torch.allclose(absmax, w.abs().amax(dim=1), rtol=1e-3)  # fp16 rounding of the input
    err = (dequantize_rowwise(q, absmax) - w).abs().amax(dim=1)
    step = absmax / 127
    assert (err <= 0.5 * step * 1.01 + 1e-3 * absmax).all()


def test_zero_row_stays_zero():
    w = torch.randn(4, 8)
    w[2] = 0
    q, absmax = quantize_rowwise(w)
    assert (q[2] == 0).all()
    assert torch.isfinite(dequantize_rowwise(q, absmax)).all()


def test_int8_linear_matches_float_and_passes_gradient_to_input():
    torch.manual_seed(1)
    ref = nn.Linear(96, 48, bias=True)
    layer = Int8Linear.from_float(ref.weight.data, ref.bias.data)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert layer.weight_absmax.dtype == torch.float32 and not layer.weight_absmax.requires_grad
    x = torch.randn(5, 7, 96, requires_grad=True)
    y = layer(x)
    deq = x @ layer.dequantized_weight().t() + ref.bias
    assert torch.allclose(y, deq, atol=1e-5)  # the matmul is exactly the dequantized weight's
    rel = (y - ref(x)).norm() / ref(x).norm()
    assert rel < 0.01, f"int8 relative error {rel:.4f}"
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ layer.dequantized_weight().t()).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)


def test_wrong_weight_shape_is_rejected():
    layer = Int8Linear(8, 4)
    with pytest.raises(ValueError, match="does not match"):
        layer.load_float_weight(torch.randn(8, 4))


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while ``fn()`` runs (each tensor once)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_int8_linear_saves_nothing_for_backward_and_lora_saves_its_input_once():
    from lora_dist.lora import LoRALinear

    torch.manual_seed(2)
    base = Int8Linear.from_float(torch.randn(48, 96))
    x = torch.randn(4, 16, 96, requires_grad=True)
    assert _saved_bytes(lambda: base(x)) == 0  # a frozen weight needs nothing of x for grad_x
    lora = LoRALinear(Int8Linear.from_float(torch.randn(48, 96)), r=4, alpha=8)
    saved = _saved_bytes(lambda: lora(x))
    # x once for A's gradient, A x for B's, and the small A and B themselves
    expected = x.numel() * 4 + 4 * 16 * 4 * 4 + (4 * 96 + 48 * 4) * 4
    assert saved <= expected, (saved, expected)
    assert saved >= x.numel() * 4


def test_blocked_matmul_and_quantization_equal_the_whole_matrix(monkeypatch):
    import lora_dist.quant as quant

    torch.manual_seed(3)
    w = torch.randn(40, 24)
    x = torch.randn(3, 24, requires_grad=True)
    whole = Int8Linear.from_float(w)
    y_whole = whole(x)
    (g_whole,) = torch.autograd.grad(y_whole.square().sum(), x)
    monkeypatch.setattr(quant, "DEQUANT_BLOCK_ELEMENTS", 24 * 7)  # 7 rows per block, 6 blocks
    blocked = Int8Linear.from_float(w)
    assert torch.equal(blocked.weight, whole.weight) and torch.equal(blocked.weight_absmax, whole.weight_absmax)
    y = blocked(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    assert torch.allclose(y, y_whole, atol=1e-6) and torch.allclose(g, g_whole, atol=1e-5)


def test_weights_are_quantized_from_their_stored_dtype():
    torch.manual_seed(4)
    w16 = (torch.randn(8, 32) * 0.02).to(torch.float16)
    q16, a16 = quantize_rowwise(w16)
    q32, a32 = quantize_rowwise(w16.float())  # the same values, held in fp32
    assert torch.equal(q16, q32) and torch.equal(a16, a32)
    big = torch.randn(4, 16, dtype=torch.bfloat16) * 1e6  # beyond fp16's range
    q, a = quantize_rowwise(big)
    assert torch.isfinite(a).all()
    assert torch.allclose(a, big.float().abs().amax(dim=1), rtol=1e-2)
    assert ((dequantize_rowwise(q, a) - big.float()).abs() <= a.unsqueeze(1) / 127).all()


def test_int8_linear_computes_in_the_input_dtype():
    torch.manual_seed(5)
    layer = Int8Linear.from_float(torch.randn(16, 32))
    x = torch.randn(2, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_the_matmuls_reused_dequantization_buffer_gives_the_same_values_in_every_dtype():
    """The int8 matmul dequantizes each block into a buffer it reuses (no allocation per layer
    and step): the values are dequantize_rowwise's to the bit, whatever block came before."""
    from lora_dist.quant import Int8Matmul, _dequantized_block

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, cols in ((300, 70), (12, 5), (64, 256)):  # larger, smaller, larger again
            q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8)
            a = torch.rand(rows) * 3
            assert torch.equal(_dequantized_block(q, a, dtype), dequantize_rowwise(q, a, dtype))
        x = torch.randn(3, 7, cols, dtype=dtype, requires_grad=True)
        y = Int8Matmul.apply(x, q, a, None)
        w = dequantize_rowwise(q, a, dtype)
        assert torch.equal(y, x @ w.t())
        g = torch.randn_like(y)
        y.backward(g)
        assert torch.equal(x.grad, g @ w)


def test_the_matmuls_dequantized_block_allocates_nothing_beside_its_buffer():
    """A mixed-dtype torch.mul into the scratch buffer allocated a temporary of the whole block
    (0.25 GiB per fp32 block at GPT-3 width, on top of the buffer): in a fresh process, the peak
    resident memory of dequantizing a 2^24-element block twice rises by the buffer alone."""
    import subprocess
    import sys

    code = """
import resource, torch
from lora_dist.quant import _dequantized_block
q = torch.randint(-127, 128, (4096, 4096), dtype=torch.int8)
a = torch.rand(4096) + 0.5
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = peak()
for _ in range(2):
    out = _dequantized_block(q, a, torch.float32)
print(peak() - before, out.numel() * 4)
"""
    rose, buffer = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())
    assert rose < 1.25 * buffer, (rose, buffer)
