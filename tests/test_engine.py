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
    # each parameter gathered into its own buffer: no flat copy of a whole fetch (issue 33)
    assert cfg["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False,
                                        "stage3_allgather_sequential": True, **zero}
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


_GATHER = r"""
import os, sys, torch, torch.distributed as dist
rank, port = int(sys.argv[1]), sys.argv[2]
os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
from lora_dist import engine as eng
eng.init_distributed(False)
eng.GATHER_BUFFER_BYTES = 2 * 4 * 1000  # slices of 1,000 fp32 values per rank: 2,501 values take three
from deepspeed.comm import comm as ds_comm
assert ds_comm.cdb.all_gather_function is eng.sliced_all_gather_into_tensor
for n, dtype in ((2501, torch.float32), (2501, torch.int8), (7, torch.float32)):
    g = torch.Generator().manual_seed(rank)
    part = (torch.randn(n, generator=g) * 50).to(dtype)
    want, got = torch.empty(2 * n, dtype=dtype), torch.full((2 * n,), -1).to(dtype)
    dist.all_gather_into_tensor(want, part)
    handle = ds_comm.all_gather_into_tensor(got, part, async_op=True)  # the path ZeRO-3 takes
    handle.wait()
    assert torch.equal(got, want), (n, dtype)
print("OK", rank)
"""


def test_zero3_gathers_on_gloo_go_in_slices_and_land_the_same_values(tmp_path):
    """On CPU every ZeRO-3 gather goes through sliced_all_gather_into_tensor (gloo's own holds a
    second copy of its whole output): two gloo ranks get exactly what torch's all-gather gives,
    for partitions of several slices, a ragged last slice, int8, and one under a slice."""
    import socket
    import subprocess
    import sys

    script = tmp_path / "gather.py"
    script.write_text(_GATHER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert all(f"OK {r}" in o for r, o in enumerate(outs))
