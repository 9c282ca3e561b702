"""Shared fixtures.

Two tiers (README "Tests"): ``python -m pytest -q -n auto -m "not slow" tests`` runs every
module's logic on tiny models built here (a 2-block Llama with its own BPE tokenizer, trained on the
E2E references), one pytest-xdist process per core (about 6 minutes on 2 cores); ``python -m pytest
-q -n 2 --dist loadfile -m slow tests`` the ``slow`` tests, which use the real SmolLM2-135M (converted
once per machine), real Ray and real DeepSpeed ZeRO-3, two modules at a time (a module's own Ray
head stays on one process; the whole CI run took 1912 s this way at 1365c68, 2494 s one at a time at 42c0177).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import tempfile
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


def pytest_configure(config) -> None:
    """Before any test (and, under pytest-xdist, before its worker processes start): the Ray auth
    token exists. Ray 2.60's embedded ``ray.init`` writes ~/.ray/auth_token when it is missing, but
    `ray start --head` (test_jobs' head, the two hosts) only turns token auth on where it exists, so
    a head started before any embedded Ray ran, or beside one writing it, would run without auth."""
    if "PYTEST_XDIST_WORKER" in os.environ or (Path.home() / ".ray" / "auth_token").is_file():
        return
    ray = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray), "get-auth-token", "--generate"], check=True, capture_output=True, timeout=120)


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


def once_per_run(tmp_path_factory, name: str, produce) -> dict:
    """What ``produce(work_dir)`` returns (a JSON object), produced once for the whole test run.

    pytest-xdist gives each of its processes a session of its own, so a session fixture alone
    would train its artifact once per process. The first process to ask produces it under a lock
    in the run's shared temporary directory; the others wait and read what it recorded."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return produce(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent
    record = shared / f"{name}.json"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            return json.loads(record.read_text())
        value = produce(Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared)))  # a failed try leaves its own
        record.write_text(json.dumps(value))
        return value


def _train_cli(*args: str):
    """A function of a work directory: `lora-dist train ARGS` into it, as a JSON object."""
    def produce(work: Path) -> dict:
        proc = run_cli("train", *args, f"--set=output.dir={work / 'runs'}", cwd=REPO)
        return {"args": proc.args, "returncode": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr}
    return produce


@pytest.fixture(scope="session")
def trained(tmp_path_factory, smollm2_dir):
    """(artifact dir, CompletedProcess) of one real `lora-dist train` of the main job."""
    run = once_per_run(tmp_path_factory, "train", _train_cli(str(MAIN_JOB), *[f"--set={o}" for o in TRAIN_OVERRIDES]))
    proc = subprocess.CompletedProcess(**run)
    return Path(proc.stdout.strip().splitlines()[-1]), proc


@pytest.fixture(scope="session")
def chat_trained(tmp_path_factory, smollm2_dir):
    """The artifact of a few real steps of the chat job on SmolLM2 (its ChatML template)."""
    run = once_per_run(tmp_path_factory, "chat-train", _train_cli(
        str(REPO / "jobs" / "smollm2-chat.yaml"), "--set=train.max_steps=6", "--set=train.micro_batch_size=4",
        "--set=train.warmup_steps=1", "--set=train.eval_batches=2"))
    return Path(run["stdout"].strip().splitlines()[-1])


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
