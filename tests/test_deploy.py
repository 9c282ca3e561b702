"""deploy/ and jobs/ stay tied to the package: image tag, entrypoint, token auth, loadable specs."""

import re
from pathlib import Path

import yaml

from lora_dist.jobs import ENTRYPOINT
from lora_dist.spec import spec_from_dict

REPO = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
IMAGE = f"lora-dist:{VERSION}"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def _assert_token_env(container: dict) -> None:
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == "lora-dist-ray-token" and ref["key"] == "token"


def _cluster_containers(cluster_spec: dict) -> list[dict]:
    out = _containers(cluster_spec["headGroupSpec"]["template"])
    for group in cluster_spec["workerGroupSpecs"]:
        out += _containers(group["template"])
    return out


def test_every_deploy_yaml_parses():
    files = sorted(REPO.glob("deploy/**/*.yaml"))
    assert len(files) >= 3
    for f in files:
        assert _docs(f), f


def test_kuberay_cluster_uses_the_image_and_token_secret():
    [cluster] = _docs(REPO / "deploy" / "kuberay" / "raycluster.yaml")
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["rayVersion"] == "2.60.0"
    for c in _cluster_containers(cluster["spec"]):
        assert c["image"] == IMAGE
        _assert_token_env(c)


def test_kuberay_job_runs_the_constant_entrypoint_on_a_valid_mounted_spec():
    docs = {d["kind"]: d for d in _docs(REPO / "deploy" / "kuberay" / "rayjob.yaml")}
    job, config = docs["RayJob"], docs["ConfigMap"]
    module, spec_path = job["spec"]["entrypoint"].split()[2:]
    assert ENTRYPOINT.split()[:3] == job["spec"]["entrypoint"].split()[:3] and module == "lora_dist.jobrun"
    assert spec_path == "/config/job.yaml"
    raw = yaml.safe_load(config["data"]["job.yaml"])
    raw["data"]["path"] = None  # the cluster's shared volume is not here; everything else validates
    spec = spec_from_dict(raw)
    assert spec.cluster.gpus_per_worker == 1 and spec.cluster.zero_stage == 3
    mounts = {m["mountPath"] for c in _cluster_containers(job["spec"]["rayClusterSpec"]) for m in c["volumeMounts"]}
    assert "/config" in mounts and "/mnt/shared" in mounts
    for c in _cluster_containers(job["spec"]["rayClusterSpec"]):
        assert c["image"] == IMAGE
        _assert_token_env(c)


def test_cluster_launcher_uses_the_image_and_token_auth():
    [cfg] = _docs(REPO / "deploy" / "cluster-launcher" / "aws.yaml")
    assert cfg["docker"]["image"] == IMAGE
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert all("RAY_AUTH_MODE=token" in c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]
               if c.strip() != "ray stop")


def test_dockerfile_installs_this_package_and_enables_token_auth():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0" in text and "RAY_AUTH_MODE=token" in text
    assert "pip install --no-cache-dir ." in text and 'torch==2.13.0' in text
    assert f"-t {IMAGE}" in text
