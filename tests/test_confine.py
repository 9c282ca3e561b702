"""Where a job may write (lora_dist.confine), and what fetch and verify may read (store): the
place a location really names, percent-decoded and symlinks resolved, confined to its root; only
an artifact's listed regular files, never through a link."""

import json
import os
import stat
import threading
from pathlib import Path

import pytest

from lora_dist.errors import ArtifactError, JobError
from lora_dist.spec import SpecError, load_spec
from lora_dist.store import ADAPTER_FILE, CONFIG_FILE, FORMAT, MANIFEST_FILE, fetch, publish, sha256_file, \
    verify_artifact

ESCAPES = ("%2E%2E", "%2e%2E", "%252E%252E", ".%2E", "%2E.")


def _artifact(root: Path, name: str = "job-1") -> Path:
    art = root / name
    art.mkdir(parents=True)
    (art / ADAPTER_FILE).write_bytes(b"\x00" * 64)
    (art / CONFIG_FILE).write_text('{"r": 8}')
    files = {n: sha256_file(art / n) for n in (ADAPTER_FILE, CONFIG_FILE)}
    (art / MANIFEST_FILE).write_text(json.dumps({"format": FORMAT, "files": files}))
    return art


def _spec(tmp_path: Path, output_dir: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(f"name: a\noutput: {{dir: '{output_dir}'}}\n")
    return path


@pytest.mark.parametrize("dots", ESCAPES)
def test_a_percent_encoded_dotdot_in_output_dir_is_refused_by_the_spec(tmp_path, dots):
    """The issue's file:///r/%2E%2E/escaped (pyarrow decodes it to /r/../escaped), in every
    spelling that decodes to '..' once or twice, and on any scheme."""
    for uri in (f"file://{tmp_path}/r/{dots}/escaped", f"s3://bucket/runs/{dots}/x"):
        with pytest.raises(SpecError, match="must not contain '..'"):
            load_spec(_spec(tmp_path, uri))


def test_a_file_uri_naming_a_host_is_refused_by_the_spec(tmp_path):
    with pytest.raises(SpecError, match="must not name a host .'etc'.: .* as file:///etc/cron.d"):
        load_spec(_spec(tmp_path, "file://etc/cron.d"))
    load_spec(_spec(tmp_path, f"file://{tmp_path}/runs"))  # file:///abs: no host


def test_the_cluster_side_refuses_an_escape_before_running(tmp_path, monkeypatch, capsys):
    """jobrun, sent the issue's output.dir in a JSON payload (what submit --address sends), exits 2
    before anything runs; a symlink inside the root pointing out is refused the same way."""
    from lora_dist import jobrun
    from lora_dist.store import output_root_problem

    root = tmp_path / "r"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(root))
    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: pytest.fail("a refused job must not run"))
    payload = tmp_path / "job-spec.json"
    for out in (f"file://{root}/%2E%2E/escaped", f"file://{root}/%252E%252E/escaped", f"file://{root}/link/x",
                str(root / "link" / "x")):
        payload.write_text(json.dumps({"spec": {"name": "x", "output": {"dir": out}}, "job_id": "j1"}))
        assert jobrun.main([str(payload)]) == 2, out
        assert "must not contain '..'" in (err := capsys.readouterr().err) or "outside the output root" in err, err
    assert output_root_problem(f"file://{root}/runs%2Fdeep") is None  # %2F is a '/': still under the root
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "outside").exists()


def test_writers_and_deleters_confine_what_pyarrow_will_use(tmp_path):
    """At write time, whatever the spec let through: publish to an encoded '..', a checkpoint
    under a directory swapped for a symlink after the job's root was taken, and the deletion of
    checkpoints through such a link are refused, and nothing is written or removed outside."""
    from lora_dist import checkpoint as ckpt
    from lora_dist.records import CheckpointState
    from lora_dist.store import job_root, remove_tree

    out, outside = tmp_path / "r" / "out", tmp_path / "outside"
    out.mkdir(parents=True)
    outside.mkdir()
    (outside / "keep").write_text("x")
    root = job_root(str(out))
    art = _artifact(tmp_path / "local")
    with pytest.raises(JobError, match="must not contain '..'"):
        publish(art, f"file://{out}/%2E%2E/%2E%2E/escaped", within=root)
    assert not (tmp_path / "escaped").exists()
    assert publish(art, out.as_uri(), within=root) == f"{out.as_uri()}/job-1"  # inside: written

    (out / ".checkpoints").symlink_to(outside, target_is_directory=True)  # planted after the root was taken
    state = CheckpointState(step=1, loss=1.0, next_index=1, world_size=1, scalars={}, rng=[], spec={"name": "a"},
                            spec_digest="x")
    with pytest.raises(JobError, match="is outside"):
        ckpt.write(ckpt.checkpoints_dir(str(out), "a", "j1"), 1, {}, state, "", within=root)
    with pytest.raises(JobError, match="is outside"):
        ckpt.remove_all(ckpt.checkpoints_dir(out.as_uri(), "a", "j1"), within=root)
    with pytest.raises(JobError, match="is outside"):
        remove_tree(str(out / ".checkpoints"), within=root)
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]


