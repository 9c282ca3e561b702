"""One Ray Train worker of a job: DeepSpeed ZeRO over the int8 base, driven by the one training
loop (train.py). Rank logic lives here and in engine.py only.

The spec arrives as a plain dict (the Ray boundary) and is validated back into a JobSpec at once.
Ray itself is reached only through the ``ray_io`` object that launch.py (the only ray.train
importer) hands in:

    ray_io.report(metrics, directory)  report metrics, with a checkpoint directory (or None)
    ray_io.node_id()                   this worker's Ray node

Resumable state is the project's own (checkpoint.py), on the job's storage, gathered whole: a
restarted or resubmitted job continues from the newest complete checkpoint at any worker count,
from the batch where it stopped (no batch skipped, none trained twice). Ray Train's own
checkpoints carry only the final report (the artifact's location), which the driver reads.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
import torch.distributed as dist

from lora_dist import checkpoint as ckpt
from lora_dist import engine as eng
from lora_dist import hub
from lora_dist.device import Placement, resident_bytes, worker_memory, worker_placement
from lora_dist.base import resolve_base
from lora_dist.counting import count_activations, count_model
from lora_dist.errors import JobFailed
from lora_dist.fits import device_problem
from lora_dist.lora import trainable_parameters
from lora_dist.model import LoadedModel, enable_activation_checkpointing
from lora_dist.plan import ModelCounts, Setup, StageChoice, choose_zero_stage, explicit_stage, per_worker_bytes, \
    zero_settings
from lora_dist.records import CheckpointState
from lora_dist.runtime_env import redacted
from lora_dist.spec import JobSpec, spec_from_dict
from lora_dist.specid import spec_digest
from lora_dist.store import MANIFEST_FILE, METRICS_FILE, PROBE_FILE, artifact_location, check_job_id, digest_at, \
    is_uri, join, make_work_dir, parse_manifest, read_text, verify_artifact, write_storage_probe
from lora_dist.epochs import plan_line, planned_steps
from lora_dist.progress import Metrics
from lora_dist.records import EpochPlan
from lora_dist.tracking import Tracker, tracked
from lora_dist.earlystop import early_stop, split_best
from lora_dist.train import Loop, batch_plan, data_line, end_validation, epoch_fields, export, make_schedule, \
    mfu_fields, mfu_setup, next_index, prepare_data, run_steps, seed_everything, steps_run, validate
from lora_dist.validate import validate_job

FINAL_FILE = "final.json"


class RayIO(Protocol):
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
    stage: StageChoice | None = None  # the ZeRO stage it runs (cluster.zero_stage, auto resolved) and why
    val_before: float | None = None  # the validation loss before step 1 (carried by checkpoints)
    nodes: list[Any] = field(default_factory=list)  # each rank's Ray node in this attempt
    base: str = ""  # model.base as resolved for every rank: a hub id pinned to one commit (hub.pin)
    earlier_nodes: list[list[Any]] = field(default_factory=list)  # those of the attempts it resumes
    root: str | None = None  # where every file of the job goes (store.job_root): each writer confines to it
    cpus: int | None = None  # the CPUs Ray reserved for this worker (cluster.cpus_per_worker resolved)
    counts: ModelCounts | None = None  # the model as built (counting.count_model)
    process_bytes: int = 0  # resident memory with the libraries, tokenizer and data in, before the model

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def checkpoints(self) -> str:
        return ckpt.checkpoints_dir(self.spec.output.dir, self.spec.name, self.job_id)

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)


def run_worker(config: dict[str, Any], ray_io: RayIO) -> None:
    """The worker's whole life: set up, build, resume, train, export, report; rank 0 tracks it
    (tracking.py: its run ends FAILED when this raises)."""
    w = _setup(config, ray_io)
    with tracked(w.spec, w.job_id, main=w.rank == 0, say=w.say) as tracker:
        _run(w, config, ray_io, tracker)


def _run(w: Worker, config: dict[str, Any], ray_io: RayIO, tracker: Tracker) -> None:
    nodes: list[Any] = [None] * w.world
    dist.all_gather_object(nodes, ray_io.node_id())
    w.nodes = nodes
    _check_storage(w, nodes, config.get("storage_probe"))
    (w.work_dir / f"rank{w.rank}.pid").write_text(str(os.getpid()))  # for tests and operators that need it
    published = _broadcast(w, _published(w) if w.rank == 0 else None)
    if published is not None:  # a retry after the artifact was published: report it, train nothing
        w.say(f"artifact already published: {published['artifact']}")
        _report_final(w, published)
        return
    built, runner, parts, loop = build_loop(w, config.get("parity_reference"), tracker)
    resumed_from = _resume(w, runner.module, loop)
    if resumed_from is None:
        w.val_before = validate(loop, 0)
    run = run_steps(loop, start=1 if resumed_from is None else resumed_from + 1)
    val_after = end_validation(loop)
    process_bytes: list[Any] = [None] * w.world
    dist.all_gather_object(process_bytes, w.process_bytes)
    fields = {"world_size": w.world, "zero_stage": w.stage.stage, "zero_stage_reason": w.stage.reason,
              "steps": steps_run(loop),
              "final_loss": run.loss, "val_loss_before": w.val_before, "val_loss_after": val_after,
              "resumed_from_step": resumed_from, "parity_max_loss_diff": run.parity_max, "nodes": nodes,
              "node_history": [*w.earlier_nodes, nodes],  # each attempt that trained, oldest first
              "int8_partition_bytes": parts["int8_local_bytes"], "int8_full_bytes": parts["int8_full_bytes"],
              "precision": w.placement.record(), "zero_settings": w.zero,
              "cpus_per_worker": w.cpus, "torch_threads": torch.get_num_threads(), **mfu_fields(loop),
              # per rank, what `lora-dist plan`'s overhead term stands for on CPU (bench/plan_vs_measured.py)
              "process_bytes_before_model": process_bytes,
              **epoch_fields(loop)}
    location = export(loop, built, w.job_id, fields, staging=w.work_dir / "staging", within=w.root)
    if w.rank == 0:
        loop.metrics.say(f"artifact written: {location}")
        ckpt.remove_all(w.checkpoints, w.root)  # the artifact holds what they did
    dist.barrier()
    digest = digest_at(location) if w.rank == 0 else None
    tracker.artifact(location, digest)
    _report_final(w, {"step": steps_run(loop), "loss": run.loss, "artifact": location, "manifest_digest": digest})


def build_loop(w: Worker, parity_reference: list[float] | None = None, tracker: Tracker | None = None
               ) -> tuple[LoadedModel, eng.ZeroRunner, dict[str, int], Loop]:
    """The data and its steps, the sharded model, its engine (whose schedule needs the steps), and
    the training loop over this rank's batches, which checkpoints through :func:`_checkpoint`."""
    from transformers import AutoTokenizer

    validate_job(w.spec, "build")
    # A hub id's branch resolves once, on rank 0: every rank loads that one commit (each node's
    # first rank downloads it, the others wait on a lock in the cache: hub.snapshot).
    w.base = _broadcast(w, hub.pin(hub.hub_ref(w.spec.model)) if w.rank == 0 else None)
    model_dir = resolve_base(w.base, say=w.say)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.time()
    data = prepare_data(w.spec, tokenizer, say=w.say)
    w.say(data_line(data, time.time() - t0))
    plan = batch_plan(w.spec, data)
    steps, epoch_plan = _planned_steps(w, plan)
    w.process_bytes = resident_bytes()
    built, runner, parts = _build(w, model_dir, tokenizer, steps)
    flops, peak = mfu_setup(w.spec, w.counts, w.placement)
    loop = Loop(w.spec, runner, data, w.device, ranks=[w.rank], world_size=w.world,
                metrics=Metrics(w.work_dir / METRICS_FILE, w.spec, main=w.rank == 0, tracker=tracker),
                int8_bytes=parts["int8_local_bytes"], gather=lambda stats: _all_gather(stats, w.world),
                checkpoint=lambda step, loss: _checkpoint(w, runner.module, loop, step, loss),
                reference=parity_reference, val_share=(w.rank, w.world), early=early_stop(w.spec), plan=plan,
                max_steps=steps, epoch_plan=epoch_plan, flops=flops, peak=peak)
    return built, runner, parts, loop


