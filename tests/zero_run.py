"""Run the job's worker code (worker.run_worker: sharded build, per-rank loading, ZeRO-3 training,
export) in N local processes joined by gloo, without Ray, for tests and benchmarks that check
checkpoint layouts and loading rather than orchestration (Ray's part is tested in
test_distributed through the real `lora-dist run`).

Each process joins one torch.distributed group and runs the cases one after another, so the
start-up (imports, the process group, DeepSpeed's CPU op) is paid once for all of them.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "jobs" / "smollm2-e2e.yaml"
E2E_CSV = REPO / "jobs" / "data" / "e2e" / "devset.csv"


class LocalIO:
    """worker.RayIO for processes outside Ray: reports kept in a file."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}) + "\n")

    def node_id(self) -> str:
        return socket.gethostname()


def _rank_main(rank: int, world: int, port: int, jobs: list[dict[str, Any]]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    from lora_dist.worker import run_worker

    for job in jobs:
        Path(job["work_dir"]).mkdir(parents=True, exist_ok=True)
        if job.get("check_partitions"):
            _check_partitions(job, rank, world)
        elif job.get("lose_after"):
            _lose_after(job, LocalIO(Path(job["work_dir"]) / f"reports{rank}.jsonl"))
        elif job.get("stop_after") or job.get("check_restore"):
            _stop_or_check(job, LocalIO(Path(job["work_dir"]) / f"reports{rank}.jsonl"))
        else:
            run_worker(job, LocalIO(Path(job["work_dir"]) / f"reports{rank}.jsonl"))


def _check_partitions(job: dict[str, Any], rank: int, world: int) -> None:
    """Load the job's base as its workers do (each rank its own share), gather every parameter
    and compare it with the single-process load; write what this rank found to
    ``<check_partitions>.<rank>.json``."""
    import deepspeed
    import torch
    from transformers import AutoConfig

    from lora_dist import engine as eng
    from lora_dist.device import worker_placement
    from lora_dist.base import resolve_base, weight_files
    from lora_dist.counting import count_model
    from lora_dist.lora import is_lora_param
    from lora_dist.model import load_model
    from lora_dist.plan import zero_settings
    from lora_dist.spec import spec_from_dict

    spec = spec_from_dict(job["spec"])
    eng.init_distributed(False)
    placement = worker_placement(spec)
    d = resolve_base(spec.model.base)
    zero = zero_settings(count_model(spec.model.base, spec.injected_lora, spec.model.quantization))
    cfg = eng.ds_config(spec, world, placement, zero, 3)
    model, injection = eng.build_sharded(AutoConfig.from_pretrained(d), spec, cfg, placement)
    loaded = eng.stream_weights(model, d, injection, rank, world)
    ref = dict(load_model(spec.model.base, spec.injected_lora, spec.model.quantization,
                          with_tokenizer=False).model.named_parameters())
    worst, compared, dtypes = 0.0, 0, set()
    for name, p in model.named_parameters():
        if is_lora_param(name):
            continue
        with deepspeed.zero.GatheredParameters([p]):
            full = p.data.detach().clone()
        worst = max(worst, float((full.double() - ref[name].double()).abs().max()))
        compared += 1
        dtypes.add(str(full.dtype))
    result = {"rank": rank, "bytes_read": loaded.bytes_read, "fingerprint": loaded.fingerprint,
              "checkpoint_bytes": sum(f.stat().st_size for f in weight_files(d)), "max_abs_diff": worst,
              "compared": compared, "dtypes": sorted(dtypes)}
    Path(f"{job['check_partitions']}.{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


class _Lost(Exception):
    pass


def _lose_after(job: dict[str, Any], io: LocalIO) -> None:
    """``lose_after: k``: run the worker's own loop (validations, early stop, checkpoints on
    schedule) and end every rank right after the checkpoint of step k, as a job whose workers
    were all lost there."""
    from lora_dist import worker as wk
    from lora_dist.tracking import tracked
    from lora_dist.train import run_steps, validate

    w = wk._setup(job, io)
    try:
        with tracked(w.spec, w.job_id, main=w.rank == 0, say=w.say) as tracker:  # as run_worker tracks
            _, runner, _, loop = wk.build_loop(w, tracker=tracker)
            resumed = wk._resume(w, runner.module, loop)
            if resumed is None:
                w.val_before = validate(loop, 0)
            write = loop.checkpoint

            def checkpoint(step: int, loss: float) -> None:
                write(step, loss)
                if step == job["lose_after"]:
                    raise _Lost

            loop.checkpoint = checkpoint
            run_steps(loop, start=(resumed or 0) + 1)
    except _Lost:
        return
    raise AssertionError(f"the run ended before the checkpoint of step {job['lose_after']}")


def _stop_or_check(job: dict[str, Any], io: LocalIO) -> None:
    """Two ways to look at checkpoints through the worker's own code:

    ``stop_after: k``: train steps 1..k, write the step-k checkpoint as the loop does, and stop,
    as a job whose workers were all lost right after that checkpoint.
    ``check_restore: path``: restore the job's newest checkpoint into a fresh engine at this
    world size, gather the state again, and write to ``<path>.<rank>.json`` the largest
    difference from the checkpoint's tensors (rank 0) and the restored scalars.
    """
    import torch

    from lora_dist import checkpoint as ckpt
    from lora_dist import engine as eng
    from lora_dist import worker as wk
    from lora_dist.lora import trainable_parameters
    from lora_dist.train import train_step, validate

    w = wk._setup(job, io)
    _, runner, _, loop = wk.build_loop(w)
    resumed = wk._resume(w, runner.module, loop)
    if job.get("stop_after"):
        if resumed is None:
            w.val_before = validate(loop, 0)
        for step in range((resumed or 0) + 1, job["stop_after"] + 1):
            out = train_step(loop, step)
            loss, lr = out.loss, out.lr
            loop.metrics.step({"step": step, "loss": loss, "lr": lr, "tokens_per_s": 0.0, "step_s": 0.0,
                               "peak_memory_bytes": [0], "int8_partition_bytes": [0]})
        loop.checkpoint(job["stop_after"], loss)
        return
    import deepspeed

    saved = ckpt.load(ckpt.latest(w.checkpoints))
    tensors, scalars = eng.gather_train_state(runner.module, w.rank)
    worst = compute = None
    if w.rank == 0:
        assert set(tensors) == set(saved.tensors), set(tensors) ^ set(saved.tensors)
        worst = max(float((tensors[k] - saved.tensors[k]).abs().max()) for k in tensors)
    # the copy the forward computes with, besides the optimizer's fp32 master
    trainable = list(trainable_parameters(runner.module.module).items())
    with deepspeed.zero.GatheredParameters([p for _, p in trainable]):
        if w.rank == 0:
            compute = max(float((p.detach().float().cpu().reshape(-1) - saved.tensors[f"param/{n}"].reshape(-1))
                                .abs().max()) for n, p in trainable)
    result = {"rank": w.rank, "resumed": resumed, "max_abs_diff": worst, "compute_copy_diff": compute,
              "lr": runner.lr(), "zero_stage": w.stage.stage,
              "optimizer_step": scalars["optimizer_step"], "saved_optimizer_step": saved.state.scalars["optimizer_step"],
              "index_base": loop.index_base, "saved_next_index": saved.state.next_index}
    Path(f"{job['check_restore']}.{w.rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()


def job_config(name: str, model_dir: Path, targets: tuple[str, ...], out: Path, world: int,
               steps: int = 2, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    from lora_dist.spec import load_spec
    from lora_dist.store import work_dir

    spec = load_spec(MAIN_JOB, [
        f"name={name}", f"model.base={model_dir}", f"lora.targets=[{','.join(targets)}]", "lora.r=4",
        f"data.path={E2E_CSV}", f"output.dir={out}", f"train.max_steps={steps}", "train.micro_batch_size=2",
        "train.warmup_steps=1", "train.eval_batches=1", "train.log_every=1", "data.max_length=48",
        f"cluster.workers={world}", "cluster.cpus_per_worker=1", *extra])
    return {"spec": spec.to_dict(), "job_id": name, "work_dir": str(work_dir(str(out), name, name))}


def run_ranks(jobs: list[dict[str, Any]], world: int, timeout: float = 900) -> list[str]:
    """Run every job in ``world`` fresh processes (a clean interpreter each, as Ray starts them).

    Returns:
        Each rank's output.

    Raises:
        RuntimeError: a rank failed (with the end of its output).
    """
    import subprocess
    import sys
    import tempfile

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="lora-dist-zero-run-") as tmp:
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        logs = [Path(tmp) / f"rank{r}.log" for r in range(world)]
        procs = []
        for r in range(world):
            with open(logs[r], "w") as log:
                procs.append(subprocess.Popen([sys.executable, __file__, str(jobs_file), str(r), str(world), str(port)],
                                              stdout=log, stderr=subprocess.STDOUT))
        try:
            codes = [p.wait(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                p.kill()
        out = [log.read_text() for log in logs]
    failed = [r for r, c in enumerate(codes) if c != 0]
    if failed:
        raise RuntimeError(f"rank {failed[0]} exited {codes[failed[0]]}:\n{out[failed[0]][-6000:]}")
    return out


def train_adapters(cases: dict[str, tuple[Path, tuple[str, ...]]], out: Path, world: int = 2,
                   steps: int = 2) -> dict[str, Path]:
    """A ``steps``-step LoRA run of each case (name -> (model dir, targets)) at ``world`` ranks
    under ZeRO-3; returns name -> artifact directory."""
    # a high learning rate: two steps move the adapter far enough to show in the logits
    jobs = [job_config(name, d, targets, out, world, steps, extra=("train.lr=0.05",))
            for name, (d, targets) in cases.items()]
    run_ranks(jobs, world)
    from lora_dist.store import artifact_location

    return {name: Path(artifact_location(str(out), name, name)) for name in cases}


if __name__ == "__main__":
    import sys

    _rank_main(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), json.loads(Path(sys.argv[1]).read_text()))
