"""The only ray.train importer: a JobSpec -> TorchTrainer over N workers -> the artifact.

With no address, an embedded local Ray is started (and stopped); with an address, the driver
joins that cluster (the Jobs API entrypoint, jobrun.py, runs this same driver on the cluster).
Workers run ``worker.run_worker`` and reach Ray Train only through :class:`RayTrainIO`.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lora_dist.errors import JobFailed
from lora_dist.jobs import WORKER_ENV
from lora_dist.plan import fmt_bytes
from lora_dist.runtime_env import redacted
from lora_dist.spec import JobSpec, SpecError
from lora_dist.store import MANIFEST_FILE, artifact_location, check_job_id, is_uri, job_root, join, make_work_dir, \
    new_job_id, parse_manifest, read_text, run_name, write_storage_probe


def run_job(spec: JobSpec, job_id: str | None = None, address: str | None = None,
            stream=sys.stdout, cluster_root: str | None = None) -> Path | str:
    """Run ``spec`` on Ray Train + DeepSpeed and return the artifact (a directory, or a URI).

    Args:
        spec: the validated job spec.
        job_id: reuse an id to resume that job's checkpoints (Ray Train resumes by run name).
        address: a Ray cluster address; None starts an embedded local Ray; "auto" joins the
            cluster this driver runs on (a Jobs API job).
        cluster_root: the cluster's output root (jobrun): every file of the job goes under it,
            checked by each writer as it writes (store.job_root, store.confine).

    Raises:
        JobFailed: the job failed; no artifact directory was published.
    """
    import ray

    spec = spec.with_absolute_paths()
    job_id = check_job_id(job_id) if job_id is not None else new_job_id()  # it names directories
    run = run_name(spec.name, job_id)
    published = published_or_resumable(spec, job_id, stream)
    if published is not None:
        return published
    root = job_root(spec.output.dir, cluster_root)  # JobError: outside the cluster's output root
    work = make_work_dir(spec.output.dir, spec.name, job_id, root)
    parity_reference = _parity_reference(spec, stream) if spec.train.parity_check else None

    started_here = False
    embedded = address is None and not ray.is_initialized()
    cpus = resolve_cpus_per_worker(spec, embedded=True) if embedded else None
    memory = _memory_per_worker(spec)
    if not ray.is_initialized():
        if address is None:
            # address="local": always a Ray of its own, never one that another job or user
            # started on this machine (plain ray.init() joins that one if it finds it). The dashboard
            # stays: it serves the State API, without which Ray Train's placement-group cleaner cannot
            # see its controller, warns every second and never cleans up after a crash.
            ray.init(address="local", num_cpus=embedded_cpus(spec, cpus, stream), log_to_driver=True,
                     _memory=embedded_memory(spec, memory), runtime_env={"env_vars": dict(WORKER_ENV)})
            started_here = True
        elif address == "auto":  # inside a Jobs API job: its runtime_env already carries WORKER_ENV
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": dict(WORKER_ENV)})
    try:
        if cpus is None:
            cpus = resolve_cpus_per_worker(spec, embedded=False)
        if spec.cluster.cpus_per_worker == "auto":
            print(f"cluster.cpus_per_worker auto: {cpus} CPU{'s' if cpus > 1 else ''} (and torch threads) per worker",
                  file=stream, flush=True)
        config = {"spec": spec.to_dict(), "job_id": job_id, "work_dir": str(work), "job_root": root,
                  "cpus_per_worker": cpus, "memory_per_worker": memory,
                  "parity_reference": parity_reference,
                  "storage_probe": None if is_uri(spec.output.dir) else write_storage_probe(work)}
        t0 = time.time()
        try:
            result = _trainer(spec, run, config).fit()
        except Exception as e:  # Ray wraps the worker's exception; keep its message for the user
            from lora_dist.fits import killed_for_memory

            oom = killed_for_memory(e)
            if oom:
                planned = f"; the plan gave {fmt_bytes(memory)} per worker" if memory else ""
                raise JobFailed(f"job {run} failed: {oom}{planned}") from e
            raise JobFailed(f"job {run} failed: {_root_message(e)}") from e
        location = (result.metrics or {}).get("artifact")
        if not location:
            raise JobFailed(f"job {run} finished without publishing an artifact")
        print(f"job {run} finished in {time.time() - t0:.0f} s", file=stream, flush=True)
        shutil.rmtree(work, ignore_errors=True)
        return location if is_uri(location) else Path(location)
    finally:
        if started_here:
            ray.shutdown()


def published_or_resumable(spec: JobSpec, job_id: str, stream) -> Path | str | None:
    """Before anything starts: the artifact if this job id already published one from the same
    spec (a resubmit is idempotent); None when the job is to run, from its newest checkpoint if
    it has one.

    Raises:
        SpecError: the artifact or checkpoint of this job id was made by a spec that trains
            something else (every differing field named); nothing is started.
    """
    from lora_dist.checkpoint import SpecChanged, check_same_spec, checkpoints_dir, latest_state

    mine = redacted(spec.to_dict())
    location = artifact_location(spec.output.dir, spec.name, job_id)
    try:
        text = read_text(join(location, MANIFEST_FILE))
        if text is not None:
            check_same_spec(parse_manifest(text, location).spec or {}, mine, f"the artifact {location}")
            print(f"job {run_name(spec.name, job_id)} already published {location} from this spec; nothing to run",
                  file=stream, flush=True)
            return location if is_uri(location) else Path(location)
        state = latest_state(checkpoints_dir(spec.output.dir, spec.name, job_id))
        if state is not None:
            check_same_spec(state.spec, mine, f"the checkpoint of step {state.step}")
            print(f"job {run_name(spec.name, job_id)} resumes from its checkpoint of step {state.step}",
                  file=stream, flush=True)
    except SpecChanged as e:
        raise SpecError([str(e)]) from None
    return None


def recorded_spec(spec: JobSpec, job_id: str) -> dict[str, Any] | None:
    """The spec recorded under ``spec.output.dir`` for this job id: by its artifact's manifest, else
    by its newest checkpoint; None where neither is there (what a refused resubmit's message names
    the differing fields of: ``jobs.check_binding``)."""
    from lora_dist.checkpoint import checkpoints_dir, latest_state

    location = artifact_location(spec.output.dir, spec.name, job_id)
    text = read_text(join(location, MANIFEST_FILE))
    if text is not None:
        return parse_manifest(text, location).spec or None
    state = latest_state(checkpoints_dir(spec.output.dir, spec.name, job_id))
    return state.spec if state is not None else None


def _parity_reference(spec: JobSpec, stream) -> list[float]:
    from lora_dist.train import reference_losses

    steps = min(spec.train.parity_steps, spec.train.max_steps or spec.train.parity_steps)  # epochs: capped there
    print(f"parity check: unsharded int8 reference for {steps} steps on the batches of "
          f"{spec.cluster.workers} workers", file=stream, flush=True)
    reference = reference_losses(spec, spec.cluster.workers, steps)
    print("parity reference losses: " + " ".join(f"{v:.6f}" for v in reference), file=stream, flush=True)
    return reference


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota
    (a container's ``cpu.max``) where one is set."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def embedded_cpus_per_worker(spec: JobSpec, cores: int) -> int:
    """``cluster.cpus_per_worker`` on the embedded Ray: the figure, or for ``auto`` this machine's
    ``cores`` shared by the job's workers (at least one each)."""
    c = spec.cluster
    return c.cpus_per_worker if c.cpus_per_worker != "auto" else max(1, cores // c.workers)


def cluster_cpus_per_worker(node_cpus: list[float], workers: int, available: float | None = None) -> int:
    """``cluster.cpus_per_worker: auto`` on a cluster whose nodes offer ``node_cpus`` (each node's
    CPU resource): the workers spread over the largest nodes, as many nodes as there are workers
    or nodes; each worker gets the smallest of those nodes' CPUs over the workers placed on it.
    Every worker then fits, packed or spread. No more than the cluster's ``available`` CPUs (what
    other jobs and Serve replicas leave) shared by the workers, so that the job never waits for
    CPUs that are taken."""
    largest = sorted((c for c in node_cpus if c >= 1), reverse=True)[:workers]
    if not largest:
        return 1
    per_node = -(-workers // len(largest))
    per_worker = int(largest[-1] // per_node)
    if available is not None:
        per_worker = min(per_worker, int(available // workers))
    return max(1, per_worker)


def resolve_cpus_per_worker(spec: JobSpec, embedded: bool) -> int:
    """The CPUs each worker reserves and runs torch threads on (``cluster.cpus_per_worker``,
    ``auto`` resolved: on the embedded Ray from this machine's cores, else from the cluster's
    nodes, which needs ``ray.init`` first)."""
    if spec.cluster.cpus_per_worker != "auto":
        return spec.cluster.cpus_per_worker
    if embedded:
        return embedded_cpus_per_worker(spec, usable_cores())
    import ray

    gpus = spec.cluster.gpus_per_worker
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    return cluster_cpus_per_worker([r.get("CPU", 0.0) for r in nodes if r.get("GPU", 0.0) >= gpus],
                                   spec.cluster.workers, ray.available_resources().get("CPU", 0.0))


def embedded_cpus(spec: JobSpec, cpus_per_worker: int, stream) -> int:
    """CPUs the embedded Ray offers: this machine's, or what the job's workers ask for if that is
    more (they then share the cores; without this the job would wait forever for CPUs that a
    single machine does not have)."""
    cores = usable_cores()
    wanted = spec.cluster.workers * cpus_per_worker
    if wanted > cores:
        print(f"note: {spec.cluster.workers} workers x {cpus_per_worker} CPU asked for {wanted} CPUs; "
              f"this machine has {cores}, so on the embedded Ray they share them", file=stream, flush=True)
    return max(cores, wanted)


def _memory_per_worker(spec: JobSpec) -> int | None:
    """The bytes each CPU worker reserves as Ray's ``memory`` resource: its plan (fits.job_need),
    so that Ray places no more of a job's workers on a node than its memory holds. None for GPU
    workers, whose plan is GPU memory."""
    if spec.cluster.gpus_per_worker:
        return None
    from lora_dist.fits import job_need

    return job_need(spec).bytes


def embedded_memory(spec: JobSpec, per_worker: int | None) -> int:
    """The embedded Ray's ``memory`` resource: this machine's available memory (Ray's own default
    keeps back the object store's share, which these jobs barely use), and never less than the
    job's workers reserve (the submit check has compared the two)."""
    from lora_dist.device import available_bytes

    return max(available_bytes("cpu"), spec.cluster.workers * (per_worker or 0))


def _trainer(spec: JobSpec, run: str, config: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = spec.cluster
    resources: dict[str, float] = {"CPU": config["cpus_per_worker"]}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    if config.get("memory_per_worker"):
        resources["memory"] = config["memory_per_worker"]
    return TorchTrainer(
        _worker_entry, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=c.workers, use_gpu=c.gpus_per_worker > 0,
                                     resources_per_worker=resources,
                                     placement_strategy="SPREAD" if c.placement == "spread" else "PACK"),
        # Ray Train keeps only the final report here (<output.dir>/.ray-train); the job's resumable
        # checkpoints are its own (checkpoint.py), beside the artifacts.
        run_config=RunConfig(name=run, storage_path=join(spec.output.dir, ".ray-train"),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )


class RayTrainIO:
    """What a worker needs of Ray Train (see ``worker.RayIO``)."""

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def _worker_entry(config: dict[str, Any]) -> None:
    from lora_dist.worker import run_worker

    run_worker(config, RayTrainIO())


def _root_message(e: BaseException) -> str:
    seen = set()
    while True:
        nxt = e.__cause__ or e.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        e = nxt
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
