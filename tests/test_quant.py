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
