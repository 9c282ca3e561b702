"""Waits and reads with a bound (issue 31, item 11): the tokenization lock gives up with a message
naming its file, and `logs` streams a local log instead of reading it whole."""

from __future__ import annotations

import fcntl
import os
import time

import pytest

from lora_dist.errors import JobError

from conftest import E2E_CSV


def test_the_tokenization_lock_gives_up_naming_its_file(tiny_llama_dir, tmp_path, monkeypatch):
    """It waited forever for a process that held the lock."""
    from transformers import AutoTokenizer

    from lora_dist.data import tokenized
    from lora_dist.spec import DataSpec

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    spec = DataSpec(path=str(E2E_CSV), max_length=32)
    assert tokenized(spec, tok, tmp_path).cache == "miss"
    [lock] = (tmp_path / "tokenized").glob("*.lock")
    monkeypatch.setenv("LORA_DIST_LOCK_TIMEOUT", "1")
    with open(lock, "w") as held:  # another open file description: as another process holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(JobError, match=f"waited 1 s for the tokenization lock {lock}"):
            tokenized(spec, tok, tmp_path)
        assert time.monotonic() - t0 < 30
    assert tokenized(spec, tok, tmp_path).cache == "hit"  # released: it is taken at once


def test_logs_streams_a_local_log_in_bounded_chunks(tmp_path, monkeypatch):
    """It read the whole log at once."""
    from lora_dist import registry
    from lora_dist.embedded import LOG_CHUNK, EmbeddedJobs

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    log = tmp_path / "job.log"
    text = "".join(f"step {i}  loss 1.0\n" for i in range(200_000))  # ~3.7 MB
    log.write_text(text)
    registry.record("demo-j1", state="SUCCEEDED", pid=os.getpid(), name="demo", job="j1",
                    output_dir=str(tmp_path / "runs"), log=str(log))
    chunks = list(EmbeddedJobs().logs("demo-j1", follow=False))
    assert "".join(chunks) == text and len(chunks) > 1 and max(map(len, chunks)) <= LOG_CHUNK
