"""A base named by its hub id (``model.base: ORG/NAME``, ``model.revision``), resolved by
huggingface_hub from a cache laid out as huggingface_hub lays it out
(``models--ORG--NAME/{blobs, snapshots/<commit>, refs/main}``), offline: nothing is downloaded
here. The commands run as a user runs them, in a process of their own with ``HF_HOME`` and
``HF_HUB_OFFLINE=1`` in its environment (huggingface_hub reads both when it is imported).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import E2E_CSV, MAIN_JOB, REPO, TINY_OVERRIDES, run_cli
from lora_dist.hub import commit_of, hub_ref, split_ref
from lora_dist.runtime_env import runtime_env_problems
from lora_dist.spec import SpecError, load_spec
from lora_dist.specid import spec_digest

REPO_ID = "tiny-org/tiny-llama"
C1, C2 = "c1" * 20, "c2" * 20
TOKEN = "hf_marker_never_written_4f1c9a"  # HF_TOKEN in every command's environment


def lay_out(hf_home: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str | None = "main",
            listing: list[str] | None = None) -> Path:
    """Put ``files`` into the hub cache under ``hf_home`` as huggingface_hub does: each file's bytes
    once in ``blobs/``, the snapshot a directory of relative symlinks to them, ``refs/<ref>``
    holding the commit (no newline), and optionally the repository's file listing of that commit
    (``trees/<commit>.json``, written by huggingface_hub's own writer, as a download leaves it)."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    if listing is not None:
        from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

        write_tree_cache(str(repo), commit, {n: TreeCacheEntry(size=1, blob_id="0" * 40, lfs_sha256=None,
                                                              lfs_size=None, xet_hash=None) for n in listing})
    return snap


def files_of(d: Path, only: tuple[str, ...] | None = None) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.is_file() and (only is None or f.name in only)}


def env_for(hf_home: Path, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN,
            "LORA_DIST_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_TELEMETRY": "1"}


# --- the spec and the reference ------------------------------------------------------------------

def test_a_hub_id_and_its_revision_are_spec_fields(tmp_path, tiny_llama_dir):
    spec = load_spec(MAIN_JOB, [f"model.base={REPO_ID}", "model.revision=v1.0"])
    assert (spec.model.base, spec.model.revision, hub_ref(spec.model)) == (REPO_ID, "v1.0", f"{REPO_ID}@v1.0")
    assert split_ref(hub_ref(spec.model)) == (REPO_ID, "v1.0")
    default = load_spec(MAIN_JOB, [f"model.base={REPO_ID}"])
    assert hub_ref(default.model) == REPO_ID and split_ref(REPO_ID) == (REPO_ID, "main")
    # the default revision is not written: a spec without it digests as before the field existed
    plain = load_spec(MAIN_JOB)
    assert "revision" not in plain.to_dict()["model"]
    assert spec_digest(plain.to_dict()) == spec_digest({**plain.to_dict(), "model": {
        k: v for k, v in plain.to_dict()["model"].items() if k != "revision"}})
    assert spec.to_dict()["model"]["revision"] == "v1.0"
    # a local directory and the built-in id are no hub ids
    assert split_ref(str(tiny_llama_dir)) is None and split_ref("smollm2-135m") is None
    for bad, says in ((["model.revision=v1"], "model.revision: 'v1' applies to a hub id (ORG/NAME) only"),
                      ([f"model.base={REPO_ID}", "model.revision=../x"], "model.revision: must be a branch, tag"),
                      (["model.base=/no/such/dir"], "a hub id (ORG/NAME) nor an existing directory")):
        with pytest.raises(SpecError) as e:
            load_spec(MAIN_JOB, bad)
        assert says in str(e.value), str(e.value)


def test_a_token_is_refused_in_runtime_env():
    problems = runtime_env_problems({"env_vars": {"HF_TOKEN": "x", "HF_HOME": "/data/hf", "HF_HUB_OFFLINE": "1"}})
    assert len(problems) == 1 and "HF_TOKEN is refused" in problems[0] and "x" not in problems[0].split(": ")[0]


def test_commit_of_names_only_snapshot_directories(tmp_path):
    snap = lay_out(tmp_path, REPO_ID, C1, {"config.json": b"{}"})
    assert commit_of(snap) == C1
    assert commit_of(tmp_path) is None and commit_of(tmp_path / "snapshots" / C1) is None


# --- plan, validation and refusals from the config alone ----------------------------------------------

