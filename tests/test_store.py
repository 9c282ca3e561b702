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
    assert verify_artifact(art).steps == 3
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
    assert verify_artifact(out).files == verify_artifact(art).files
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


def test_an_unlisted_file_fails_verify_and_fetch(tmp_path):
    """A planted file (a pickle beside the adapter) is not part of the artifact: verify refuses
    it, and fetch copies nothing."""
    art = _artifact(tmp_path / "src")
    (art / "adapter_model.bin").write_bytes(b"\x80\x04planted")
    with pytest.raises(ArtifactError, match=r"\['adapter_model.bin'\] not listed in the manifest"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match="not listed"):
        fetch(str(art), tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


def test_a_rewritten_manifest_fails_against_its_recorded_digest_and_signature(tmp_path, monkeypatch):
    """Replacing a file and rewriting its sha256 in the manifest passes the manifest's own check;
    the digest recorded before, and the HMAC signature, catch it."""
    from lora_dist.store import FORMAT, SIGNING_KEY_ENV, manifest_digest, manifest_signature, sha256_file

    art = _artifact(tmp_path)
    manifest = json.loads((art / MANIFEST_FILE).read_text())
    manifest["signature"] = manifest_signature(manifest, b"k1")
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    recorded = manifest_digest(art)
    monkeypatch.setenv(SIGNING_KEY_ENV, "k1")
    assert verify_artifact(art, digest=recorded).format == FORMAT
    (art / ADAPTER_FILE).write_bytes(b"\x01" * 64)  # the attack: a new adapter, its sha256 rewritten
    manifest["files"][ADAPTER_FILE] = sha256_file(art / ADAPTER_FILE)
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="the signature does not match"):
        verify_artifact(art)
    with pytest.raises(ArtifactError, match=f"expected {recorded}"):
        verify_artifact(art, digest=recorded)
    monkeypatch.setenv(SIGNING_KEY_ENV, "k2")
    manifest["signature"] = manifest_signature(manifest, b"k1")  # re-signed without the real key
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="the signature does not match"):
        verify_artifact(art)
    del manifest["signature"]
    (art / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="not signed"):
        verify_artifact(art)
    monkeypatch.delenv(SIGNING_KEY_ENV)
    assert verify_artifact(art)  # no key, no digest: only the files against the manifest


def test_a_directory_written_aside_appears_whole_or_not_at_all(tmp_path):
    from lora_dist.store import atomic_dir

    final = tmp_path / "out" / "d"
    with atomic_dir(final) as d:
        assert d.parent == final.parent and d.name.startswith(".d.") and not final.exists()
        (d / "a").write_text("1")
    assert (final / "a").read_text() == "1" and [p.name for p in final.parent.iterdir()] == ["d"]
    with pytest.raises(RuntimeError):
        with atomic_dir(final, replace=True) as d:
            (d / "b").write_text("2")
            raise RuntimeError("the writer fails")
    assert [p.name for p in final.iterdir()] == ["a"] and [p.name for p in final.parent.iterdir()] == ["d"]
    with pytest.raises(OSError):  # an existing one is replaced only when asked
        with atomic_dir(final) as d:
            (d / "b").write_text("2")
    with atomic_dir(final, replace=True) as d:
        (d / "b").write_text("2")
    assert [p.name for p in final.iterdir()] == ["b"] and [p.name for p in final.parent.iterdir()] == ["d"]


def test_a_file_written_aside_replaces_the_old_one_whole(tmp_path):
    from lora_dist.store import atomic_file

    target = tmp_path / "c" / "f.csv"
    atomic_file(target, b"old")
    atomic_file(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in target.parent.iterdir()] == ["f.csv"]


@pytest.mark.parametrize("as_uri", [False, True])
def test_one_filesystem_layer_for_paths_and_uris(tmp_path, as_uri):
    from lora_dist.store import list_dir, read_bytes, remove_tree, upload

    root = tmp_path.as_uri() if as_uri else str(tmp_path)
    assert list_dir(f"{root}/none") == [] and read_bytes(f"{root}/none/x") is None
    upload({"a": b"1", "b": b"2"}, f"{root}/d/e") if as_uri else (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "f").write_bytes(b"3")
    assert sorted(list_dir(f"{root}/d")) == ["e", "f"] and list_dir(f"{root}/d", dirs_only=True) == ["e"]
    assert read_bytes(f"{root}/d/f") == b"3"
    remove_tree(f"{root}/d")
    remove_tree(f"{root}/d")  # nothing there: nothing to do
    assert list_dir(root) == []


def test_the_cluster_output_root_and_the_cache_root_come_from_the_environment(tmp_path, monkeypatch):
    from lora_dist.store import cache_root, output_root

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LORA_DIST_OUTPUT_ROOT", raising=False)
    assert output_root() == tmp_path.resolve()
    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path / "o"))
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path / "c"))
    assert output_root() == (tmp_path / "o").resolve() and cache_root() == tmp_path / "c"
