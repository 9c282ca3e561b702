from pathlib import Path

import pytest

from lora_dist.spec import SpecError, load_spec, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_every_job_in_jobs_dir_loads():
    jobs = sorted((REPO / "jobs").glob("*.yaml"))
    assert jobs, "jobs/ has no YAML"
    for job in jobs:
        first = job.read_text().splitlines()[0]
        assert first.startswith("# lora-dist "), f"{job.name} must start with the command that runs it"
        # Paths in jobs/ are relative to the repo root, where the README runs them.
        import os
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            spec = load_spec(job)
        finally:
            os.chdir(cwd)
        # the artifact directory is named after the job, and the spec survives the worker boundary
        assert spec.name == job.stem and spec_from_dict(spec.to_dict()) == spec


def test_main_job_is_the_documented_setup():
    import os
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml")
    finally:
        os.chdir(cwd)
    assert spec.model.base == "smollm2-135m" and spec.model.quantization == "int8"
    assert spec.lora.r == 8 and spec.lora.targets == ("all-linear",)


def test_overrides_apply_and_are_validated(tmp_path):
    p = _write(tmp_path, "name: a\n")
    spec = load_spec(p, ["train.max_steps=5", "lora.targets=[q_proj, k_proj]", "train.lr=3e-4"])
    assert spec.train.max_steps == 5 and spec.lora.targets == ("q_proj", "k_proj") and spec.train.lr == 3e-4
    with pytest.raises(SpecError, match=r"train\.max_steps: expected an integer"):
        load_spec(p, ["train.max_steps=five"])
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec(p, ["train.max_steps"])


def test_spec_round_trips_through_a_plain_dict(tmp_path):
    spec = load_spec(_write(tmp_path, "name: a\nlora: {r: 4, targets: all-linear}\ntrain: {lr: 2e-4}\n"))
    assert spec.lora.targets == ("all-linear",) and spec.train.lr == 2e-4  # YAML 1.1 reads 2e-4 as a string
    assert spec_from_dict(spec.to_dict()) == spec
    with pytest.raises(Exception):
        spec.train.lr = 1.0  # frozen: what crosses to the workers is what was validated


BAD = [
    ("name: a\nbogus: 1\n", "bogus: unknown key"),
    ("name: a\nlora: {rank: 4}\n", "lora.rank: unknown key"),
    ("lora: {r: 4}\n", "name: required"),
    ("name: ../etc\n", "name: must be"),
    ("name: a\nlora: {r: 0}\n", "lora.r: must be from 1 to 4096, got 0"),
    ("name: a\nlora: {r: true}\n", "lora.r: expected an integer, got True"),
    ("name: a\nlora: {alpha: .inf}\n", "lora.alpha: must be a finite number"),
    ("name: a\ntrain: {weight_decay: .nan}\n", "train.weight_decay: must be a finite number"),
    ("name: a\ntrain: {parity_check: 'yes'}\n", "train.parity_check: expected true or false"),
    ("name: a\ntrain: {lr: fast}\n", "train.lr: expected a number, got 'fast'"),
    ("name: a\nlora: {r: eight}\n", "lora.r: expected an integer"),
    ("name: a\nlora: {alpha: -1}\n", "lora.alpha: must be > 0"),
    ("name: a\nlora: {dropout: 1.5}\n", "lora.dropout: must be in [0, 1)"),
    ("name: a\nlora: {targets: []}\n", "lora.targets: expected a non-empty list"),
    ("name: a\nlora: {targets: [all-linear, q_proj]}\n", "lora.targets: 'all-linear' stands alone"),
    ("name: a\nmodel: {quantization: int4}\n", "model.quantization: must be 'int8' or 'none'"),
    ("name: a\nmodel: {base: /no/such/dir}\n", "model.base: '/no/such/dir' is neither"),
    ("name: a\ndata: {path: /no/such/file.csv}\n", "data.path: file not found"),
    ("name: a\ndata: {source: parquet}\n", "data.source: must be 'e2e', 'jsonl', 'chat', 'alpaca' or 'text'"),
    ("name: a\ndata: {source: jsonl}\n", "data.path: required for source 'jsonl'"),
    ("name: a\ntrain: {lr: -0.1}\n", "train.lr: must be in (0, 1]"),
    ("name: a\ntrain: {max_steps: 0}\n", "train.max_steps: must be from 1"),
    ("name: a\ntrain: {micro_batch_size: 100000000}\n", "train.micro_batch_size: must be from 1 to 65536"),
    ("name: a\ntrain: {warmup_steps: -1}\n", "train.warmup_steps: must be >= 0"),
    ("name: a\ncluster: {zero_stage: 4}\n", "cluster.zero_stage: must be 'auto', 1, 2 or 3"),
    ("name: a\ndata: {split: row}\n", "data.split: must be 'name' or 'mr'"),
    ("name: a\ncluster: {placement: everywhere}\n", "cluster.placement: must be 'pack' or 'spread'"),
    ("name: a\ncluster: {max_failures: 2}\n", "cluster.max_failures: restarts resume from checkpoints"),
    ("name: a\noutput: {dir: ../../elsewhere}\n", "output.dir: must not contain '..'"),
    ("name: a\ntrain: [1, 2]\n", "train: must be a mapping"),
    ("name: !!python/object/apply:os.system ['echo hi']\n", "YAML tags are not allowed"),
    ("- just\n- a list\n", "the top level must be a mapping"),
    ("name: a\nlora: {r: 4\n", "not valid YAML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_spec_gets_one_clear_message_naming_the_field(tmp_path, text, message):
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, text))
    assert message in str(err.value), str(err.value)


