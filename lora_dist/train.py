"""The one training loop: every path (``lora-dist train``, a Ray worker, the parity reference)
steps through :func:`train_step` and :func:`run_steps`.

What differs between paths is only who owns the optimizer step, which a *runner* hides:

    LocalRunner   one process, plain PyTorch AdamW       lora-dist train, the parity reference
    ZeroRunner    a DeepSpeed engine (engine.py)         a Ray worker at any world size

and which ranks' batches a process trains: a worker trains its own rank's; the single process
trains every rank's batches of an N-worker run, averaging them as data-parallel training does,
which makes it the unsharded reference for that run. Batches are a pure function of
(step, micro-step, rank), so a resumed or re-sharded run sees the same data.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from lora_dist.adapter import write_job_artifact
from lora_dist.data import BatchPlan, TokenArrays, collate, collate_packed, tokenized
from lora_dist.sources import spread
from lora_dist.device import Placement, local_placement, peak_memory_bytes
from lora_dist.errors import ArtifactError
from lora_dist.hub import hub_ref
from lora_dist.lora import LoraTensors, collect_lora, trainable_parameters
from lora_dist.earlystop import EarlyStop, early_stop
from lora_dist.epochs import epoch_at, plan_line, planned_steps
from lora_dist.mfu import FlopCount, flop_count, gemm_peak, mean_mfu, probe_shapes
from lora_dist.model import LoadedModel, enable_activation_checkpointing, load_model
from lora_dist.plan import ModelCounts
from lora_dist.progress import Metrics
from lora_dist.records import EpochPlan
from lora_dist.spec import JobSpec
from lora_dist.confine import confine
from lora_dist.counting import count_model
from lora_dist.store import METRICS_FILE, artifact_location, cache_root, check_job_id, digest_at, is_uri, job_root, \
    make_work_dir, new_job_id, publish
from lora_dist.tracking import tracked
from lora_dist.validate import validate_job


class ParityError(RuntimeError):
    """The sharded run's loss left the unsharded reference's by more than the tolerance."""


# --- data for the loop ----------------------------------------------------------------------------

@dataclass
class Dataset:
    train: TokenArrays
    val: TokenArrays
    pad_id: int
    n_train_prompts: int
    n_val_prompts: int
    cache: str | None = None  # the tokenization cache: "hit" or "miss"


def prepare_data(spec: JobSpec, tokenizer, say: Callable[[str], None] | None = None) -> Dataset:
    """The run's tokenized splits: tokenized once per machine and cache (data.tokenized)."""
    tokens = tokenized(spec.data, tokenizer, cache_root(), say=say)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Dataset(tokens.train, tokens.val, pad, tokens.n_train_prompts, tokens.n_val_prompts, tokens.cache)


def data_line(data: Dataset, seconds: float) -> str:
    """What the run trains on, and whether its tokenization came from the cache."""
    return (f"data: {len(data.train)} train examples ({data.n_train_prompts} prompts), {len(data.val)} validation "
            f"({data.n_val_prompts} prompts); tokenization cache {data.cache}, ready in {seconds:.1f} s")


def global_index(step: int, micro: int, rank: int, grad_accum: int, world_size: int) -> int:
    """The BatchPlan index of (step, micro-step, rank): steps count from 1, every rank its own batch."""
    return ((step - 1) * grad_accum + micro) * world_size + rank


def micro_batch(data: Dataset, plan: BatchPlan, index: int) -> dict[str, torch.Tensor]:
    """The model inputs of micro-batch ``index`` (packed: rows of examples end to end)."""
    if plan.mode == "packed":
        return collate_packed([[data.train[j] for j in row] for row in plan.rows(index)], data.pad_id)
    return collate([data.train[j] for j in plan.indices(index)], data.pad_id)


