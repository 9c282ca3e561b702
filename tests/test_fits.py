"""A job that will not fit the memory its workers will have is refused before it starts, with both
figures (fits.py); a worker killed for memory anyway is said so in one line. The refusal on a
cluster whose node memory the test sets is test_jobs.py's (a real `ray start --head --memory`)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lora_dist.fits import Need, Node, device_problem, killed_for_memory, placement_problem, room

from conftest import E2E_CSV, REPO

GB = 10**9


def test_a_node_holds_the_workers_its_memory_holds_and_a_job_over_it_is_refused_with_both_figures():
    need = Need(bytes=5 * GB, stage=3, workers=2)
    assert room(Node("a", 12 * GB), need) == 2 and room(Node("a", 9 * GB), need) == 1
    assert placement_problem(need, [Node("this machine", 10 * GB)], "this machine") is None
    # each worker alone would fit; two sharing the machine do not
    problem = placement_problem(need, [Node("this machine", 9 * GB)], "this machine")
    assert problem.startswith("cluster.workers: this job will not fit: the plan needs 5.0 GB per worker (ZeRO-3")
    assert "this machine has 9.0 GB available for its 2 workers, 4.5 GB each" in problem
    # over several nodes: each holds what its own memory does
    four = Need(bytes=5 * GB, stage=3, workers=4, auto=True)
    nodes = [Node("n1", 11 * GB), Node("n2", 6 * GB)]
    assert placement_problem(Need(5 * GB, 3, 3), nodes, "the cluster") is None
    problem = placement_problem(four, nodes, "the cluster")
    assert "the least cluster.zero_stage auto can need" in problem
    assert "the nodes of the cluster hold 3 of its 4 workers (n1: 11.0 GB, room for 2, n2: 6.0 GB, room for 1)" \
        in problem


def test_a_gpu_job_over_its_smallest_gpus_free_memory_fails_with_both_figures():
    """GPU workers check their plan themselves (a Ray node does not advertise GPU memory): against
    the least free memory among their devices, before the model is built."""
    assert device_problem(36 * GB, 3, 40 * GB, "cuda:0") is None
    problem = device_problem(36 * GB, 3, 30 * GB, "cuda:0", auto=True)
    assert problem.startswith("cluster.gpus_per_worker: this job will not fit: the plan needs 36.0 GB per worker "
                              "(ZeRO-3, the least cluster.zero_stage auto can need")
    assert "the worker with the least has 30.0 GB free on its cuda:0" in problem and "more workers" in problem
    assert "auto" not in device_problem(36 * GB, 2, 30 * GB, "cuda:0")


def test_a_worker_killed_by_rays_memory_monitor_is_said_so_in_one_line_with_what_it_held():
    """Ray's message as its raylet writes it (the memory monitor's format strings), raised through
    Ray's own exception type and wrapped as Ray Train wraps a worker's death."""
    from ray.exceptions import OutOfMemoryError

    message = ("Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.7, ID: "
               "3f2a) was 22.51GB used / 23.47GB limit (0.959).\nTop 10 memory users:\nPID\tMEM(GB)\tCOMMAND\n"
               "4127\t9.49\tray::RayTrainWorker.run_train_fn\n4133\t8.87\tray::RayTrainWorker.run_train_fn\n"
               "311\t0.41\t/usr/bin/python3 -m ray.dashboard\n")
    try:
        try:
            raise OutOfMemoryError(message)
        except OutOfMemoryError as e:
            raise RuntimeError("Training failed due to worker errors") from e
    except RuntimeError as wrapped:
        line = killed_for_memory(wrapped)
    assert line == ("a worker was killed for memory by Ray's memory monitor (its largest worker held 9.49 GB; the node "
                    "22.51 GB used of 23.47 GB)")
    assert killed_for_memory(RuntimeError("loss is nan at step 3")) is None


def test_an_embedded_job_planned_over_this_machines_memory_is_refused_at_submit_with_exit_2(tmp_path, tiny_llama_dir):
    """Micro-batches of 65,536 rows of 131,072 tokens plan more memory than any machine has: `submit`
    exits 2 with the plan's figure and this machine's before Ray starts, and nothing is written."""
    env = {**os.environ, "LORA_DIST_CACHE": str(tmp_path / "cache"), "LORA_DIST_OUTPUT_ROOT": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", "submit", str(REPO / "jobs" / "smollm2-e2e.yaml"),
                           f"--set=model.base={tiny_llama_dir}", f"--set=data.path={E2E_CSV}",
                           f"--set=output.dir={tmp_path / 'runs'}", "--set=train.micro_batch_size=65536",
                           "--set=data.max_length=131072"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "cluster.workers: this job will not fit: the plan needs" in proc.stderr
    assert "per worker (ZeRO-3; `lora-dist plan`); this machine has" in proc.stderr
    assert "Traceback" not in proc.stderr and "Started a local Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage", ["3", "auto"])
def test_the_plan_a_job_is_checked_against_is_lora_dist_plans(stage, tiny_llama_dir):
    """The figure `submit` compares is the one `lora-dist plan` prints for the job's workers."""
    import json

    from lora_dist.fits import job_need
    from lora_dist.spec import load_spec

    sets = [f"model.base={tiny_llama_dir}", "cluster.workers=2", f"cluster.zero_stage={stage}"]
    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", sets)
    need = job_need(spec)
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", "plan", str(REPO / "jobs" / "smollm2-e2e.yaml"),
                           "--json", "--device=cpu", *[f"--set={s}" for s in sets]], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert need.bytes == json.loads(proc.stdout)["per_worker_bytes"] and need.stage == 3
    assert need.auto == (stage == "auto") and need.workers == 2