def test_all_problems_are_reported_together(tmp_path):
    with pytest.raises(SpecError) as err:
        load_spec(_write(tmp_path, "name: a\nlora: {r: 0, alpha: 0}\ntrain: {lr: 5}\n"))
    assert len(err.value.problems) == 3


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_module_imports_no_heavy_libraries():
    import subprocess
    import sys
    code = ("import sys\n"
            "for m in ('torch', 'ray', 'deepspeed'): sys.modules[m] = None\n"
            "import lora_dist.spec\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


def test_runtime_env_keys_come_from_an_allow_list(tmp_path):
    spec = load_spec(_write(tmp_path, "name: a\ncluster: {runtime_env: {env_vars: {HF_HOME: /data/hf}}}\n"))
    assert spec.cluster.runtime_env == {"env_vars": {"HF_HOME": "/data/hf"}}
    with pytest.raises(SpecError, match=r"cluster.runtime_env: keys \['working_dir'\] are not allowed"):
        load_spec(_write(tmp_path, "name: a\ncluster: {runtime_env: {working_dir: /etc}}\n"))
    with pytest.raises(SpecError, match="cluster.runtime_env: env_vars must map names to string values"):
        load_spec(_write(tmp_path, "name: a\ncluster: {runtime_env: {env_vars: {X: 1}}}\n"))


def test_cluster_output_root_confines_local_output_dirs(tmp_path, monkeypatch):
    """The check the cluster side (jobrun) applies; the embedded default does not (test_train)."""
    from lora_dist.validate import validate_job

    monkeypatch.chdir(tmp_path)
    validate_job(load_spec(_write(tmp_path, "name: a\noutput: {dir: runs}\n")), "cluster")
    validate_job(load_spec(_write(tmp_path, f"name: a\noutput: {{dir: {tmp_path}/deep/runs}}\n")), "cluster")
    validate_job(load_spec(_write(tmp_path, "name: a\noutput: {dir: 's3://bucket/runs'}\n")), "cluster")
    with pytest.raises(SpecError, match="output.dir: /etc/runs is outside the output root"):
        validate_job(load_spec(_write(tmp_path, "name: a\noutput: {dir: /etc/runs}\n")), "cluster")
    # a file:// URI is a local path: confined the same way, whatever its spelling
    validate_job(load_spec(_write(tmp_path, f"name: a\noutput: {{dir: 'file://{tmp_path}/runs'}}\n")), "cluster")
    for uri in ("file:///etc/cron.d", "file://etc/cron.d", "FILE:///etc/cron.d", f"file://{tmp_path}/../../etc"):
        with pytest.raises(SpecError, match="is outside the output root|must not contain '..'|must not name a host"):
            validate_job(load_spec(_write(tmp_path, f"name: a\noutput: {{dir: '{uri}'}}\n")), "cluster")
    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", "/etc")
    validate_job(load_spec(_write(tmp_path, "name: a\noutput: {dir: /etc/runs}\n")), "cluster")
    with pytest.raises(SpecError, match="URI scheme 'ftp' is not supported"):
        load_spec(_write(tmp_path, "name: a\noutput: {dir: 'ftp://host/runs'}\n"))


def test_runtime_env_allows_plain_names_and_requirements_only():
    from lora_dist.runtime_env import redacted, runtime_env_problems

    assert runtime_env_problems({"env_vars": {"WANDB_PROJECT": "x", "NCCL_DEBUG": "INFO"},
                                 "pip": ["sentencepiece==0.2.0", "tiktoken>=0.7,<1", "peft[dev]"]}) == []
    refused = runtime_env_problems({"env_vars": {"LD_PRELOAD": "x", "PYTHONHOME": "x", "RAY_ADDRESS": "x",
                                                 "LORA_DIST_CACHE": "x", "HOME": "/"},
                                    "pip": ["-e .", "x @ https://e/x.whl", "/abs/path", "git+https://e/x"]})
    assert len(refused) == 9, refused
    spec = {"name": "x", "cluster": {"runtime_env": {"env_vars": {"TOKEN": "secret"}, "pip": ["a==1"]}}}
    assert redacted(spec)["cluster"]["runtime_env"] == {"env_vars": {"TOKEN": "<redacted>"}, "pip": ["a==1"]}
    assert spec["cluster"]["runtime_env"]["env_vars"] == {"TOKEN": "secret"}  # the original is untouched