def _planned_steps(w: Worker, plan) -> tuple[int, EpochPlan | None]:
    """The job's last step: train.max_steps, or the steps of train.epochs as the job's first start
    fixed them (its newest checkpoint records them), else derived at this worker count."""
    if w.spec.train.epochs is None:
        return w.spec.train.max_steps, None
    recorded = _checkpoint_on_rank0(w, lambda: _recorded_plan(w))
    epoch_plan = EpochPlan.model_validate(recorded) if recorded else planned_steps(w.spec, plan, w.world)[1]
    w.say(plan_line(epoch_plan, w.spec.data.batching, resumed=recorded is not None))
    return epoch_plan.steps, epoch_plan


def _recorded_plan(w: Worker) -> dict[str, Any] | None:
    state = ckpt.latest_state(w.checkpoints)
    return state.epoch_plan.to_json() if state is not None and state.epoch_plan is not None else None


def _checkpoint_on_rank0(w: Worker, read: Callable[[], Any]) -> Any:
    """``read()`` of the job's checkpoints on rank 0, its result on every rank. A checkpoint that
    must not be resumed (unsigned while a key is set) fails every rank alike, none left waiting."""
    value, refused = None, None
    if w.rank == 0:
        try:
            value = read()
        except ckpt.UntrustedCheckpoint as e:
            refused = str(e)
    value, refused = _broadcast(w, (value, refused))
    if refused is not None:
        raise ckpt.UntrustedCheckpoint(refused)
    return value


