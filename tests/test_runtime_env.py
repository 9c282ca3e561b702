"""What a job may set in cluster.runtime_env (issue 31, items 4 and 5): env var names from an
allow-list the cluster may extend, never a secret's; pip only where the cluster allows it; and the
cluster side (jobrun) re-checks the runtime_env Ray actually gives the job, for a client that
skipped these checks: fast, through the spec loader and jobrun's main, and slow, a job submitted
to a real head around lora-dist's client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_dist.spec import SpecError, load_spec

# Each passed the old deny-list rule (issue 31 item 4, tried by hand): code, certificates, proxies,
# endpoints, config files; and a hub mirror or tracking server that would receive the cluster's token.
OUTSIDE = ["NCCL_NET_PLUGIN", "OPENSSL_CONF", "GCONV_PATH", "SSL_CERT_FILE", "HTTPS_PROXY", "AWS_ENDPOINT_URL",
           "AWS_CONFIG_FILE", "HF_ENDPOINT", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_INSECURE_TLS", "NCCL_DEBUG_FILE",
           "NCCL_TUNER_PLUGIN", "TORCH_HOME", "HF_MODULES_CACHE"]
ALLOWED = ["HF_HOME", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
           "MKL_NUM_THREADS", "MLFLOW_EXPERIMENT_NAME", "PYTHONHASHSEED", "NCCL_DEBUG", "NCCL_SOCKET_IFNAME",
           "TRANSFORMERS_VERBOSITY", "WANDB_PROJECT"]
SECRETS = ["HF_TOKEN", "MY_SERVICE_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY",
           "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "DB_Password", "GOOGLE_APPLICATION_CREDENTIALS",
           "HF_TOKEN_PATH"]


def _spec(tmp_path: Path, runtime_env: str):
    path = tmp_path / "job.yaml"
    path.write_text(f"name: a\ncluster: {{runtime_env: {runtime_env}}}\n")
    return load_spec(path)


@pytest.fixture(autouse=True)
def _no_cluster_settings(monkeypatch):
    for name in ("LORA_DIST_ALLOW_ENV", "LORA_DIST_ALLOW_PIP", "RAY_JOB_CONFIG_JSON_ENV_VAR"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("name", OUTSIDE)
def test_an_env_name_off_the_allow_list_is_refused(tmp_path, name):
    with pytest.raises(SpecError, match=rf"cluster.runtime_env: env_vars: {name} is not on the allow-list"):
        _spec(tmp_path, f"{{env_vars: {{{name}: x}}}}")


def test_the_allow_list_lets_a_job_configure_its_libraries(tmp_path):
    env = {name: "1" for name in ALLOWED}
    assert _spec(tmp_path, json.dumps({"env_vars": env})).cluster.runtime_env == {"env_vars": env}


@pytest.mark.parametrize("name", SECRETS)
def test_a_name_that_carries_a_secret_is_refused_pointing_to_the_clusters_environment(tmp_path, monkeypatch, name):
    monkeypatch.setenv("LORA_DIST_ALLOW_ENV", "HF_*,MY_SERVICE_*,AWS_*,WANDB_*,MLFLOW_*,DB_*,GOOGLE_*")  # still refused
    with pytest.raises(SpecError) as e:
        _spec(tmp_path, f"{{env_vars: {{{name}: s3cr3t}}}}")
    assert "names a secret" in str(e.value) and "set it in the cluster's own environment" in str(e.value)
    assert "s3cr3t" not in str(e.value)


def test_the_cluster_extends_the_allow_list_but_never_to_the_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_DIST_ALLOW_ENV", " MY_SERVICE_*, HF_ENDPOINT ,LD_*,PYTHONPATH")
    env = {"MY_SERVICE_URL": "http://svc", "HF_ENDPOINT": "https://mirror", "HF_HOME": "/data/hf"}
    assert _spec(tmp_path, json.dumps({"env_vars": env})).cluster.runtime_env == {"env_vars": env}
    for name in ("LD_PRELOAD", "PYTHONPATH"):
        with pytest.raises(SpecError, match=f"env_vars: {name} is refused: it changes what the worker processes load"):
            _spec(tmp_path, f"{{env_vars: {{{name}: x}}}}")
    monkeypatch.setenv("LORA_DIST_ALLOW_ENV", "MY_SERVICE_*,my service")
    with pytest.raises(SpecError, match=r"LORA_DIST_ALLOW_ENV: 'my service' is not NAME or PREFIX_\*"):
        _spec(tmp_path, "{env_vars: {MY_SERVICE_URL: x}}")


def test_the_cluster_can_turn_pip_off(tmp_path, monkeypatch):
    assert _spec(tmp_path, "{pip: ['sentencepiece==0.2.0']}").cluster.runtime_env == {"pip": ["sentencepiece==0.2.0"]}
    monkeypatch.setenv("LORA_DIST_ALLOW_PIP", "0")
    with pytest.raises(SpecError, match=r"pip is turned off on this cluster \(\$LORA_DIST_ALLOW_PIP=0\)"):
        _spec(tmp_path, "{pip: ['sentencepiece==0.2.0']}")
    assert _spec(tmp_path, "{env_vars: {HF_HOME: /d}}").cluster.runtime_env == {"env_vars": {"HF_HOME": "/d"}}
    monkeypatch.setenv("LORA_DIST_ALLOW_PIP", "perhaps")  # a setting that is neither: refused, not allowed
    with pytest.raises(SpecError, match="LORA_DIST_ALLOW_PIP is 'perhaps' on this cluster, expected 0 or 1"):
        _spec(tmp_path, "{pip: ['sentencepiece==0.2.0']}")


# --- the cluster side: the runtime_env Ray gives the job -----------------------------------------

def _as_ray_gives_it(env_vars: dict | None = None, **more) -> str:
    """$RAY_JOB_CONFIG_JSON_ENV_VAR as Ray 2.60's job supervisor sets it for a job lora-dist's
    client submitted (working_dir uploaded, WORKER_ENV added, pip normalized); the slow test below
    checks this shape against a real head."""
    from lora_dist.jobs import WORKER_ENV

    env = {"working_dir": "gcs://_ray_pkg_0123456789abcdef.zip", "env_vars": {**(env_vars or {}), **WORKER_ENV},
           **more}
    return json.dumps({"runtime_env": env, "metadata": {"lora-dist": "1"}})


def test_jobrun_refuses_a_runtime_env_outside_the_rules_before_running(tmp_path, monkeypatch, capsys):
    """A client that skipped lora-dist's checks (the spec file clean, the runtime_env not): exit 2,
    the job never runs; what lora-dist's own client adds passes."""
    from lora_dist import jobrun

    monkeypatch.setenv("LORA_DIST_OUTPUT_ROOT", str(tmp_path))
    payload = tmp_path / "job-spec.json"
    payload.write_text(json.dumps({"spec": {"name": "x", "output": {"dir": str(tmp_path / "runs")}}, "job_id": "j1"}))
    ran: list[str] = []
    monkeypatch.setattr(jobrun, "run_job", lambda *a, **k: ran.append("ran") or tmp_path / "none")
    refused = {
        "NCCL_NET_PLUGIN": _as_ray_gives_it({"NCCL_NET_PLUGIN": "/tmp/evil.so"}),
        "names a secret": _as_ray_gives_it({"HF_TOKEN": "hf_x"}),
        "keys ['py_modules'] are not allowed": _as_ray_gives_it(py_modules=["gcs://_ray_pkg_x.zip"]),
        "pip: options ['pip_install_options'] are not allowed": _as_ray_gives_it(pip={
            "packages": ["x"], "pip_check": False, "pip_install_options": ["--index-url", "https://evil"]}),
        "is not a plain requirement": _as_ray_gives_it(pip={"packages": ["x @ https://evil/x.whl"], "pip_check": False}),
        # one of lora-dist's own env vars, with another value than lora-dist's client gives it
        "MALLOC_MMAP_THRESHOLD_ is refused": json.dumps({"runtime_env": {"env_vars": {"MALLOC_MMAP_THRESHOLD_": "1"}}}),
        "not a job config Ray wrote": "{not json",
    }
    for expected, config in refused.items():
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", config)
        assert jobrun.main([str(payload)]) == 2, expected
        err = capsys.readouterr().err
        assert "breaks this cluster's rules" in err and expected in err, (expected, err)
        assert "hf_x" not in err
    assert ran == []
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", _as_ray_gives_it(
        {"HF_HOME": "/data/hf"}, pip={"packages": ["sentencepiece==0.2.0"], "pip_check": False}, config=None))
    assert jobrun.main([str(payload)]) == 0 and ran == ["ran"]
    monkeypatch.setenv("LORA_DIST_ALLOW_PIP", "0")  # the cluster's setting decides, whatever the client's was
    assert jobrun.main([str(payload)]) == 2 and "pip is turned off on this cluster" in capsys.readouterr().err
    assert ran == ["ran"]