def val_batches(data: Dataset, spec: JobSpec) -> list[dict[str, torch.Tensor]]:
    """``eval_batches`` micro-batches of validation examples, spread evenly over the whole split
    (examples are in file order, so a prefix would be one or two restaurants of a name split)."""
    size = spec.train.micro_batch_size
    items = spread(data.val, size * spec.train.eval_batches)
    return [collate(items[i:i + size], data.pad_id) for i in range(0, len(items), size)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def seed_batch(seed: int, index: int) -> None:
    """Seed the RNG that draws LoRA dropout masks from the run seed and the batch's BatchPlan index.

    A batch then gets the same masks whichever rank, world size or path trains it: the
    single-process parity reference, which runs every rank's batches in one process, draws the
    masks the sharded run drew, and a resumed run draws the masks the uninterrupted one did.
    With one RNG stream per process instead, the masks differed and LoRA on every linear layer
    left the reference by 1.8e-3 nats at step 2 (dropout 0: 1e-7).
    """
    torch.manual_seed(((seed & 0xFFFFFFFF) << 32) | (index & 0xFFFFFFFF))


# --- optimizer, schedule, loss --------------------------------------------------------------------

def make_schedule(optimizer: torch.optim.Optimizer, spec: JobSpec,
                  max_steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedule: linear warmup from 0 over ``warmup_steps``, then linear or cosine
    decay to zero at ``max_steps`` (the run's: train.max_steps, or the steps of train.epochs).

    As in transformers, the first warmup step's learning rate is 0. Warmup is capped at
    max_steps - 1, so that a short run (``--set train.max_steps=1``) still takes a step.
    """
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    t = spec.train
    total = max_steps or t.max_steps
    make = get_cosine_schedule_with_warmup if t.schedule == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, num_warmup_steps=min(t.warmup_steps, total - 1), num_training_steps=total)


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of completion-token cross-entropies, number of such tokens) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device | str = "cpu",
             share: tuple[int, int] = (0, 1),
             gather: Callable[[torch.Tensor], list[torch.Tensor]] = lambda stats: [stats]) -> float:
    """Mean cross-entropy per completion token over ``batches``.

    With ``share`` = (rank, world) each rank computes every world-th batch from its rank on, and
    ``gather`` (an all-gather) sums the ranks' (loss, tokens). Every rank runs as many forwards
    (under ZeRO-3 each one is a collective); a rank with a batch fewer computes one more that it
    does not count.
    """
    rank, world = share
    mine = list(batches[rank::world])
    rounds = -(-len(batches) // world)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for r in range(rounds):
        b = mine[r] if r < len(mine) else batches[0]
        loss, n = token_loss(model, {k: v.to(device) for k, v in b.items()})
        if r < len(mine):
            total += float(loss)
            count += n
    model.train(was_training)
    stats = torch.tensor([total, count], dtype=torch.float64, device=device)
    total, count = (float(x) for x in torch.stack(gather(stats)).sum(0).tolist())
    return total / max(count, 1)


# --- runners: who owns the optimizer step ---------------------------------------------------------

class Runner(Protocol):
    module: nn.Module  # what to call for a forward (the model, or the DeepSpeed engine)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of one micro-batch's loss."""

    def lr(self) -> float:
        """The learning rate the next optimizer step applies."""

    def step(self) -> None:
        """Apply the optimizer step once every micro-batch of a step has been through backward."""

    def gather_lora(self) -> dict[str, LoraTensors] | None:
        """Full copies of every LoRA pair on the main process (a collective under ZeRO-3)."""

    def full_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on the main process (full fine-tuning export)."""


class LocalRunner:
    """One process, plain PyTorch: AdamW over the trainable parameters, clipping, the schedule.

    ``micro_batches`` is how many micro-batch losses make one step (grad_accum x the ranks this
    process stands in for); each is scaled by its inverse, so a step's gradient is their mean.
    """

    def __init__(self, model: nn.Module, spec: JobSpec, micro_batches: int, max_steps: int | None = None) -> None:
        self.module = model
        self.params = list(trainable_parameters(model).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
        self.scheduler = make_schedule(self.optimizer, spec, max_steps)
        self.max_grad_norm = spec.train.max_grad_norm
        self.scale = 1.0 / micro_batches

    def backward(self, loss: torch.Tensor) -> None:
        (loss * self.scale).backward()

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def step(self) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def gather_lora(self) -> dict[str, LoraTensors]:
        return collect_lora(self.module)

    def full_state(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()


# --- the loop -------------------------------------------------------------------------------------

@dataclass
class Loop:
    """Everything :func:`run_steps` needs; the caller decides what each piece is."""
    spec: JobSpec
    runner: Runner
    data: Dataset
    device: torch.device
    ranks: Sequence[int]  # whose batches this process trains: [rank], or range(N) in one process
    world_size: int
    metrics: Metrics
    int8_bytes: int = 0  # of the frozen base held by this process
    gather: Callable[[torch.Tensor], list[torch.Tensor]] = lambda stats: [stats]  # per-rank step stats
    checkpoint: Callable[[int, float], None] | None = None  # called on schedule and at the last step
    reference: Sequence[float] | None = None  # the parity guard's unsharded losses, step 1 onwards
    val_share: tuple[int, int] = (0, 1)  # (rank, world): which validation batches this process computes
    # Where the batch sequence continues after a resume: step ``resumed_at`` ended before BatchPlan
    # index ``index_base``. A job resumed at another worker count goes on from there, so no batch is
    # skipped or trained twice; at the same count the indices are those of an uninterrupted run.
    resumed_at: int = 0
    index_base: int = 0
    early: EarlyStop | None = None  # train.early_stop_patience (early_stop(spec))
    resumed_loss: float = float("nan")  # the loss of step ``resumed_at`` (its checkpoint's)
    plan: BatchPlan | None = None  # batch_plan(spec, data) when None
    max_steps: int = 0  # the last step: train.max_steps when 0, else the steps of train.epochs (planned_steps)
    epoch_plan: EpochPlan | None = None  # train.epochs: what max_steps was derived from
    flops: FlopCount | None = None  # a token's model FLOPs (mfu.flop_count): steps then record their MFU
    peak: float = 0.0  # this process's GEMM peak in the compute dtype (mfu.gemm_peak), FLOP/s
    peak_total: float = 0.0  # every process's, summed (set at each step)
    lengths: list[int] = field(init=False)  # each training example's tokens
    per_epoch: float = field(init=False)  # micro-batches per pass over the training examples
    val: list[dict[str, torch.Tensor]] = field(init=False)  # collated once, reused at every validation

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = batch_plan(self.spec, self.data)
        self.lengths = self.plan.lengths if self.plan.lengths is not None else self.data.train.lengths()
        self.max_steps = self.max_steps or self.spec.train.max_steps
        self.per_epoch = self.epoch_plan.micro_batches_per_epoch if self.epoch_plan else \
            self.plan.micro_batches(self.plan.n)
        self.metrics.total = self.max_steps
        self.val = val_batches(self.data, self.spec)


def batch_plan(spec: JobSpec, data: Dataset) -> BatchPlan:
    """The run's micro-batches (data.BatchPlan over the training examples)."""
    return BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed, lengths=data.train.lengths(),
                     mode=spec.data.batching, capacity=spec.data.max_length)


def batch_index(loop: Loop, step: int, micro: int, rank: int) -> int:
    """The BatchPlan index that ``rank`` trains at (step, micro-step) of this (possibly resumed) run."""
    return loop.index_base + global_index(step - loop.resumed_at, micro, rank, loop.spec.train.grad_accum,
                                          loop.world_size)


def next_index(loop: Loop, step: int) -> int:
    """The first BatchPlan index after ``step``: where a run resumed from ``step`` continues."""
    return loop.index_base + (step - loop.resumed_at) * loop.spec.train.grad_accum * loop.world_size


class StepOut(NamedTuple):
    loss: float  # the mean loss of the process's micro-batches
    tokens: int  # real (non-pad) tokens it trained
    pad_tokens: int  # positions it computed that hold padding
    lr: float  # the learning rate applied
    tokens_sq: int = 0  # the sum over its examples of their length squared (attention's FLOPs)
    rows: int = 0  # the largest micro-batch it trained: rows (packed: rows of data.max_length tokens)
    seq_len: int = 0  # and positions per row: the shape its activations peak at


def train_step(loop: Loop, step: int) -> StepOut:
    """One optimizer step over every (micro-step, rank) batch this process trains."""
    ga, seed = loop.spec.train.grad_accum, loop.spec.train.seed
    lr = loop.runner.lr()
    loss_sum = torch.zeros((), dtype=torch.float64, device=loop.device)
    tokens = positions = tokens_sq = 0
    shape = (0, 0)
    for micro in range(ga):
        for rank in loop.ranks:
            index = batch_index(loop, step, micro, rank)
            batch = micro_batch(loop.data, loop.plan, index)
            # counted on the host: the examples' own lengths and the batch's shape (no device sync)
            lengths = [loop.lengths[j] for j in loop.plan.indices(index)]
            tokens += sum(lengths)
            tokens_sq += sum(n * n for n in lengths)
            positions += batch["input_ids"].numel()
            shape = max(shape, tuple(batch["input_ids"].shape), key=lambda rs: rs[0] * rs[1])
            seed_batch(seed, index)
            # no KV cache: training never reads one (and packed rows are told apart only without it)
            loss = loop.runner.module(**{k: v.to(loop.device) for k, v in batch.items()}, use_cache=False).loss
            loop.runner.backward(loss)
            loss_sum += loss.detach().double()
    loop.runner.step()
    return StepOut(float(loss_sum) / (ga * len(loop.ranks)), tokens, positions - tokens, lr, tokens_sq, *shape)


class RunResult(NamedTuple):
    """What :func:`run_steps` ends with."""
    loss: float  # the last step's loss over all ranks (a run resumed at its end: its checkpoint's)
    parity_max: float | None  # the largest difference from the parity reference; None without one


def run_steps(loop: Loop, start: int = 1) -> RunResult:
    """Steps ``start``..``loop.max_steps``: train, record, check, validate and checkpoint on schedule.

    Returns:
        The last step's loss over all ranks and the largest parity difference.

    Raises:
        ParityError: a step's loss left the reference by more than train.parity_tolerance.
        FloatingPointError: the loss became NaN or infinite.
    """
    t, early = loop.spec.train, loop.early
    loss, parity_max = loop.resumed_loss, None  # a run resumed where it ended trains no step
    loop.runner.module.train()
    last = loop.max_steps
    for step in range(start, last + 1):
        if early is not None and early.stopped_at is not None:  # resumed from the checkpoint of the stop
            break
        t0 = time.time()
        out = train_step(loop, step)
        flops = loop.flops.of(out.tokens, out.tokens_sq) if loop.flops is not None else 0.0
        stats = torch.tensor([out.loss, out.tokens, peak_memory_bytes(loop.device), loop.int8_bytes, out.pad_tokens,
                              flops, loop.peak, out.rows, out.seq_len], dtype=torch.float64, device=loop.device)
        ranks = [s.tolist() for s in loop.gather(stats)]
        loss, seconds = sum(r[0] for r in ranks) / len(ranks), time.time() - t0
        tokens, pad = int(sum(r[1] for r in ranks)), int(sum(r[4] for r in ranks))
        rec = {"step": step, "loss": loss, "lr": out.lr, "tokens": tokens, "pad_tokens": pad,
               "real_tokens_per_s": tokens / seconds,
               "tokens_per_s": tokens / seconds,  # the same figure under its first name (real tokens)
               "step_s": seconds, "peak_memory_bytes": [int(r[2]) for r in ranks],
               "int8_partition_bytes": [int(r[3]) for r in ranks],
               # each rank's largest micro-batch this step, [rows, positions]: `lora-dist plan`
               # counts activations at micro_batch_size x max_length, the most a batch can be
               "batch_shape": [[int(r[7]), int(r[8])] for r in ranks],
               "epoch": round(epoch_at(next_index(loop, step), loop.per_epoch), 4)}
        if loop.flops is not None:
            loop.peak_total = sum(r[6] for r in ranks)
            rec["model_flops_per_s"] = sum(r[5] for r in ranks) / seconds
            if loop.peak_total > 0:
                rec["mfu"] = rec["model_flops_per_s"] / loop.peak_total
        if loop.reference is not None and step <= len(loop.reference):
            rec["parity_diff"] = diff = abs(loss - loop.reference[step - 1])
            parity_max = max(parity_max or 0.0, diff)
            if diff > t.parity_tolerance:
                raise ParityError(f"parity check failed at step {step}: sharded loss {loss:.6f}, unsharded "
                                  f"reference {loop.reference[step - 1]:.6f}, difference {diff:.2e} > "
                                  f"train.parity_tolerance {t.parity_tolerance:g}")
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower train.lr")
        loop.metrics.step(rec)
        stop = False
        if early is not None and (step % t.eval_every == 0 or step == last):
            stop = early.observe(step, validate(loop, step), loop.runner, last=step == last)
        elif t.eval_every and step % t.eval_every == 0 and step < last:
            validate(loop, step)
        # The last step too: an export that fails then loses no training.
        if loop.checkpoint and ((t.checkpoint_every and step % t.checkpoint_every == 0) or step == last
                                or stop):
            loop.checkpoint(step, loss)
        if stop:
            loop.metrics.say(f"early stop at step {step}: the validation loss has not improved for "
                             f"{early.since} validations, the best {early.best_val:.4f} at step {early.best_step} "
                             f"(train.early_stop_patience {t.early_stop_patience})")
            break
    return RunResult(loss, parity_max)


def end_validation(loop: Loop) -> float:
    """The validation loss of what is exported: the best adapter's under early stop (validated
    already), else the last step's."""
    if loop.early is not None:
        e = loop.early
        loop.metrics.say(f"exporting the adapter of step {e.best_step} (validation loss {e.best_val:.4f}; "
                         f"the last validation, step {e.stopped_at or loop.max_steps}: {e.last_val:.4f})")
        return e.best_val
    return validate(loop, loop.max_steps)


def steps_run(loop: Loop) -> int:
    """How many steps the job trained: max_steps, or where early stop ended it."""
    if loop.early is not None and loop.early.stopped_at is not None:
        return loop.early.stopped_at
    return loop.max_steps


def validate(loop: Loop, step: int) -> float:
    """Validation loss now, recorded at ``step`` (0: before training)."""
    value = evaluate(loop.runner.module, loop.val, loop.device, loop.val_share, loop.gather)
    loop.metrics.record({"step": step, "val_loss": value})
    loop.metrics.say(f"step {step}  val_loss {value:.4f}")
    return value


def export(loop: Loop, built: LoadedModel, job_id: str, fields: dict[str, Any], staging: Path,
           within: str | None = None) -> str | None:
    """Gather the trained weights (a collective: every rank enters) and, on the main process,
    write the artifact (to ``staging`` first when output.dir is a URI, then upload it), under the
    job's root ``within`` as it is written (store.confine: JobError, nothing written, where not).

    Returns:
        The artifact's location on the main process, None elsewhere.
    """
    spec = loop.spec
    if loop.early is not None:  # the best adapter, kept when it was validated (every rank decides alike)
        if loop.early.best_step is None:
            raise FloatingPointError(f"no validation loss was finite (the last: {loop.early.last_val}); "
                                     f"there is no adapter to export")
        lora = loop.early.lora
        fields = {**fields, **loop.early.fields()}
    else:
        lora = None if spec.full else loop.runner.gather_lora()
    full_state = loop.runner.full_state() if spec.full else None
    if not loop.metrics.main:
        return None
    out = spec.output.dir
    dest = Path(artifact_location(str(staging) if is_uri(out) else out, spec.name, job_id))
    if not is_uri(out):
        confine(dest, within)
    artifact = write_job_artifact(dest, spec, job_id, built, lora, full_state, fields, loop.metrics.path)
    return publish(artifact, out, within) if is_uri(out) else str(artifact)


# --- the single-process entry points --------------------------------------------------------------

def build_local(spec: JobSpec, placement: Placement) -> LoadedModel:
    """The model of ``spec`` in this process: int8 or float base in the compute dtype, LoRA
    injected and initialised in fp32."""
    seed_everything(spec.train.seed)
    built = load_model(hub_ref(spec.model), spec.injected_lora, spec.model.quantization, seed=spec.train.seed,
                       dtype=placement.dtype)
    if spec.train.activation_checkpointing:
        enable_activation_checkpointing(built.model)
    return built


def int8_bytes(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.dtype == torch.int8)


def train_local(spec: JobSpec, job_id: str | None = None, stream=sys.stdout) -> Path | str:
    """Train in this process (no Ray, no DeepSpeed) and write the artifact.

    Returns:
        The artifact: a directory, or a URI when output.dir is one.

    Raises:
        SpecError, ModelError, DataError, ArtifactError: bad input, with the field named.
    """
    spec = spec.with_absolute_paths()
    job_id = check_job_id(job_id) if job_id is not None else new_job_id()  # it names directories
    final = artifact_location(spec.output.dir, spec.name, job_id)
    if not is_uri(final) and Path(final).exists():
        raise ArtifactError(f"{final} already exists; an artifact is never overwritten")
    validate_job(spec, "train")

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    with tracked(spec, job_id, main=True, say=say) as tracker:
        location = _train_here(spec, job_id, say, stream, tracker)
        tracker.artifact(location, digest_at(location))
    return location if is_uri(location) else Path(location)


def _train_here(spec: JobSpec, job_id: str, say: Callable[[str], None], stream, tracker) -> str:
    """train_local's build, data, loop and export; returns the artifact's location."""
    placement = local_placement(spec)
    t0 = time.time()
    built = build_local(spec, placement)
    say(f"model {spec.model.base}: {len(built.injection.quantized)} int8 linears, {len(built.injection.lora)} "
        f"LoRA modules, {built.trainable_params:,} trainable parameters (loaded in {time.time() - t0:.1f} s)")
    t0 = time.time()
    data = prepare_data(spec, built.tokenizer, say=say)
    say(data_line(data, time.time() - t0))
    plan = batch_plan(spec, data)
    steps, epoch_plan = planned_steps(spec, plan, 1)
    if epoch_plan is not None:
        say(plan_line(epoch_plan, spec.data.batching))
    root = job_root(spec.output.dir)  # symlinks resolved now: one planted later is not followed
    shutil.rmtree(make_work_dir(spec.output.dir, spec.name, job_id, root))  # checked first: never another's
    work = make_work_dir(spec.output.dir, spec.name, job_id, root)
    flops, peak = mfu_setup(spec, count_model(str(built.model_dir), spec.injected_lora, spec.model.quantization),
                            placement)
    loop = Loop(spec, LocalRunner(built.model, spec, spec.train.grad_accum, steps), data, placement.device,
                ranks=[0], world_size=1,
                metrics=Metrics(work / METRICS_FILE, spec, main=True, stream=stream, tracker=tracker),
                int8_bytes=int8_bytes(built.model), early=early_stop(spec), plan=plan, max_steps=steps,
                epoch_plan=epoch_plan, flops=flops, peak=peak)
    try:
        val_before = validate(loop, 0)
        run = run_steps(loop)
        val_after = end_validation(loop)
        fields = {"world_size": 1, "zero_stage": 0, "steps": steps_run(loop), "final_loss": run.loss,
                  "val_loss_before": val_before, "val_loss_after": val_after, "precision": placement.record(),
                  "torch_threads": torch.get_num_threads(), **mfu_fields(loop), **epoch_fields(loop)}
        return export(loop, built, job_id, fields, staging=work / "staging", within=root)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def mfu_setup(spec: JobSpec, counts: ModelCounts, placement: Placement) -> tuple[FlopCount, float]:
    """A token's model FLOPs and this process's GEMM peak in the compute dtype with its threads
    (probed once per machine: mfu.gemm_peak), for a Loop's ``flops`` and ``peak``."""
    shapes = probe_shapes(counts, spec.train.micro_batch_size, spec.data.max_length)
    return (flop_count(counts, spec.full, spec.train.activation_checkpointing),
            gemm_peak(placement.device, placement.dtype, shapes))


def mfu_fields(loop: Loop) -> dict[str, Any]:
    """The manifest's record of model FLOPs utilization (main process; none without a count)."""
    if loop.flops is None or not loop.metrics.main:
        return {}
    records = [json.loads(line) for line in loop.metrics.text().splitlines() if line.strip()]
    return {"mfu": mean_mfu(records), "model_flops_per_token": loop.flops.per_token,
            "peak_flops_per_s": loop.peak_total or None}


def epoch_fields(loop: Loop) -> dict[str, Any]:
    """The manifest's record of train.epochs (none without it)."""
    return {"epoch_plan": loop.epoch_plan} if loop.epoch_plan is not None else {}


def reference_losses(spec: JobSpec, world_size: int, steps: int) -> list[float]:
    """The first ``steps`` losses of an unsharded single-process run on the batches that a
    ``world_size``-worker run sees: the parity guard's reference."""
    validate_job(spec, "build")
    placement = local_placement(spec)
    built = build_local(spec, placement)
    data = prepare_data(spec, built.tokenizer)
    plan = batch_plan(spec, data)
    max_steps, _ = planned_steps(spec, plan, world_size)  # the schedule of the sharded run
    runner = LocalRunner(built.model, spec, spec.train.grad_accum * world_size, max_steps)
    loop = Loop(spec, runner, data, placement.device, ranks=range(world_size), world_size=world_size,
                metrics=Metrics(Path("/dev/null"), spec, main=False), plan=plan, max_steps=max_steps)
    built.model.train()
    return [train_step(loop, step).loss for step in range(1, min(steps, max_steps) + 1)]