def test_plan_of_a_hub_id_reads_its_config_alone(tmp_path, tiny_llama_dir):
    """`plan` on a hub id whose cache holds config.json and nothing else (no weights, no
    tokenizer): the same counts as the directory itself, at main and at the commit pinned."""
    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir, ("config.json",)))
    env = env_for(hf_home, tmp_path)
    local = json.loads(run_cli("plan", str(MAIN_JOB), f"--set=model.base={tiny_llama_dir}", "--json",
                               cwd=REPO, env=env).stdout)
    for more in ([], [f"--set=model.revision={C1}"]):
        proc = run_cli("plan", str(MAIN_JOB), f"--set=model.base={REPO_ID}", "--json", *more, cwd=REPO, env=env)
        assert json.loads(proc.stdout) == local
    snap = hf_home / "hub" / "models--tiny-org--tiny-llama" / "snapshots" / C1
    assert sorted(p.name for p in snap.iterdir()) == ["config.json"]  # nothing else was fetched


@pytest.mark.parametrize("base, revision, says", [
    ("nobody/nothing", None, "model.base: nobody/nothing (model.revision main): config.json is not in the Hugging Face "
                             "cache and the hub cannot be reached (HF_HUB_OFFLINE is set"),
    (REPO_ID, "v9", f"model.base: {REPO_ID} (model.revision v9): config.json is not in the Hugging Face cache"),
])
def test_a_repository_not_cached_offline_exits_2_naming_it(tmp_path, tiny_llama_dir, base, revision, says):
    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir))
    args = [f"--set=model.base={base}", f"--set=data.path={E2E_CSV}", f"--set=output.dir={tmp_path / 'runs'}"]
    if revision:
        args.append(f"--set=model.revision={revision}")
    for command in ("train", "plan"):
        proc = run_cli(command, str(MAIN_JOB), *args, cwd=REPO, env=env_for(hf_home, tmp_path), check=False)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert says in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "unset HF_HUB_OFFLINE" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_repository_with_pickle_weights_only_is_refused(tmp_path, tiny_llama_dir):
    """What a download of such a repository leaves: config and tokenizer in the snapshot (the
    pickle file matched no pattern) and the listing that names it. Refused by name, exit 2."""
    hf_home = tmp_path / "hf"
    kept = {n: b for n, b in files_of(tiny_llama_dir).items() if not n.endswith(".safetensors")}
    lay_out(hf_home, REPO_ID, C1, kept, listing=[*kept, "pytorch_model.bin", ".gitattributes"])
    proc = run_cli("train", str(MAIN_JOB), f"--set=model.base={REPO_ID}", f"--set=data.path={E2E_CSV}",
                   f"--set=output.dir={tmp_path / 'runs'}", cwd=REPO, env=env_for(hf_home, tmp_path), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"model.base: {REPO_ID} (revision main, commit {C1}) has only pickle weights (pytorch_model.bin)"
            in proc.stderr), proc.stderr[-3000:]


def test_a_sharded_repository_resolves_to_the_files_its_index_lists(tmp_path, tiny_llama_dir):
    """Shards listed in model.safetensors.index.json are what a snapshot holds and what is read;
    another copy of the weights in the repository (Mistral's consolidated.safetensors, listed but
    matching no pattern, so never downloaded) is not asked for."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    shutil.copy(tiny_llama_dir / "tokenizer.json", sharded)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(sharded), listing=[*files_of(sharded), "consolidated.safetensors"])
    code = (f"from lora_dist.base import resolve_base, weight_files\n"
            f"print(*[f.name for f in weight_files(resolve_base({REPO_ID!r}))])")
    proc = subprocess.run([sys.executable, "-c", code], env=env_for(hf_home, tmp_path), capture_output=True,
                          text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0 and proc.stdout.split() == shards, proc.stderr[-3000:]


def test_the_processes_of_a_node_wait_for_the_one_that_holds_the_download_lock(tmp_path, tiny_llama_dir):
    """While one process holds the repository's lock in the cache (as the one downloading does),
    another that resolves the same hub id waits, and goes on once it is released."""
    import fcntl
    import subprocess
    import sys
    import time

    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir))
    lock_file = hf_home / "hub" / ".locks" / "models--tiny-org--tiny-llama" / "lora-dist-snapshot.lock"
    lock_file.parent.mkdir(parents=True)
    child = ("import time\nfrom huggingface_hub import hf_hub_download, snapshot_download\nfrom lora_dist import hub\n"
             "print('ready', flush=True)\n"
             f"d = hub.snapshot({REPO_ID!r})\nprint(time.time(), d, flush=True)\n")
    with open(lock_file, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = subprocess.Popen([sys.executable, "-c", child], env=env_for(hf_home, tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        time.sleep(5)  # finding a cached snapshot takes well under a second
        released = time.time()
    out, err = proc.communicate(timeout=120)
    done, path = out.split()
    assert proc.returncode == 0 and path.endswith(f"snapshots/{C1}"), err[-2000:]
    assert float(done) >= released


# --- a job on a hub id ----------------------------------------------------------------------------

def _other_weights(tiny_llama_dir: Path, tmp_path: Path) -> dict[str, bytes]:
    """The tiny model's files with different weights: what a later push to main would hold."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tiny_llama_dir / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in tensors.items()}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    return {**files_of(tiny_llama_dir), "model.safetensors": (tmp_path / "w.safetensors").read_bytes()}


