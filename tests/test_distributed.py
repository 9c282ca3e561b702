"""The distributed path for real: Ray Train workers, DeepSpeed ZeRO-3, the int8 SmolLM2 base.

One uninterrupted 2-worker job (with the parity guard on) is the reference that the
kill-and-resume job must reproduce. Its output.dir is outside the directory it is submitted
from: on the embedded default a job may write wherever its user can.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_dist import adapter, store
from lora_dist.launch import usable_cores

from conftest import REPO

pytestmark = pytest.mark.slow

JOB = str(REPO / "jobs" / "smollm2-e2e.yaml")
# Small and quick on 2 cores (a step of 2 short examples per rank takes a few seconds where 4 longer
# ones took 14); checkpoints every 2 steps so a restart has something to resume and to train.
DIST = ["cluster.workers=2", "cluster.zero_stage=3", "train.max_steps=4", "train.micro_batch_size=2",
        "data.max_length=48", "train.eval_batches=1", "train.lr=2e-3", "train.warmup_steps=1",
        "train.checkpoint_every=2", "train.log_every=1"]
SMOLLM2_INT8_BYTES = 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)


def submit(out: Path, *extra: str, job_id: str | None = None, wait: bool = True, e2e_csv: Path):
    args = [sys.executable, "-m", "lora_dist.cli", "submit", JOB, f"--set=data.path={e2e_csv}",
            f"--set=output.dir={out}"] + [f"--set={o}" for o in DIST + list(extra)]
    if job_id:
        args += ["--job-id", job_id]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if not wait:
        return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=1200, env=env)


def lora_tensors(artifact: Path) -> dict[str, torch.Tensor]:
    return adapter.read_lora_tensors(artifact)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, e2e_csv, smollm2_dir):
    out = tmp_path_factory.mktemp("dist") / "runs"
    proc = submit(out, "train.parity_check=true", "train.parity_steps=2", e2e_csv=e2e_csv)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    return artifact, proc


def test_two_worker_zero3_job_shards_the_int8_base(uninterrupted):
    artifact, proc = uninterrupted
    manifest = store.verify_artifact(artifact)
    assert manifest.world_size == 2 and manifest.zero_stage == 3 and manifest.quantization == "int8"
    assert manifest.trainable_params == 2_442_240  # r=8 on the 7 linears of 30 blocks
    # each rank holds half of the int8 base (ZeRO pads a partition to an even split at most)
    assert manifest.int8_full_bytes == SMOLLM2_INT8_BYTES
    assert abs(manifest.int8_partition_bytes - SMOLLM2_INT8_BYTES / 2) <= 2 * 210
    metrics = [json.loads(line) for line in (artifact / store.METRICS_FILE).read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 5))
    for m in steps:
        assert len(m["peak_memory_bytes"]) == 2 and len(m["int8_partition_bytes"]) == 2
        assert all(abs(b - SMOLLM2_INT8_BYTES / 2) <= 2 * 210 for b in m["int8_partition_bytes"])
    assert manifest.val_loss_after < manifest.val_loss_before
    assert "step 4/4" in proc.stdout  # progress reached the driver's console
    # cluster.cpus_per_worker auto on the embedded Ray: this machine's cores shared by the 2 workers
    assert manifest.cpus_per_worker == manifest.torch_threads == max(1, usable_cores() // 2)
    # MFU over both workers' summed GEMM peaks, in every step record, the mean in the manifest
    assert all(0 < m["mfu"] < 1 for m in steps) and 0 < manifest.mfu < 1
    assert manifest.model_flops_per_token == pytest.approx(552.6e6, rel=1e-3)
    # what the job ran with: the compute dtype policy and ZeRO settings sized from the model
    assert manifest.precision == {"compute_dtype": "fp32", "lora_master_dtype": "fp32",
                                     "optimizer_state_dtype": "fp32", "base_weight_dtype": "int8",
                                     "base_scale_dtype": "fp32", "device": "cpu"}
    zero = manifest.zero_settings
    block = SMOLLM2_INT8_BYTES // 30 + 2 * 576  # one decoder block: its int8 weights and two norms
    assert zero["stage3_prefetch_bucket_size"] >= block and zero["reduce_bucket_size"] == 2_442_240


def test_parity_guard_matches_unsharded_reference(uninterrupted):
    artifact, proc = uninterrupted
    manifest = store.read_manifest(artifact)
    print(f"parity: largest |sharded - unsharded| loss difference {manifest.parity_max_loss_diff:.3e}")
    # The job's guard fails above 1e-3 nats/token (train.parity_tolerance). Measured differences
    # are ~1e-6 (float summation order); LoRA dropout masks drawn from per-process RNG streams
    # instead of per batch had made them 1.8e-3 at step 2, so this asserts well below the guard.
    assert manifest.parity_max_loss_diff is not None and manifest.parity_max_loss_diff < 1e-4
    assert "parity reference losses" in proc.stdout


def test_export_is_gathered_and_peft_shaped(uninterrupted):
    artifact, _ = uninterrupted
    tensors = lora_tensors(artifact)
    assert len(tensors) == 30 * 7 * 2  # all-linear: q, k, v, o, gate, up, down in every block, A and B
    for name, t in tensors.items():
        assert t.shape in {(8, 576), (576, 8), (192, 8), (8, 1536), (1536, 8)}, (name, t.shape)
    assert all(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)


def test_killed_worker_is_replaced_and_training_resumes_exactly(uninterrupted, tmp_path, e2e_csv):
    reference, _ = uninterrupted
    out = tmp_path / "runs"
    job_id = f"resume-{os.urandom(3).hex()}"  # a job id is bound to its first output.dir: one per run
    proc = submit(out, "cluster.max_failures=1", job_id=job_id, wait=False, e2e_csv=e2e_csv)
    work = out / f".smollm2-e2e-{job_id}.work"
    killed_at = None
    deadline = time.time() + 900
    try:
        while time.time() < deadline and killed_at is None:
            time.sleep(0.5)
            mfile = work / "metrics.jsonl"
            if mfile.is_file():
                done = [json.loads(x)["step"] for x in mfile.read_text().splitlines() if '"loss"' in x]
                if done and max(done) >= 3:  # past the step-2 checkpoint
                    pid = int((work / "rank1.pid").read_text())
                    os.kill(pid, signal.SIGKILL)
                    killed_at = max(done)
            assert proc.poll() is None, proc.stdout.read()[-5000:]
        stdout, _ = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed_at is not None, "the job never reached step 3"
    assert proc.returncode == 0, stdout[-6000:]
    artifact = Path(stdout.strip().splitlines()[-1])
    manifest = store.verify_artifact(artifact)
    resumed = manifest.resumed_from_step
    assert resumed in (2, 4) and resumed <= killed_at, (resumed, killed_at)
    history = [json.loads(x) for x in (artifact / store.METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in history if "loss" in m] == list(range(1, 5))  # each step once
    ours, theirs = lora_tensors(artifact), lora_tensors(reference)
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in theirs)
    scale = max(float(theirs[k].abs().max()) for k in theirs if "lora_B" in k)
    # Stated tolerance: 1e-4 of the largest lora_B entry (optimizer state and RNG are restored exactly;
    # what remains is float reduction order).
    print(f"resumed from step {resumed} (killed at step {killed_at}); max |adapter diff| {worst:.3e}, "
          f"max |lora_B| {scale:.3e}")
    assert worst <= 1e-4 * scale + 1e-7