def test_fetch_never_reads_through_a_planted_symlink_to_dev_zero(tmp_path):
    """The issue's probe: a listed file replaced by a symlink to /dev/zero made fetch write
    497 MB in 1.5 s; now it is refused before a byte is read, and verify refuses it too."""
    art = _artifact(tmp_path / "src")
    (art / ADAPTER_FILE).unlink()
    (art / ADAPTER_FILE).symlink_to("/dev/zero")
    for source in (str(art), art.as_uri()):
        with pytest.raises(ArtifactError, match="a symlink is never followed"):
            fetch(source, tmp_path / "copy")
        assert not (tmp_path / "copy").exists() and not list(tmp_path.glob(".copy*"))
    with pytest.raises(ArtifactError, match="a symlink is never followed"):
        verify_artifact(art)


def test_a_link_to_the_right_bytes_is_refused_too(tmp_path):
    """Never through a link, even one whose target has the listed sha256."""
    art = _artifact(tmp_path / "src")
    (tmp_path / "elsewhere").write_bytes((art / CONFIG_FILE).read_bytes())
    (art / CONFIG_FILE).unlink()
    (art / CONFIG_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match="adapter_config.json: cannot be opened as a plain file"):
        fetch(str(art), tmp_path / "copy")


def test_a_fifo_gives_a_clean_error_without_waiting_for_a_writer(tmp_path):
    """fetch gave a traceback (shutil.Error) and verify waited forever on the open."""
    from lora_dist.cli import main

    art = _artifact(tmp_path / "src")
    (art / CONFIG_FILE).unlink()
    os.mkfifo(art / CONFIG_FILE)
    with pytest.raises(ArtifactError, match="adapter_config.json: not a regular file"):
        fetch(str(art), tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    assert main(["verify", str(art)]) == 1


def test_fetch_refuses_an_unlisted_file_and_copies_only_listed_ones(tmp_path):
    art = _artifact(tmp_path / "src")
    os.mkfifo(art / "extra")  # unlisted, and a FIFO: named, never opened
    with pytest.raises(ArtifactError, match=r"\['extra'\] not listed in the manifest"):
        fetch(str(art), tmp_path / "copy")
    (art / "extra").unlink()
    assert sorted(p.name for p in fetch(str(art), tmp_path / "copy").iterdir()) == \
        sorted([ADAPTER_FILE, CONFIG_FILE, MANIFEST_FILE])


def test_two_fetches_to_the_same_out_both_succeed(tmp_path):
    """They shared one .partial name: the second reported 'changed since published', exit 1."""
    art = _artifact(tmp_path / "src")
    (art / ADAPTER_FILE).write_bytes(os.urandom(8 << 20))  # long enough for the copies to overlap
    files = json.loads((art / MANIFEST_FILE).read_text())
    files["files"][ADAPTER_FILE] = sha256_file(art / ADAPTER_FILE)
    (art / MANIFEST_FILE).write_text(json.dumps(files))
    errors, start = [], threading.Barrier(4)

    def one() -> None:
        start.wait()
        try:
            fetch(str(art), tmp_path / "out")
        except Exception as e:  # noqa: BLE001 - every failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    verify_artifact(tmp_path / "out")
    assert not list(tmp_path.glob(".out*"))


def test_a_uri_job_stages_in_a_private_directory(tmp_path, monkeypatch):
    """Not in a fixed /tmp/lora-dist-work/<run> another local user can make first."""
    import tempfile

    from lora_dist.store import make_work_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    work = make_work_dir("s3://bucket/runs", "a", "j1")
    assert work.parent == tmp_path / f"lora-dist-work-{os.getuid()}"
    assert stat.S_IMODE(work.stat().st_mode) == 0o700 and stat.S_IMODE(work.parent.stat().st_mode) == 0o700
    (tmp_path / "planted").mkdir()
    work.rmdir()
    work.symlink_to(tmp_path / "planted")  # made first by someone else
    with pytest.raises(JobError, match="not a directory of this user's"):
        make_work_dir("s3://bucket/runs", "a", "j1")
    work.unlink()
    work.mkdir(mode=0o777)
    os.chmod(work, 0o777)
    with pytest.raises(JobError, match="mode 0700"):
        make_work_dir("s3://bucket/runs", "a", "j1")


def test_a_failed_checkpoint_write_leaves_no_temporary_directory(tmp_path):
    """A torn upload is removed; a killed writer's temporary directory goes at the next write."""
    from lora_dist import checkpoint as ckpt
    from lora_dist.records import CheckpointState
    from lora_dist.store import list_dir

    state = CheckpointState(step=1, loss=1.0, next_index=1, world_size=1, scalars={}, rng=[], spec={"name": "a"},
                            spec_digest="x")
    uri_root = ckpt.checkpoints_dir((tmp_path / "bucket").as_uri(), "a", "j1")
    step = tmp_path / "bucket" / ".checkpoints" / "a-j1" / "step-00000001"
    (step / ckpt.METRICS).mkdir(parents=True)  # the upload fails on its third file
    with pytest.raises(OSError):
        ckpt.write(uri_root, 1, {}, state, "")
    assert not step.exists()

    local_root = ckpt.checkpoints_dir(str(tmp_path / "out"), "a", "j1")
    (Path(local_root) / ".step-00000001.4242-0a0b0c0d.partial").mkdir(parents=True)  # a killed writer's
    ckpt.write(local_root, 2, {}, state, "")
    assert list_dir(local_root) == ["step-00000002"]
