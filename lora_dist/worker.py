"""One Ray Train worker of a job: DeepSpeed ZeRO over the int8 base, driven by the one training
loop (train.py). Rank logic lives here and in engine.py only.

The spec arrives as a plain dict (the Ray boundary) and is validated back into a JobSpec at once.
Ray itself is reached only through the ``ray_io`` object that launch.py (the only ray.train
importer) hands in:

    ray_io.checkpoint_dir()            context manager: the latest reported checkpoint's directory, or None
    ray_io.report(metrics, directory)  report metrics, with a checkpoint directory (or None)
    ray_io.node_id()                   this worker's Ray node

Every worker computes its own batches from (step, rank) alone, so after a restart it continues
exactly where the last complete checkpoint left off: no batch skipped, none trained twice.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from lora_dist import engine as eng
from lora_dist.device import Placement, worker_placement
from lora_dist.model import LoadedModel, count_model, enable_activation_checkpointing, resolve_base
from lora_dist.plan import zero_settings
from lora_dist.spec import JobSpec, spec_from_dict
from lora_dist.store import METRICS_FILE
from lora_dist.train import Loop, Metrics, export, make_schedule, prepare_data, run_steps, seed_everything, validate

FINAL_FILE = "final.json"


class RayIO(Protocol):
    def checkpoint_dir(self) -> Any: ...

    def report(self, metrics: dict[str, Any], directory: Path | None) -> None: ...

    def node_id(self) -> str: ...


@dataclass
class Worker:
    spec: JobSpec
    job_id: str
    work_dir: Path  # shared by the job's workers on one machine or filesystem
    rank: int
    world: int
    placement: Placement
    ray_io: RayIO
    zero: dict[str, int] = field(default_factory=dict)  # the ZeRO settings the job runs with

    @property
    def device(self) -> torch.device:
        return self.placement.device


def run_worker(config: dict[str, Any], ray_io: RayIO) -> None:
    """The worker's whole life: set up, build, resume, train, export, report."""
    w = _setup(config, ray_io)
    nodes: list[Any] = [None] * w.world
    dist.all_gather_object(nodes, ray_io.node_id())
    built, runner, parts = _build(w)
    loop = Loop(w.spec, runner, prepare_data(w.spec, built.tokenizer), w.device, ranks=[w.rank],
                world_size=w.world, metrics=Metrics(w.work_dir / METRICS_FILE, w.spec, main=w.rank == 0),
                int8_bytes=parts["int8_local_bytes"], gather=lambda stats: _all_gather(stats, w.world),
                checkpoint=lambda step, loss: _checkpoint(w, runner.module, step, loss),
                reference=config.get("parity_reference"))
    with ray_io.checkpoint_dir() as ckpt:
        if ckpt is not None and (ckpt / FINAL_FILE).is_file():  # already published: a retry only reports it
            _report_final(w, json.loads((ckpt / FINAL_FILE).read_text()))
            return
        resumed_from = _resume(w, runner.module, loop, ckpt) if ckpt is not None else None
    val_before = validate(loop, 0) if resumed_from is None else None
    loss, parity_max = run_steps(loop, start=1 if resumed_from is None else resumed_from + 1)
    val_after = validate(loop, w.spec.train.max_steps)
    fields = {"world_size": w.world, "zero_stage": w.spec.cluster.zero_stage, "steps": w.spec.train.max_steps,
              "final_loss": loss, "val_loss_before": val_before, "val_loss_after": val_after,
              "resumed_from_step": resumed_from, "parity_max_loss_diff": parity_max, "nodes": nodes,
              "int8_partition_bytes": parts["int8_local_bytes"], "int8_full_bytes": parts["int8_full_bytes"],
              "precision": w.placement.record(), "zero_settings": w.zero}
    location = export(loop, built, w.job_id, fields, staging=w.work_dir / "staging")
    loop.metrics.say(f"artifact written: {location}")
    dist.barrier()
    _report_final(w, {"step": w.spec.train.max_steps, "loss": loss, "artifact": location})


