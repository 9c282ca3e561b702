"""Shared fixtures: the real SmolLM2 model (converted once per machine), the real E2E data, and
one real `lora-dist train` run whose artifact several tests inspect."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
E2E_CSV = (REPO / ".." / "shared" / "data" / "e2e" / "devset.csv").resolve()

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def e2e_csv() -> Path:
    assert E2E_CSV.is_file(), f"the E2E data is expected at {E2E_CSV} (../shared beside the repo)"
    return E2E_CSV


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from lora_dist.model import resolve_base

    return resolve_base("smollm2-135m")


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the installed entry point as a user would."""
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"lora-dist {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# The short real run: SmolLM2-135M, int8 base, r=8 on q_proj/v_proj, E2E devset.
TRAIN_OVERRIDES = [
    "train.max_steps=12", "train.micro_batch_size=8", "train.lr=2e-3", "train.warmup_steps=2",
    "train.eval_batches=4", "train.log_every=1", "data.max_length=64",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, e2e_csv, smollm2_dir):
    """(artifact dir, CompletedProcess) of one real `lora-dist train` on the main job."""
    work = tmp_path_factory.mktemp("train")
    args = ["train", str(REPO / "jobs" / "smollm2-e2e.yaml"), f"--set=data.path={e2e_csv}",
            f"--set=output.dir={work / 'runs'}"] + [f"--set={o}" for o in TRAIN_OVERRIDES]
    proc = run_cli(*args, cwd=work)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    return artifact, proc
