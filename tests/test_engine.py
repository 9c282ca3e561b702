"""The DeepSpeed configuration a job's spec turns into (the engine itself runs in test_distributed)."""

from lora_dist.spec import load_spec

from conftest import MAIN_JOB


def test_zero_config_follows_the_spec():
    from lora_dist.engine import ds_config

    spec = load_spec(MAIN_JOB, ["data.path=null", "train.grad_accum=2", "cluster.zero_stage=2"])
    cfg = ds_config(spec, world_size=4, cuda=False)
    assert cfg["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False}
    assert cfg["train_batch_size"] == 8 * 2 * 4 and cfg["gradient_accumulation_steps"] == 2
    assert cfg["gradient_clipping"] == spec.train.max_grad_norm
    assert cfg["optimizer"]["params"]["lr"] == spec.train.lr
    assert "bf16" not in cfg and "fp16" not in cfg  # fp32 on CPU: zero.Init would ignore an explicit dtype
    assert ds_config(spec, world_size=1, cuda=True)["bf16"] == {"enabled": True}
