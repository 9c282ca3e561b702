"""The only ray.train importer: a JobSpec -> TorchTrainer over N workers -> the artifact path.

With no address, an embedded local Ray is started (and stopped); with an address, the driver
joins that cluster (the Jobs API entrypoint runs this same driver on the cluster).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lora_dist.errors import JobFailed  # noqa: F401  (re-exported)
from lora_dist.adapter import new_job_id
from lora_dist.jobrun import WORKER_ENV
from lora_dist.jobs import is_uri
from lora_dist.spec import JobSpec


def run_job(spec: JobSpec, job_id: str | None = None, address: str | None = None,
            stream=sys.stdout, work_dir_hook=None) -> Path | str:
    """Run ``spec`` on Ray Train + DeepSpeed and return the artifact (a directory, or a URI).

    Args:
        spec: the validated job spec.
        job_id: reuse an id to resume that job's checkpoints (Ray Train resumes by run name).
        address: a Ray cluster address; None starts an embedded local Ray.

    Raises:
        JobFailed: the job failed; no artifact directory was published.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = spec.with_absolute_paths()
    job_id = job_id or new_job_id()
    run_name = f"{spec.name}-{job_id}"
    if is_uri(spec.output.dir):
        # Checkpoints go to the storage URI; progress files stay node-local.
        storage_path = spec.output.dir.rstrip("/") + "/.ray-train"
        work_dir = Path(tempfile.gettempdir()) / "lora-dist-work" / run_name
    else:
        storage_path = str(Path(spec.output.dir) / ".ray-train")
        work_dir = Path(spec.output.dir) / f".{run_name}.work"
    work_dir.mkdir(parents=True, exist_ok=True)
    if work_dir_hook:
        work_dir_hook(job_id, work_dir)

    parity_reference = None
    if spec.train.parity_check:
        from lora_dist.train import reference_losses

        steps = min(spec.train.parity_steps, spec.train.max_steps)
        print(f"parity check: unsharded int8 reference for {steps} steps on the batches of "
              f"{spec.cluster.workers} workers", file=stream, flush=True)
        parity_reference = reference_losses(spec, spec.cluster.workers, steps)
        print("parity reference losses: " + " ".join(f"{v:.6f}" for v in parity_reference), file=stream, flush=True)

    started_here = False
    if not ray.is_initialized():
        env = dict(WORKER_ENV)
        if address is None:
            ray.init(log_to_driver=True, runtime_env={"env_vars": env})
            started_here = True
        elif address == "auto":  # inside a Jobs API job: its runtime_env already carries WORKER_ENV
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env})
    try:
        use_gpu = spec.cluster.gpus_per_worker > 0
        resources: dict[str, float] = {"CPU": spec.cluster.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = spec.cluster.gpus_per_worker
        trainer = TorchTrainer(
            _worker_entry,
            train_loop_config={"spec": spec.to_dict(), "job_id": job_id, "work_dir": str(work_dir),
                               "parity_reference": parity_reference},
            scaling_config=ScalingConfig(num_workers=spec.cluster.workers, use_gpu=use_gpu,
                                         resources_per_worker=resources,
                                         placement_strategy="SPREAD" if spec.cluster.placement == "spread" else "PACK"),
            run_config=RunConfig(name=run_name, storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=2)),
        )
        t0 = time.time()
        try:
            result = trainer.fit()
        except Exception as e:  # Ray wraps the worker's exception; keep its message for the user
            raise JobFailed(f"job {run_name} failed: {_root_message(e)}") from e
        location = (result.metrics or {}).get("artifact")
        if not location:
            raise JobFailed(f"job {run_name} finished without publishing an artifact")
        print(f"job {run_name} finished in {time.time() - t0:.0f} s", file=stream, flush=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        return location if is_uri(location) else Path(location)
    finally:
        if started_here:
            ray.shutdown()


def _worker_entry(config: dict[str, Any]) -> None:
    from lora_dist.worker import train_loop_per_worker

    train_loop_per_worker(config)


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