# Submits through Ray's own client in a fresh interpreter: Ray reads RAY_AUTH_MODE when it is
# imported, and an earlier test of the session may have imported it without.
AROUND_THE_CLIENT = """
import json, sys, time
from lora_dist.jobs import ENTRYPOINT, WORKER_ENV, client, enable_token_auth
enable_token_auth()  # before ray is imported
address, work, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
c = client(address)
sid = c.submit_job(entrypoint=ENTRYPOINT, runtime_env={"working_dir": work, "env_vars": {**extra, **WORKER_ENV}})
deadline = time.time() + 300
while str(c.get_job_status(sid).value) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
    time.sleep(1)
print(json.dumps({"state": str(c.get_job_status(sid).value), "logs": c.get_job_logs(sid)}))
"""


@pytest.mark.slow
def test_a_job_submitted_around_the_client_is_refused_by_the_cluster(tmp_path):
    """Through Ray's own JobSubmissionClient (no lora-dist checks on the way), with lora-dist's
    entrypoint and spec file but NCCL_NET_PLUGIN in the runtime_env: the job FAILS with jobrun's
    message and trains nothing; the same submission without it gets past that check to the next
    one (its output.dir is outside the output root: refused there, so nothing trains either)."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from lora_dist.jobs import SPEC_FILE
    from test_jobs import DASHBOARD_PORT, _start_head, _stop_head, _wait_for_api

    tmp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["LORA_DIST_OUTPUT_ROOT"] = str(tmp_path)
    _start_head(tmp / "ray", env, port=6391, dashboard_port=DASHBOARD_PORT + 2)
    address = f"http://127.0.0.1:{DASHBOARD_PORT + 2}"
    try:
        _wait_for_api(address)
        work = tmp_path / "wd"
        work.mkdir()
        (work / SPEC_FILE).write_text(json.dumps({"spec": {"name": "x", "output": {"dir": "/etc/runs"}},
                                                  "job_id": "j1"}))
        ended = {}
        for case, extra in (("planted", {"NCCL_NET_PLUGIN": "/tmp/evil.so"}), ("clean", {})):
            proc = subprocess.run([sys.executable, "-c", AROUND_THE_CLIENT, address, str(work), json.dumps(extra)],
                                  capture_output=True, text=True, env=env, timeout=400)
            assert proc.returncode == 0, proc.stderr[-3000:]
            ended[case] = json.loads(proc.stdout.strip().splitlines()[-1])
            assert ended[case]["state"] == "FAILED", (case, ended[case])
        planted, clean = ended["planted"]["logs"], ended["clean"]["logs"]
        assert "breaks this cluster's rules" in planted and "NCCL_NET_PLUGIN is not on the allow-list" in planted, planted
        assert "breaks this cluster's rules" not in clean and "is outside the output root" in clean, clean
    finally:
        left = _stop_head(tmp / "ray")
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left
