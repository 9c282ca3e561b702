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


@pytest.mark.slow
def test_status_reads_the_digest_from_the_log_tail_of_a_real_head(tmp_path, monkeypatch):
    """`status` and `fetch` downloaded the whole job log (12 MB here) for one line at its end;
    the dashboard's log API gives its last lines (12 KB)."""
    import tempfile
    from pathlib import Path

    from lora_dist.jobs import DIGEST_TAIL_LINES, _logged_digest, _Retry, client

    from test_jobs import _start_head, _stop_head, _wait_for_api, free_port

    temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # Ray's unix sockets need a short path
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    port = free_port()
    _start_head(temp / "ray", env, port=free_port(), dashboard_port=port)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the head's token (~/.ray/auth_token), as the CLI sends it
    address = f"http://127.0.0.1:{port}"
    try:
        _wait_for_api(address)
        c, retry = client(address), _Retry(address)
        digest = "sha256:" + "a" * 64
        sid = c.submit_job(entrypoint=f"python -c \"print(('x' * 60 + chr(10)) * 200000 + 'manifest: {digest}')\"")
        deadline = time.time() + 120
        while not c.get_job_status(sid).is_terminal() and time.time() < deadline:
            time.sleep(1)
        node = c.get_job_info(sid).driver_node_id
        tail = c._do_request("GET", f"/api/v0/logs/file?node_id={node}&filename=job-driver-{sid}.log"
                                    f"&lines={DIGEST_TAIL_LINES}&media_type=file&timeout=30")
        assert tail.status_code == 200 and len(tail.text) < 20_000 < 12_000_000 <= len(c.get_job_logs(sid))
        assert _logged_digest(c, retry, sid, node) == digest
        assert _logged_digest(c, retry, sid, None) == digest  # no node: the whole log, as before
    finally:
        assert not _stop_head(temp / "ray")
