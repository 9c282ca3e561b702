"""The DeepSpeed configuration a job's spec turns into (the engine itself runs in test_distributed)."""

import pytest
import torch

from lora_dist.device import Placement, local_placement
from lora_dist.plan import ModelCounts, zero_settings
from lora_dist.spec import SpecError, load_spec

from conftest import MAIN_JOB

COUNTS = ModelCounts(architecture="X", layers=4, hidden=64, heads=4, vocab=100, total_params=1_000_000,
                     quantized_linear_params=800_000, quantized_rows=2_000, float_params=200_000, lora_params=30_000,
                     lora_tensors_persistent=True, largest_block_params=200_000, largest_linear_params=80_000,
                     small_float_params=1_000, block_quantized_params=199_000, block_rows=500, block_float_params=1_000)


def test_zero_config_follows_the_spec_and_the_plan():
    from lora_dist.engine import ds_config

    spec = load_spec(MAIN_JOB, ["data.path=null", "train.grad_accum=2", "cluster.zero_stage=2"])
    zero = zero_settings(COUNTS)
    cfg = ds_config(spec, 4, Placement(torch.device("cpu"), "fp32"), zero, spec.cluster.zero_stage)
    assert cfg["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False, **zero}
    assert cfg["train_batch_size"] == 8 * 2 * 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == spec.train.max_grad_norm
    assert cfg["optimizer"]["params"]["lr"] == spec.train.lr
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32: zero.Init on CPU would ignore an explicit dtype
    assert ds_config(spec, 1, Placement(torch.device("cpu"), "bf16"), zero, 2)["bf16"] == {"enabled": True}
    fp16 = ds_config(spec, 1, Placement(torch.device("cpu"), "fp16"), zero, 2)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # 0: DeepSpeed's dynamic loss scaling


def test_zero_settings_fit_the_model():
    zero = zero_settings(COUNTS)
    block = 200_000 + 500
    assert zero["stage3_prefetch_bucket_size"] >= block  # the next whole block is gathered while one computes
    assert zero["stage3_max_live_parameters"] == 2 * block and zero["stage3_max_reuse_distance"] == block
    assert zero["reduce_bucket_size"] == 30_000  # the LoRA gradients, not DeepSpeed's 5e8 elements
    assert zero["allgather_bucket_size"] == 30_000  # stages 1 and 2: the updated LoRA partitions
    assert zero_settings(COUNTS, "full")["reduce_bucket_size"] == 1_000_000


def test_compute_dtype_policy():
    spec = load_spec(MAIN_JOB, ["data.path=null"])
    assert local_placement(spec).dtype == torch.float32  # auto on the CPU
    assert local_placement(load_spec(MAIN_JOB, ["data.path=null", "train.dtype=bf16"])).dtype == torch.bfloat16
    with pytest.raises(SpecError, match="train.dtype: fp16 needs GPU workers"):
        load_spec(MAIN_JOB, ["data.path=null", "train.dtype=fp16"])
    gpu = load_spec(MAIN_JOB, ["data.path=null", "train.dtype=fp16", "cluster.gpus_per_worker=1"])
    with pytest.raises(ValueError, match="train.dtype: fp16 needs DeepSpeed's loss scaling"):
        local_placement(gpu)  # `lora-dist train` is one CPU process
    assert Placement(torch.device("cpu"), "bf16").record()["lora_master_dtype"] == "fp32"