def _setup(config: dict[str, Any], ray_io: RayIO) -> Worker:
    """Join the process group; pick the device and threads; seed; leave this rank's pid for tests
    and operators that need to find it."""
    # DeepSpeed still calls torch.distributed's *_tensor collectives; torch warns on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    spec = spec_from_dict(config["spec"])
    rank, world = eng.init_distributed(spec.cluster.gpus_per_worker > 0)
    placement = worker_placement(spec)  # the device and compute dtype of everything below
    if not placement.cuda:
        torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))
    seed_everything(spec.train.seed + rank)
    w = Worker(spec, config["job_id"], Path(config["work_dir"]), rank, world, placement, ray_io)
    (w.work_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    return w


def _build(w: Worker) -> tuple[LoadedModel, eng.ZeroRunner, dict[str, int]]:
    """The sharded model: skeleton, partitions, streamed int8 weights, LoRA init, the engine."""
    from transformers import AutoConfig, AutoTokenizer

    spec, t0 = w.spec, time.time()
    model_dir = resolve_base(spec.model.base)
    hf_config = AutoConfig.from_pretrained(model_dir)
    full = spec.train.method == "full"
    counts = count_model(spec.model.base, spec.injected_lora, spec.model.quantization)
    w.zero = zero_settings(counts, "full" if full else "lora_int8_zero3")
    ds_cfg = eng.ds_config(spec, w.world, w.placement, w.zero)
    model, injection = eng.build_sharded(hf_config, spec, ds_cfg, w.placement)
    loaded = eng.stream_weights(model, model_dir, injection, w.rank, w.world)
    eng.init_lora_sharded(model, spec.train.seed, w.rank)
    if spec.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine = eng.initialize(model, ds_cfg, lambda optimizer: make_schedule(optimizer, spec))
    parts = eng.partition_report(model)
    if w.rank == 0:
        print(f"[rank 0/{w.world}] model {spec.model.base} sharded (ZeRO-{spec.cluster.zero_stage}) in "
              f"{time.time() - t0:.1f} s: int8 base {parts['int8_local_bytes']:,} of {parts['int8_full_bytes']:,} "
              f"bytes on this rank; {trainable:,} trainable parameters", flush=True)
    built = LoadedModel(model, AutoTokenizer.from_pretrained(model_dir), model_dir, injection, trainable,
                        loaded.fingerprint)
    return built, eng.ZeroRunner(engine, w.rank), parts


def _resume(w: Worker, engine, loop: Loop, checkpoint: Path) -> int:
    """Restore the checkpoint in ``checkpoint``: LoRA weights, AdamW, schedule, this rank's RNG.

    Returns:
        The step it was taken at.
    """
    state = eng.load_checkpoint(engine, checkpoint)
    step = int(state["step"])
    mine = state["rng"][w.rank]
    torch.random.set_rng_state(mine["torch"])
    random.setstate(mine["python"])
    if w.placement.cuda and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], w.device)
    loop.metrics.resumed(step)
    loop.metrics.say(f"resumed from the checkpoint of step {step}")
    return step


def _checkpoint(w: Worker, engine, step: int, loss: float) -> None:
    """A LoRA-only checkpoint with every rank's RNG state, reported to Ray Train."""
    rng: list[Any] = [None] * w.world
    state = {"torch": torch.random.get_rng_state(), "python": random.getstate()}
    if w.placement.cuda:
        state["cuda"] = torch.cuda.get_rng_state(w.device)  # dropout masks on the GPU draw from this one
    dist.all_gather_object(rng, state)
    tmp = Path(tempfile.mkdtemp(prefix=f"lora-dist-ckpt{step}-r{w.rank}-"))
    try:
        eng.save_checkpoint(engine, tmp, step, {"step": step, "rng": rng}, w.rank)
        w.ray_io.report({"loss": loss, "step": step}, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _report_final(w: Worker, final: dict[str, Any]) -> None:
    """Report the finished job as a tiny checkpoint holding the artifact's location: Ray Train
    keeps the metrics of checkpoints (the driver reads them from the Result), and a retried job
    finds it and does not train again."""
    tmp = Path(tempfile.mkdtemp(prefix="lora-dist-final-"))
    try:
        if w.rank == 0:
            (tmp / FINAL_FILE).write_text(json.dumps(final))
        w.ray_io.report({**final, "done": True}, tmp if w.rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _all_gather(stats: torch.Tensor, world: int) -> list[torch.Tensor]:
    gathered = [torch.zeros_like(stats) for _ in range(world)]
    dist.all_gather(gathered, stats)  # stats live on this worker's device (nccl needs CUDA tensors)
    return gathered
