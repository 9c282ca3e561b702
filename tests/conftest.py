"""Shared fixtures.

Two tiers (README "Tests"): ``python -m pytest -q -n auto -m "not slow" tests`` runs every
module's logic on tiny models built here (a 2-block Llama with its own BPE tokenizer, trained on the
E2E references), one pytest-xdist process per core (about 6 minutes on 2 cores); ``python -m pytest
-q -m slow tests`` the ``slow`` tests, which use the real SmolLM2-135M (converted once per machine),
real Ray and real DeepSpeed ZeRO-3, one at a time (their jobs use every core).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
E2E_CSV = REPO / "jobs" / "data" / "e2e" / "devset.csv"
MAIN_JOB = REPO / "jobs" / "smollm2-e2e.yaml"

# What the tests start runs the Python running them: a Ray head's job entrypoint is `python -m ...`,
# found on PATH, so the interpreter's own directory goes first (also for .venv/bin/python -m pytest
# run without activating the venv, which left the head's jobs on another Python).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def e2e_csv() -> Path:
    return E2E_CSV


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from lora_dist.base import resolve_base

    return resolve_base("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-block Llama (hidden 64) with random weights and a byte-level BPE tokenizer trained on
    the E2E references: a real Hugging Face directory that every path loads in about a second."""
    import csv

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from lora_dist.sources import E2E_TEMPLATE, render

    d = tmp_path_factory.mktemp("tiny-llama")
    with open(E2E_CSV, newline="", encoding="utf-8") as f:
        text = [render(E2E_TEMPLATE, row["mr"]) + " " + row["ref"] for row in csv.DictReader(f)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=1024, special_tokens=["</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(fast), tie_word_embeddings=True,
                         eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id,
                         max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: float = 900,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the installed entry point as a user would."""
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"lora-dist {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


# The short real run: SmolLM2-135M, int8 base, the main job's LoRA on every linear, E2E devset.
TRAIN_OVERRIDES = [
    "train.max_steps=12", "train.micro_batch_size=4", "train.lr=2e-3", "train.warmup_steps=2",
    "train.eval_batches=4", "train.log_every=1", "data.max_length=64",
]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, smollm2_dir):
    """(artifact dir, CompletedProcess) of one real `lora-dist train` of the main job."""
    work = tmp_path_factory.mktemp("train")
    args = ["train", str(MAIN_JOB), f"--set=output.dir={work / 'runs'}"] + [f"--set={o}" for o in TRAIN_OVERRIDES]
    proc = run_cli(*args, cwd=REPO)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    return artifact, proc


@pytest.fixture(scope="session")
def chat_trained(tmp_path_factory, smollm2_dir):
    """The artifact of a few real steps of the chat job on SmolLM2 (its ChatML template)."""
    work = tmp_path_factory.mktemp("chat-train")
    proc = run_cli("train", str(REPO / "jobs" / "smollm2-chat.yaml"), f"--set=output.dir={work / 'runs'}",
                   "--set=train.max_steps=6", "--set=train.micro_batch_size=4", "--set=train.warmup_steps=1",
                   "--set=train.eval_batches=2", cwd=REPO)
    return Path(proc.stdout.strip().splitlines()[-1])


TINY_OVERRIDES = ["train.max_steps=4", "train.micro_batch_size=4", "train.lr=5e-3", "train.warmup_steps=1",
                  "train.eval_batches=2", "train.log_every=1", "data.max_length=96", "lora.r=4"]


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_llama_dir):
    """The artifact of `train_local` on the tiny Llama with E2E data (the single-process loop)."""
    import io

    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    out = tmp_path_factory.mktemp("tiny-train") / "runs"
    spec = load_spec(MAIN_JOB, [f"model.base={tiny_llama_dir}", f"data.path={E2E_CSV}", f"output.dir={out}",
                                *TINY_OVERRIDES])
    log = io.StringIO()
    artifact = train_local(spec, job_id="tiny", stream=log)
    return artifact, log.getvalue()