def _broadcast(w: Worker, value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _check_storage(w: Worker, nodes: list[Any], token: str | None) -> None:
    """Every rank must see the job's local output.dir: each reads back the probe the driver wrote
    into the work directory (rank 0 writes it when no driver did). A node that does not mount the
    directory fails the job here, before anything is built, naming exactly the nodes that cannot
    see it (checkpoints written on one node would be invisible to a worker restarted on another)."""
    if is_uri(w.spec.output.dir):
        return
    probe = w.work_dir / PROBE_FILE
    if token is None:
        if w.rank == 0:
            make_work_dir(w.spec.output.dir, w.spec.name, w.job_id, w.root)
            token = write_storage_probe(w.work_dir)
        token = _broadcast(w, token)
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    everyone: list[Any] = [None] * w.world
    dist.all_gather_object(everyone, seen)
    blind = [r for r, ok in enumerate(everyone) if not ok]
    if blind:
        where = ", ".join(f"rank {r} on node {nodes[r]}" for r in blind[:4])
        declared = ("although output.shared is true" if w.spec.output.shared else
                    "(a multi-node job needs a storage URI, or a local dir every node mounts, declared "
                    "output.shared: true)")
        raise RuntimeError(f"output.dir {w.spec.output.dir} is not shared: {where} cannot see {probe}, which "
                           f"the job wrote, {declared}")


def _published(w: Worker) -> dict[str, Any] | None:
    """The final report of this job's artifact if it is already published (a retry after the
    publishing rename), else None.

    Raises:
        SpecChanged: the artifact was trained from another spec.
        ArtifactError: it is there but does not verify (it is never overwritten).
    """
    location = artifact_location(w.spec.output.dir, w.spec.name, w.job_id)
    text = read_text(join(location, MANIFEST_FILE))
    if text is None:
        return None
    manifest = parse_manifest(text, location)
    ckpt.check_same_spec(manifest.spec or {}, redacted(w.spec.to_dict()), f"the artifact {location}")
    if not is_uri(location):
        verify_artifact(Path(location))
    return {"step": manifest.steps, "loss": manifest.final_loss, "artifact": location,
            "manifest_digest": digest_at(location)}


def _setup(config: dict[str, Any], ray_io: RayIO) -> Worker:
    """Join the process group; pick the device and threads; seed."""
    # DeepSpeed still calls torch.distributed's *_tensor collectives; torch warns on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    spec = spec_from_dict(config["spec"])
    rank, world = eng.init_distributed(spec.cluster.gpus_per_worker > 0)
    placement = worker_placement(spec)  # the device and compute dtype of everything below
    # the driver resolved cluster.cpus_per_worker (auto: launch.resolve_cpus_per_worker); Ray reserved that many
    cpus = config.get("cpus_per_worker") or spec.cluster.cpus_per_worker
    if not placement.cuda and cpus != "auto":
        torch.set_num_threads(max(1, int(cpus)))
    seed_everything(spec.train.seed + rank)
    return Worker(spec, check_job_id(config["job_id"]), Path(config["work_dir"]), rank, world, placement, ray_io,
                  root=config.get("job_root"), cpus=cpus if cpus != "auto" else None)


def _build(w: Worker, model_dir: Path, tokenizer, max_steps: int
           ) -> tuple[LoadedModel, eng.ZeroRunner, dict[str, int]]:
    """The sharded model of ``model_dir`` (``w.base`` resolved): skeleton, partitions, streamed int8
    weights, LoRA init, the engine (its schedule ends at ``max_steps``)."""
    from transformers import AutoConfig

    spec, t0 = w.spec, time.time()
    hf_config = AutoConfig.from_pretrained(model_dir)
    counts = w.counts = count_model(w.base, spec.injected_lora, spec.model.quantization)
    w.zero = zero_settings(counts, "full" if spec.full else "lora_int8_zero3")
    w.stage = _choose_stage(w, counts)
    ds_cfg = eng.ds_config(spec, w.world, w.placement, w.zero, w.stage.stage)
    if w.stage.stage == 3:
        model, injection = eng.build_sharded(hf_config, spec, ds_cfg, w.placement)
    else:
        model, injection = eng.build_replicated(hf_config, spec, w.placement)
    loaded = eng.stream_weights(model, model_dir, injection, w.rank, w.world)
    eng.init_lora_sharded(model, spec.train.seed, w.rank)
    if spec.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable_parameters(model).values())
    engine = eng.initialize(model, ds_cfg, lambda optimizer: make_schedule(optimizer, spec, max_steps))
    parts = eng.partition_report(model)
    if w.rank == 0:
        print(f"[rank 0/{w.world}] model {spec.model.base} built (ZeRO-{w.stage.stage}) in "
              f"{time.time() - t0:.1f} s: int8 base {parts['int8_local_bytes']:,} of {parts['int8_full_bytes']:,} "
              f"bytes on this rank; {trainable:,} trainable parameters", flush=True)
    built = LoadedModel(model, tokenizer, model_dir, injection, trainable, loaded.fingerprint)
    return built, eng.ZeroRunner(engine, w.rank), parts


