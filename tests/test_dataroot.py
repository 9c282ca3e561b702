"""What a job may read as data (issue 31, item 3): never /proc, /sys, /dev or a non-regular file;
on a cluster only under its data root or from a storage URI; and an error never quotes a file's
content beyond a header that parsed as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lora_dist.datafiles import DataFile
from lora_dist.sources import DataError, read_examples
from lora_dist.spec import DataSpec, SpecError, load_spec

from conftest import REPO

SECRET = "hf_s3cr3tVALUEnotToBeSeen"


def _spec(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: a\ndata: {{{data}}}\noutput: {{dir: {tmp_path / 'runs'}}}\n")
    return path


def test_train_on_proc_self_environ_exits_2_without_the_environment(tmp_path):
    """The issue's probe: `lora-dist train` with data.path /proc/self/environ exited 2 with the
    process environment (every secret) in the message."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "LORA_DIST_SIGNING_KEY": SECRET}
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", "train", str(_spec(tmp_path, "path: /proc/self/environ"))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert SECRET not in proc.stdout + proc.stderr
    assert "is under /proc: a system file or device is never read as training data" in proc.stderr


@pytest.mark.parametrize("path", ["/proc/self/environ", "/sys/kernel/hostname", "/dev/zero", "file:///proc/self/environ"])
def test_system_files_are_refused_by_the_spec_everywhere(tmp_path, path):
    with pytest.raises(SpecError, match="a system file or device is never read as training data"):
        load_spec(_spec(tmp_path, f"path: '{path}'"))
    (tmp_path / "link.csv").symlink_to(path.removeprefix("file://"))  # through a link too
    with pytest.raises(SpecError, match="is under /"):
        load_spec(_spec(tmp_path, f"val_path: {tmp_path / 'link.csv'}"))


def test_a_file_swapped_for_a_fifo_or_a_system_link_after_the_spec_is_refused_when_read(tmp_path):
    """Read time checks again: opening a FIFO waited forever for a writer."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    f = DataFile(str(data))
    data.unlink()
    os.mkfifo(data)
    with pytest.raises(DataError, match="not a regular file or a directory"):
        list(f.rows())
    data.unlink()
    data.symlink_to("/proc/self/environ")
    with pytest.raises(DataError, match="is under /proc"):
        list(f.rows())


def test_a_job_on_a_cluster_reads_only_under_its_data_root(tmp_path, monkeypatch, capsys):
    from lora_dist import jobrun
    from lora_dist.validate import CHECKS, validate_job

    root, other, outside = tmp_path / "root", tmp_path / "other", tmp_path / "outside"
    for d in (root, other, outside):
        d.mkdir()
        (d / "d.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "link.jsonl").symlink_to(outside / "d.jsonl")
    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(root))
    monkeypatch.delenv("LORA_DIST_DATA_ROOT", raising=False)

    (tmp_path / "j.yaml").write_text("name: a\ndata: {source: jsonl}\n")

    def spec(data: str):
        return load_spec(tmp_path / "j.yaml", [f"data.path={data}", f"output.dir={root / 'runs'}"])

    validate_job(spec(str(root / "d.jsonl")), "cluster")  # the output root, when no data root is set
    validate_job(spec("s3://bucket/d.jsonl"), "cluster")  # a storage URI: its credentials decide
    for bad in (outside / "d.jsonl", root / "link.jsonl", f"file://{root}/%2E%2E/outside/d.jsonl"):
        with pytest.raises(SpecError, match="outside this cluster's data root|must not contain '..'"):
            validate_job(spec(str(bad)), "cluster")
    assert not {"data_root", "output_root"} & {c for w in ("train", "submit") for c in CHECKS[w]}  # the user's own
    monkeypatch.setenv("LORA_DIST_DATA_ROOT", f"{other}{os.pathsep}{outside}")
    validate_job(spec(str(outside / "d.jsonl")), "cluster")
    with pytest.raises(SpecError, match="outside this cluster's data root"):
        validate_job(spec(str(root / "d.jsonl")), "cluster")  # a data root replaces the output root

    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: pytest.fail("a refused job must not run"))
    payload = tmp_path / "job-spec.json"
    payload.write_text(json.dumps({"spec": {"name": "x", "data": {"path": str(root / "d.jsonl")},
                                            "output": {"dir": str(root / "runs")}}, "job_id": "j1"}))
    assert jobrun.main([str(payload)]) == 2
    assert "outside this cluster's data root" in capsys.readouterr().err


@pytest.mark.parametrize("content", [f"HF_TOKEN={SECRET}\nPATH=/bin\n", f"{SECRET}\n", f"{SECRET},x\n"])
def test_an_error_never_quotes_content_that_is_not_a_header(tmp_path, content):
    """A token file or an environment read as a CSV: its first line was quoted as the columns."""
    path = tmp_path / "secret.csv"
    path.write_text(content)
    for source in ("e2e", "jsonl"):
        with pytest.raises(DataError) as e:
            read_examples(DataFile(str(path), default="csv"), DataSpec(source=source, path=str(path)))
        assert SECRET not in str(e.value) and "not quoted" in str(e.value)
    path.write_text("question,answer\nq,a\n")  # a header that parsed as one is still shown, to be mapped
    with pytest.raises(DataError, match=r"its columns: question, answer\); .* \{prompt: question\}"):
        read_examples(DataFile(str(path)), DataSpec(source="jsonl", path=str(path)))
