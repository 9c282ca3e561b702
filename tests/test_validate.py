"""validate_job: each check before a job starts is made in one place, and each entry point makes
the ones of where it runs (validate.CHECKS)."""

from __future__ import annotations

import pytest

from conftest import E2E_CSV, MAIN_JOB
from lora_dist.sources import DataError
from lora_dist.errors import ModelError
from lora_dist.spec import SpecError, load_spec
from lora_dist.validate import CHECKS, validate_job


def _spec(base, *more: str):
    return load_spec(MAIN_JOB, [f"model.base={base}", f"data.path={E2E_CSV}", *more])


def test_each_entry_point_makes_the_checks_of_where_it_runs(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_DIST_OUTPUT_ROOT", raising=False)
    monkeypatch.setenv("LORA_DIST_DATA_ROOT", str(E2E_CSV.parent))  # the cluster's, holding the data
    good = _spec(tiny_llama_dir, f"output.dir={tmp_path / 'runs'}")
    for where in CHECKS:
        validate_job(good, where)
    bad_target = _spec(tiny_llama_dir, "lora.targets=[nope_proj]")
    with pytest.raises(ModelError, match="lora.targets"):
        validate_job(bad_target, "train")
    with pytest.raises(ModelError, match="lora.targets"):
        validate_job(bad_target, "submit")
    validate_job(bad_target, "build")  # the worker builds it and says so; no second skeleton on each rank
    fp16 = _spec(tiny_llama_dir, "train.dtype=fp16", "cluster.gpus_per_worker=1")
    with pytest.raises(SpecError, match="train.dtype: fp16 needs DeepSpeed's loss scaling"):
        validate_job(fp16, "train")  # one process has no loss scaling
    validate_job(fp16, "submit")  # GPU workers do
    outside = _spec(tiny_llama_dir, "output.dir=/etc/runs")
    with pytest.raises(SpecError, match="output.dir: /etc/runs is outside the output root"):
        validate_job(outside, "cluster")
    validate_job(outside, "train")  # a job on this machine runs as its user
    huge = _spec(tiny_llama_dir, "train.micro_batch_size=65536", "data.max_length=131072")
    with pytest.raises(SpecError, match="cluster.workers: this job will not fit: the plan needs"):
        validate_job(huge, "submit")  # against this machine's memory, before Ray starts
    validate_job(huge, "build")  # a worker has been placed where its plan's memory was reserved


def test_packing_is_checked_wherever_a_model_is_built(tmp_path):
    """OPT is not among the models whose attention keeps packed examples apart (data.PACKING_MODEL_TYPES)."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    torch.manual_seed(0)
    base = tmp_path / "opt"
    AutoModelForCausalLM.from_config(OPTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                               ffn_dim=64, vocab_size=64, max_position_embeddings=64,
                                               word_embed_proj_dim=32)).save_pretrained(base)
    packed = _spec(base, "data.batching=packed", "lora.targets=[q_proj,v_proj]")
    for where in ("train", "submit", "build"):
        with pytest.raises(DataError, match="data.batching: packed"):
            validate_job(packed, where)
    validate_job(packed, "cluster")
    validate_job(_spec(base, "data.batching=grouped", "lora.targets=[q_proj,v_proj]"), "train")


def test_a_job_on_several_nodes_needs_storage_that_every_node_sees(tiny_llama_dir, tmp_path):
    two = _spec(tiny_llama_dir, f"output.dir={tmp_path}", "cluster.workers=2")
    with pytest.raises(SpecError, match="output.shared: true") as e:
        validate_job(two, "remote", source="job.yaml")
    assert e.value.source == "job.yaml" and e.value.problems[0].startswith("output.dir: ")
    validate_job(two, "submit")  # the embedded local Ray is one machine
    validate_job(_spec(tiny_llama_dir, f"output.dir={tmp_path}", "cluster.workers=2", "output.shared=true"), "remote")
    validate_job(_spec(tiny_llama_dir, "output.dir=s3://bucket/runs", "cluster.workers=2"), "remote")