def _choose_stage(w: Worker, counts: ModelCounts) -> StageChoice:
    """The ZeRO stage this job runs: the spec's, or under ``auto`` the cheapest whose plan fits
    the smallest worker's memory (``plan.choose_zero_stage``). Under ``auto``, and on GPU workers,
    it is collective: every rank offers its memory (``device.worker_memory``), and all decide alike
    from the smallest. On GPU workers a plan over it fails the job here, before the model is built,
    with both figures (``fits.device_problem``; CPU workers were checked at submit)."""
    spec = w.spec
    if spec.cluster.zero_stage != "auto" and not w.placement.cuda:
        return explicit_stage(spec.cluster.zero_stage)
    nodes: list[Any] = list(w.nodes)
    if not nodes:  # run_worker gathers them first; a worker built on its own gathers them here
        nodes = [None] * w.world
        dist.all_gather_object(nodes, w.ray_io.node_id())
    memory: list[Any] = [None] * w.world
    dist.all_gather_object(memory, worker_memory(w.placement, nodes.count(nodes[w.rank])))
    method = "full" if spec.full else "lora"
    setup = Setup(workers=w.world, micro_batch=spec.train.micro_batch_size, seq_len=spec.data.max_length,
                  device=w.placement.device.type, dtype=w.placement.dtype_name,
                  activation_checkpointing=spec.train.activation_checkpointing)
    acts = {method: count_activations(w.base, spec.injected_lora, spec.model.quantization,
                                      setup.micro_batch, setup.seq_len, setup.dtype_name, method=method,
                                      device=setup.device)}
    auto = spec.cluster.zero_stage == "auto"
    choice = (choose_zero_stage(counts, method, setup, acts, min(memory)) if auto
              else explicit_stage(spec.cluster.zero_stage))
    if w.placement.cuda:
        need = choice.per_worker_bytes.get(choice.stage) or per_worker_bytes(  # auto planned every stage
            counts, "full" if spec.full else "lora_int8_zero3", setup, acts, choice.stage)
        if problem := device_problem(need, choice.stage, min(memory), str(w.placement.device), auto):
            raise JobFailed(problem)
    w.say(f"ZeRO stage {choice.stage}: {choice.reason}")
    return choice


