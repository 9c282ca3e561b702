"""The two-node job across two real "hosts" (tests/hosts.py): separate network namespaces with
their own veth addresses, separate mount namespaces for scratch and output directories.

Host A runs the Ray head (2 CPUs, the Jobs API, the job's driver); host B joins it (1 CPU). Jobs
go through ``lora-dist submit --address`` from inside host A, as a user on the cluster would.

* A node that lacks the shared directory: B has an empty directory where the shared storage
  should be, the job declares ``output.shared: true``, and it must fail before training, saying
  the directory is not shared and on which node.
* Node loss for real: B mounts the shared storage; the job runs one worker on each host; once it
  is past its first checkpoint every process of host B is killed. Ray Train (max_failures=1)
  restarts the group on A, which has CPUs for both workers, and resumes from the checkpoint.

One Ray head serves both; host B is booted once per scenario. The lab's namespaces, mounts and
directories are removed at teardown, and the teardown checks that none is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_dist import store

from conftest import E2E_CSV, REPO
from hosts import Lab

pytestmark = pytest.mark.slow

JOB = str(REPO / "jobs" / "smollm2-e2e.yaml")
NAME = "smollm2-e2e"
# Small and quick on 2 cores: 4 steps of 2 short examples per rank, a checkpoint every 2 steps,
# so a restart has something to resume and something left to train. ZeRO stage auto, decided
# across both hosts (each offers its memory): ZeRO-1 here.
QUICK = ["cluster.workers=2", "cluster.zero_stage=auto", "cluster.placement=spread", "output.shared=true",
         "train.max_steps=4", "train.micro_batch_size=2", "data.max_length=48", "train.eval_batches=1",
         "train.lr=2e-3", "train.warmup_steps=1", "train.checkpoint_every=2", "train.log_every=1",
         f"data.path={E2E_CSV}"]


@pytest.fixture(scope="module")
def lab(smollm2_dir):
    """Two hosts and a Ray head on host A (host B is booted by each test as it needs it)."""
    t0 = time.time()
    lab = Lab()  # cleans up after itself if it cannot be made
    try:
        lab.a.start(mount_shared=True)
        lab.start_head(cpus=2)
        print(f"host A and its Ray head up in {time.time() - t0:.1f} s")
        yield lab
    finally:
        left = lab.close()
    assert left == [], f"the lab left behind: {left}"


def boot_b(lab: Lab, mount_shared: bool) -> dict[str, str]:
    """(Re)boot host B with or without the shared storage and join it; {ip: node id} of A and B."""
    t0 = time.time()
    if lab.b.anchor is not None:
        lab.b.stop()
        lab.wait_for_nodes({lab.a.ip})
    lab.b.start(mount_shared=mount_shared)
    lab.join(lab.b, cpus=1)
    nodes = lab.wait_for_nodes({lab.a.ip, lab.b.ip})
    print(f"host B {'with' if mount_shared else 'without'} the shared storage joined in {time.time() - t0:.1f} s")
    return nodes


def submit(lab: Lab, job_id: str, *extra: str) -> list[str]:
    """`lora-dist submit --wait` of the quick 2-worker job from inside host A (a command line)."""
    return lab.a.cmd(sys.executable, "-m", "lora_dist.cli", "submit", JOB, "--address", lab.dashboard, "--wait",
                     "--job-id", job_id, f"--set=output.dir={lab.mount}/runs",
                     *[f"--set={o}" for o in QUICK + list(extra)])


def steps_done(metrics: Path) -> list[int]:
    """The training steps a metrics.jsonl records so far (a line being written is skipped)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def test_node_without_the_shared_directory_fails_before_training(lab):
    nodes = boot_b(lab, mount_shared=False)
    job_id = "unshared"
    t0 = time.time()
    proc = subprocess.run(submit(lab, job_id, "cluster.max_failures=0"), capture_output=True, text=True,
                          env=lab.ray_env(), timeout=600)
    took = time.time() - t0
    out = proc.stdout + proc.stderr
    print(f"a job with a node lacking output.dir failed after {took:.1f} s")
    assert proc.returncode != 0, out[-5000:]
    assert "is not shared" in out, out[-5000:]
    # names the node that lacks it: its address, hostname or Ray node id
    assert any(n in out for n in (lab.b.ip, lab.b.name, nodes[lab.b.ip])), out[-5000:]
    # before training: no step ran, nothing was checkpointed or published
    assert "step 1/" not in out, out[-5000:]
    runs = lab.shared / "runs"
    assert steps_done(runs / f".{NAME}-{job_id}.work" / store.METRICS_FILE) == []
    assert not (runs / ".checkpoints" / f"{NAME}-{job_id}").exists()
    assert not (runs / f"{NAME}-{job_id}").exists()


def test_losing_a_host_mid_run_resumes_on_the_other(lab):
    nodes = boot_b(lab, mount_shared=True)
    job_id = "nodeloss"
    work = lab.shared / "runs" / f".{NAME}-{job_id}.work"
    t0 = time.time()
    proc = subprocess.Popen(submit(lab, job_id, "cluster.max_failures=1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lab.ray_env())
    placed = None
    try:
        deadline = time.time() + 900
        while time.time() < deadline and max(steps_done(work / store.METRICS_FILE), default=0) < 3:
            assert proc.poll() is None, proc.communicate()[0][-5000:]  # past the step-2 checkpoint
            time.sleep(0.5)
        assert max(steps_done(work / store.METRICS_FILE), default=0) >= 3, "the job never reached step 3"
        # the first run: one worker on each host, found by the network namespace of its process
        pids = {rank: int((work / f"rank{rank}.pid").read_text()) for rank in (0, 1)}
        on_a, on_b = set(lab.a.pids()), set(lab.b.pids())
        placed = {rank: "A" if pid in on_a else "B" if pid in on_b else "?" for rank, pid in pids.items()}
        lab.b.stop()
        killed_at = max(steps_done(work / store.METRICS_FILE))  # the last step that can have finished
        print(f"host B killed at step {killed_at}, {time.time() - t0:.1f} s after submit")
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    print(f"submit to verified artifact across a lost host: {time.time() - t0:.1f} s")
    assert sorted(placed.values()) == ["A", "B"], (placed, pids)
    assert proc.returncode == 0, stdout[-5000:] + stderr[-5000:]
    artifact = lab.a.to_outside(stdout.strip().splitlines()[-1])
    manifest = store.verify_artifact(artifact)
    assert manifest.world_size == 2
    assert manifest.zero_stage == 1 and manifest.zero_stage_reason.startswith("auto: "), manifest
    resumed = manifest.resumed_from_step
    assert resumed in (2, 4) and resumed <= killed_at, (resumed, killed_at)
    assert f"resumed from the checkpoint of step {resumed}" in stdout
    # the restarted group ran where it could: both workers on host A
    assert manifest.nodes == [nodes[lab.a.ip]] * 2, (manifest.nodes, nodes)
    # the first attempt, as its checkpoint recorded it: one worker on each host
    first = manifest.node_history[0]
    assert len(first) == 2 and set(first) == {nodes[lab.a.ip], nodes[lab.b.ip]}, (manifest.node_history, nodes)
    assert manifest.node_history[-1] == manifest.nodes
    history = [json.loads(x) for x in (artifact / store.METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in history if "loss" in m] == list(range(1, 5))  # each step once