def _no_token_anywhere(tmp_path: Path, *outputs: str) -> None:
    """The token is in no file under tmp_path (the artifact, checkpoints, job records and logs,
    the caches) and in no output."""
    needle = TOKEN.encode()
    found = [str(p) for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]
    assert not found and not any(TOKEN in o for o in outputs), found


@pytest.mark.slow
def test_a_job_trains_on_a_hub_id_and_its_adapter_loads_the_commit_it_trained_on(tmp_path, tiny_llama_dir):
    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir))
    env = env_for(hf_home, tmp_path)
    common = [f"--set=model.base={REPO_ID}", f"--set=data.path={E2E_CSV}", "--set=lora.targets=[q_proj,v_proj]",
              *[f"--set={o}" for o in TINY_OVERRIDES], "--set=train.max_steps=1"]
    proc = run_cli("train", str(MAIN_JOB), *common, f"--set=output.dir={tmp_path / 'runs'}", cwd=REPO, env=env)
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    manifest = json.loads((artifact / "manifest.json").read_text())
    base = manifest["base_model"]
    assert (base["id"], base["revision"], base["commit"]) == (REPO_ID, "main", C1), base
    assert json.loads((artifact / "adapter_config.json").read_text())["base_model_name_or_path"] == REPO_ID

    # main moves on to other weights: the adapter still loads (and fingerprints) the commit it trained on
    repo = hf_home / "hub" / "models--tiny-org--tiny-llama"
    shutil.rmtree(repo)
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir), ref=None)
    lay_out(hf_home, REPO_ID, C2, _other_weights(tiny_llama_dir, tmp_path))
    gen = run_cli("generate", str(artifact), "--prompt", "name[Aromi]", "--max-new-tokens", "2", cwd=REPO, env=env)

    # a revision pinned to a commit trains on that commit, wherever main points
    pinned = run_cli("train", str(MAIN_JOB), *common, f"--set=model.revision={C1}",
                     f"--set=output.dir={tmp_path / 'pinned'}", cwd=REPO, env=env)
    m2 = json.loads((Path(pinned.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())["base_model"]
    assert (m2["revision"], m2["commit"], m2["fingerprint"]) == (C1, C1, base["fingerprint"])
    # and main, now at C2, is other weights: another fingerprint
    head = run_cli("train", str(MAIN_JOB), *common, f"--set=output.dir={tmp_path / 'head'}", cwd=REPO, env=env)
    m3 = json.loads((Path(head.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())["base_model"]
    assert m3["commit"] == C2 and m3["fingerprint"] != base["fingerprint"]
    _no_token_anywhere(tmp_path, *(p.stdout + p.stderr for p in (proc, gen, pinned, head)))


@pytest.mark.slow
def test_a_submitted_job_on_a_hub_id_resolves_it_on_its_workers(tmp_path, tiny_llama_dir):
    """Through Ray (the embedded default): the workers get HF_HOME and HF_HUB_OFFLINE from the
    environment the job was submitted from, resolve the hub id, and record its commit; the token
    reaches no record, log or artifact."""
    hf_home = tmp_path / "hf"
    lay_out(hf_home, REPO_ID, C1, files_of(tiny_llama_dir))
    proc = run_cli("submit", str(MAIN_JOB), f"--set=model.base={REPO_ID}", f"--set=data.path={E2E_CSV}",
                   "--set=lora.targets=[q_proj,v_proj]", *[f"--set={o}" for o in TINY_OVERRIDES],
                   "--set=train.max_steps=1", f"--set=output.dir={tmp_path / 'runs'}", cwd=tmp_path,
                   env=env_for(hf_home, tmp_path))
    artifacts = list((tmp_path / "runs").glob("smollm2-e2e-*/manifest.json"))
    assert len(artifacts) == 1, proc.stdout[-3000:]
    base = json.loads(artifacts[0].read_text())["base_model"]
    assert (base["id"], base["commit"]) == (REPO_ID, C1)
    _no_token_anywhere(tmp_path, proc.stdout + proc.stderr)