def _resume(w: Worker, engine, loop: Loop) -> int | None:
    """Restore the newest complete checkpoint of this job, if any: LoRA weights, AdamW, the
    schedule, the batch position, the history; RNG states too when the worker count is the one
    that wrote it (dropout masks are drawn per batch from the seed, so they do not depend on it).
    Torn or tampered checkpoints are skipped for the previous complete one, each with a line.

    Returns:
        The step it was taken at; None when the job starts from step 1.

    Raises:
        SpecChanged: the checkpoint was written under a spec that trains something else.
    """
    location = _checkpoint_on_rank0(w, lambda: ckpt.latest(w.checkpoints, say=w.say))
    if location is None:
        loop.metrics.start()
        return None
    c = ckpt.load(location)  # every rank reads and verifies it: megabytes
    state = c.state
    ckpt.check_same_spec(state.spec, redacted(w.spec.to_dict()), f"the checkpoint {location}")
    tensors, best = split_best(c.tensors)
    eng.restore_train_state(engine, tensors, state.scalars)
    if loop.early is not None:
        loop.early.restore(state.early_stop, best, main=w.rank == 0)
    loop.resumed_at, loop.index_base = c.step, state.next_index
    loop.resumed_loss = state.loss
    w.val_before = state.val_loss_before
    w.earlier_nodes = state.node_history
    if state.world_size == w.world:
        _set_rng(state.rng[w.rank], w)
    loop.metrics.resumed(c.step, c.metrics)
    written = state.world_size
    loop.metrics.say(f"resumed from the checkpoint of step {c.step}"
                     + (f" (written by {written} workers, now {w.world})" if written != w.world else ""))
    return c.step


def _checkpoint(w: Worker, engine, loop: Loop, step: int, loss: float) -> None:
    """Collective: gather the trainable state and every rank's RNG to rank 0, which writes the
    checkpoint (checkpoint.write: verified on read, manifest last, renamed into place)."""
    try:
        tensors, scalars = eng.gather_train_state(engine, w.rank)
    except eng.NoTrainState as e:  # every rank alike
        w.say(f"checkpoint of step {step} skipped: {e}")
        return
    rng: list[Any] = [None] * w.world
    dist.all_gather_object(rng, _get_rng(w))
    if w.rank == 0:
        state = CheckpointState(step=step, loss=loss, next_index=next_index(loop, step), world_size=w.world,
                                scalars=scalars, rng=rng, spec=redacted(w.spec.to_dict()),
                                spec_digest=spec_digest(w.spec.to_dict()), val_loss_before=w.val_before,
                                node_history=[*w.earlier_nodes, w.nodes])
        if loop.epoch_plan is not None:  # a resumed job keeps these steps
            state = state.updated(epoch_plan=loop.epoch_plan)
        if loop.early is not None:  # the best adapter so far, and how long since it improved
            state = state.updated(early_stop=loop.early.state())
            tensors = {**tensors, **loop.early.tensors()}
        ckpt.write(w.checkpoints, step, tensors, state, loop.metrics.text(), say=w.say, within=w.root)
    dist.barrier()  # nobody goes on before the checkpoint is complete


def _get_rng(w: Worker) -> dict[str, Any]:
    """This process's RNG states as JSON (torch's as base64 bytes, Python's as its int list)."""
    version, internal, gauss = random.getstate()
    state = {"torch": base64.b64encode(torch.random.get_rng_state().numpy().tobytes()).decode(),
             "python": [version, list(internal), gauss]}
    if w.placement.cuda:  # dropout masks on the GPU draw from this one
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(w.device).numpy().tobytes()).decode()
    return state


def _set_rng(state: dict[str, Any], w: Worker) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.random.set_rng_state(tensor(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if w.placement.cuda and "cuda" in state:
        torch.cuda.set_rng_state(tensor(state["cuda"]), w.device)


def _report_final(w: Worker, final: dict[str, Any]) -> None:
    """Report the finished job as a tiny checkpoint holding the artifact's location: Ray Train
    keeps the metrics of checkpoints, and the driver reads them from the Result."""
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
