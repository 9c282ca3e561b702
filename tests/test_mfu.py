"""Model FLOPs utilization (lora_dist.mfu): the count a step's FLOPs come from, the measured peak
it is divided by, and the mean the manifest keeps."""

from __future__ import annotations

import json

import pytest
import torch

from lora_dist.mfu import flop_count, gemm_peak, mean_mfu, probe_shapes


def _counts(base: str, targets: str = "all-linear", r: int = 4):
    from lora_dist.counting import count_model
    from lora_dist.spec import LoraSpec

    return count_model(base, LoraSpec(r=r, targets=targets))


def test_a_tokens_flops_are_counted_weight_by_weight_from_the_architecture(tiny_llama_dir):
    """The tiny Llama (2 blocks, hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, tied
    head) counted by hand: forward 2 per weight, backward 2 per frozen weight (input gradient) and
    4 per LoRA weight, the tied head a matmul, the embedding lookup none."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_llama_dir).vocab_size
    block = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o; gate, up, down
    lora = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
    c = _counts(str(tiny_llama_dir))
    assert c.matmul_params == 2 * block + vocab * 64 and c.block_matmul_params == 2 * block
    assert c.lora_params == lora and c.attention_width == 64
    assert set(c.linear_shapes) == {(64, 64), (64, 32), (64, 128), (128, 64), (64, vocab)}

    f = flop_count(c, full=False, checkpointing=False)
    assert f.per_token == 4 * (2 * block + vocab * 64) + 6 * lora
    assert f.per_token_sq == 12 * 2 * 64  # per layer: 4 w forward, 8 w backward
    recomputed = flop_count(c, full=False, checkpointing=True)  # the blocks' forward again
    assert recomputed.per_token == f.per_token + 2 * (2 * block + lora)
    assert recomputed.per_token_sq == 16 * 2 * 64
    assert flop_count(c, full=True, checkpointing=False).per_token == 6 * (2 * block + vocab * 64)
    assert f.of(10, 30) == 10 * f.per_token + 30 * f.per_token_sq
    assert probe_shapes(c, 4, 96)[0][0] == 4 * 96


def test_smollm2_costs_four_flops_per_frozen_weight_as_the_issue_counts():
    """SmolLM2-135M's 134.5M parameters are all matmul weights (the head tied to the embedding):
    about 4 x 134.5M FLOPs a token, plus LoRA r=8 on every linear."""
    c = _counts("smollm2-135m", r=8)
    assert c.matmul_params == 134_479_872 and c.lora_params == 2_442_240
    assert flop_count(c, False, False).per_token == pytest.approx(552.6e6, rel=1e-3)


def test_the_peak_is_measured_and_the_best_seen_on_this_machine_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path))
    shapes = [(256, 256, 256), (256, 256, 512)]
    measured = gemm_peak(torch.device("cpu"), torch.float32, shapes)
    assert 1e8 < measured < 1e14  # FLOP/s a CPU can do
    table = json.loads((tmp_path / "gemm_peak.json").read_text())
    assert list(table.values()) == [measured]
    key = next(iter(table))
    (tmp_path / "gemm_peak.json").write_text(json.dumps({key: measured * 100}))  # a better probe, earlier
    assert gemm_peak(torch.device("cpu"), torch.float32, shapes) == measured * 100
    # another dtype, or other shapes, are another entry
    gemm_peak(torch.device("cpu"), torch.bfloat16, shapes)
    assert len(json.loads((tmp_path / "gemm_peak.json").read_text())) == 2


def test_the_manifests_mfu_leaves_out_each_starts_warm_up_step():
    records = [{"step": 1, "mfu": 0.1}, {"step": 2, "mfu": 0.4}, {"step": 2, "val_loss": 1.0}, {"step": 3, "mfu": 0.6},
               {"step": 3, "resumed_from": 3}, {"step": 4, "mfu": 0.2}, {"step": 5, "mfu": 0.8}]
    assert mean_mfu(records) == pytest.approx((0.4 + 0.6 + 0.8) / 3)
    assert mean_mfu([{"step": 1, "mfu": 0.5}]) is None
