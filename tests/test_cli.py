"""The command line: arguments, what each command prints, and its exit code (0 ok, 1 failed,
2 bad input, 3 not found or unreachable). The commands are a thin layer over the SDK
(test_sdk.py); the job service itself is test_jobs.py's."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import store

from conftest import E2E_CSV, REPO, run_cli
from test_jobs import JOB, free_port


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run_cli(*args, check=False, **kwargs)


def _cli_with_retry_budget(seconds: float, *args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    """The CLI in a fresh process whose retry budget is shortened to ``seconds``."""
    code = ("import sys; from lora_dist import jobs; jobs.RETRY_BUDGET_S = %r; from lora_dist.cli import main; "
            "sys.exit(main(%r))" % (seconds, list(args)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_cluster_not_ready_is_retried_then_reported(tmp_path):
    """Nothing listens at the address: each refused connection is retried with a line on stderr
    until the (shortened) budget is spent, then exit 3 naming the address."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    t0 = time.time()
    proc = _cli_with_retry_budget(3, "status", "some-job", "--address", f"http://127.0.0.1:{port}", env=env,
                                  cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.count("cluster not ready (Failed to connect to Ray at address") >= 2, proc.stderr
    assert re.search(r"retrying in \d+ s", proc.stderr)
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in proc.stderr
    assert "still failing after 3 s of retries" in proc.stderr and time.time() - t0 >= 3


def test_multi_node_storage_is_refused_before_submitting(tmp_path, tiny_llama_dir):
    """`submit --address`: two workers and a plain local output.dir are refused (exit 2, naming the
    field) before the cluster is contacted; declared shared, the same spec goes on to submit."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["submit", JOB, "--address", f"http://127.0.0.1:{free_port()}", f"--set=model.base={tiny_llama_dir}",
              f"--set=data.path={E2E_CSV}", f"--set=output.dir={tmp_path / 'runs'}", "--set=cluster.workers=2"]
    refused = _cli_with_retry_budget(1, *common, env=env, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "output.dir" in refused.stderr and "output.shared: true" in refused.stderr
    assert "cluster not ready" not in refused.stderr  # nothing was contacted
    shared = _cli_with_retry_budget(1, *common, "--set=output.shared=true", env=env, cwd=tmp_path)
    assert shared.returncode == 3 and "cannot reach the Ray Jobs API" in shared.stderr, shared.stderr


def test_fetch_checks_the_manifest_digest_the_job_recorded(tmp_path, monkeypatch, tiny_trained):
    """An embedded job's record carries its manifest's digest: status shows it, and fetch refuses
    an artifact whose manifest was replaced since (every file it lists still matching it)."""
    from lora_dist import registry

    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "cache"))
    art = tmp_path / "runs" / "demo-j2"
    shutil.copytree(tiny_trained[0], art)
    digest = store.manifest_digest(art)
    registry.record("demo-j2", state="SUCCEEDED", pid=os.getpid(), name="demo", job="j2", output_dir=str(art.parent),
                max_steps=4, artifact=str(art), manifest_digest=digest)
    env = {**os.environ, "LORA_DIST_CACHE": str(tmp_path / "cache")}
    st = _cli("status", "demo-j2", cwd=tmp_path, env=env)
    assert st.returncode == 0 and st.stdout.strip().endswith(f"artifact {art}  manifest {digest}"), st.stdout
    ok = _cli("fetch", "demo-j2", "--out", str(tmp_path / "ok"), cwd=tmp_path, env=env)
    assert ok.returncode == 0 and (tmp_path / "ok" / store.MANIFEST_FILE).is_file(), ok.stderr
    manifest = json.loads((art / store.MANIFEST_FILE).read_text())
    (art / store.MANIFEST_FILE).write_text(json.dumps({**manifest, "final_loss": 0.001}))
    store.verify_artifact(art)  # every listed file still matches: only the recorded digest tells
    bad = _cli("fetch", "demo-j2", "--out", str(tmp_path / "bad"), cwd=tmp_path, env=env)
    assert bad.returncode == 1 and digest in bad.stderr and "changed" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_verify_says_whether_the_manifest_is_signed(tmp_path, monkeypatch, capsys):
    """A signed artifact without the key is 'signed; set ... to check', not 'unsigned'."""
    from lora_dist.cli import main
    from test_records import ARTIFACT, SIGNING_KEY

    monkeypatch.delenv(store.SIGNING_KEY_ENV, raising=False)
    unsigned = tmp_path / "unsigned"
    shutil.copytree(ARTIFACT, unsigned)
    raw = json.loads((unsigned / store.MANIFEST_FILE).read_text())
    (unsigned / store.MANIFEST_FILE).write_text(json.dumps({k: v for k, v in raw.items() if k != "signature"}))
    assert main(["verify", str(ARTIFACT)]) == 0 and main(["verify", str(unsigned)]) == 0
    monkeypatch.setenv(store.SIGNING_KEY_ENV, SIGNING_KEY)
    assert main(["verify", str(ARTIFACT)]) == 0
    said = [line.rsplit("(", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert said == [f"signed; set {store.SIGNING_KEY_ENV} to check)", "unsigned)", "signature checked)"], said


def test_job_queries_answer_without_importing_torch_or_ray(tmp_path):
    """`list`, `status` and `verify` are instant: no torch, no ray at import."""
    code = ("import sys; from lora_dist.cli import main; rc_list = main(['list']); "
            "rc_status = main(['status', 'no-such-job']); rc_verify = main(['verify', 'no-such-dir']); "
            "print(rc_list, rc_status, rc_verify, "
            "sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LORA_DIST_CACHE": str(tmp_path)}, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "0 3 1 []", out.stdout + out.stderr


@pytest.mark.slow
def test_bad_input_table_is_refused_before_submission(smollm2_dir):
    """Every bad input of the table (at least 30) through `submit --address <unreachable>`: each
    exits 2 with a message naming its field, at most bad_inputs.MAX_MESSAGE characters long."""
    sys.path.insert(0, str(REPO / "bench"))
    from bad_inputs import CASES, ENV_CASES

    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bad_inputs.py"), "--check"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(CASES) >= 30 and f"{len(CASES) + len(ENV_CASES)} passed, 0 failed" in proc.stdout
