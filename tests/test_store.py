"""Where artifacts live: URI or path, ids, verify, publish and fetch (file:// through pyarrow)."""

import json
import shutil
from pathlib import Path

import pytest

from lora_dist.errors import ArtifactError, JobError
from lora_dist.store import (ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE, artifact_location, check_job_id, fetch,
                             is_uri, publish, read_text, verify_artifact, work_dir)


def test_uri_or_path_is_decided_in_one_place():
    assert is_uri("s3://bucket/runs") and is_uri("file:///tmp/x") and is_uri("hdfs://nn:8020/x")
    assert not is_uri("runs") and not is_uri("/abs/runs") and not is_uri("C:/x") and not is_uri("./s3:/x")
    assert artifact_location("s3://b/runs/", "job", "1") == "s3://b/runs/job-1"
    assert artifact_location("/out", "job", "1") == "/out/job-1"
    assert work_dir("/out", "job", "1") == Path("/out/.job-1.work")
    assert not str(work_dir("s3://b/runs", "job", "1")).startswith("s3:")  # node-local for URIs


@pytest.mark.parametrize("bad", ["../../x", "a/b", "", ".hidden", "x" * 200, "a..b"])
def test_job_ids_that_could_escape_a_directory_are_refused(bad):
    with pytest.raises(JobError, match="is not a job id"):
        check_job_id(bad)


def _artifact(root: Path) -> Path:
    """A well-formed artifact built by hand (the format, not the training, is under test)."""
    from lora_dist.store import FORMAT, sha256_file

    art = root / "job-1"
    art.mkdir(parents=True)
    (art / ADAPTER_FILE).write_bytes(b"\x00" * 64)
    (art / CONFIG_FILE).write_text('{"r": 8}')
    files = {n: sha256_file(art / n) for n in (ADAPTER_FILE, CONFIG_FILE)}
    (art / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": files, "steps": 3, "final_loss": 1.5}))
    return art


def test_verify_names_the_modified_or_missing_file(tmp_path):
    art = _artifact(tmp_path)
    assert verify_artifact(art)["steps"] == 3
    (art / CONFIG_FILE).write_text('{"r": 9}')
    with pytest.raises(ArtifactError, match="adapter_config.json: sha256 mismatch"):
        verify_artifact(art)
    (art / CONFIG_FILE).unlink()
    with pytest.raises(ArtifactError, match="adapter_config.json: missing"):
        verify_artifact(art)
    (art / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        verify_artifact(art)


def test_publish_to_a_uri_then_fetch_verifies_and_never_overwrites(tmp_path):
    art = _artifact(tmp_path / "local")
    uri = (tmp_path / "bucket").as_uri()  # file:// through pyarrow, as s3:// or gs:// would go
    location = publish(art, uri)
    assert location == f"{uri}/job-1"
    assert json.loads(read_text(f"{location}/{MANIFEST_FILE}"))["steps"] == 3
    with pytest.raises(JobError, match="already exists"):
        publish(art, uri)
    out = fetch(location, tmp_path / "fetched")
    assert verify_artifact(out)["files"] == verify_artifact(art)["files"]
    with pytest.raises(JobError, match="already exists"):
        fetch(location, tmp_path / "fetched")


def test_fetch_of_a_tampered_artifact_leaves_nothing(tmp_path):
    art = _artifact(tmp_path / "src")
    (art / ADAPTER_FILE).write_bytes(b"\x01" * 64)
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        fetch(str(art), tmp_path / "copy")
    assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".copy*"))
    shutil.rmtree(art.parent)
    with pytest.raises(JobError, match="not a complete artifact"):
        fetch(str(art), tmp_path / "copy")


def test_read_text_of_an_unreachable_location_is_none(tmp_path):
    assert read_text(str(tmp_path / "nope.json")) is None
    assert read_text((tmp_path / "nope.json").as_uri()) is None
