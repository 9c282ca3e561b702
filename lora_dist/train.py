"""Training pieces shared by every path, and the single-process trainer (``lora-dist train``).

The distributed worker reuses :func:`lr_lambda`, :func:`evaluate`, :func:`micro_batch` and the
artifact writer; what differs there is only who owns the optimizer step (DeepSpeed).
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from lora_dist import adapter as adapter_mod
from lora_dist.data import BatchPlan, Tokenized, collate, load_examples, split_by_prompt, tokenize
from lora_dist.model import cache_root, enable_activation_checkpointing, fingerprint, load_model
from lora_dist.spec import JobSpec

log = logging.getLogger(__name__)

LOSS_CURVE_FILE = "loss_curve.png"


def lora_or_none(spec: JobSpec):
    """The LoRA settings to inject, or None for full fine-tuning."""
    return None if spec.train.method == "full" else spec.lora


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Each trainable parameter once (tied weights are one parameter)."""
    return [p for p in {id(p): p for p in model.parameters()}.values() if p.requires_grad]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(spec: JobSpec) -> Callable[[int], float]:
    """Linear warmup over ``warmup_steps``, then linear or cosine decay to zero at ``max_steps``."""
    t = spec.train
    warmup = min(t.warmup_steps, t.max_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        span = max(1, t.max_steps - warmup)
        progress = min(1.0, (step - warmup) / span)
        if t.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


@dataclass
class Dataset:
    train: list[Tokenized]
    val: list[Tokenized]
    pad_id: int
    n_train_prompts: int
    n_val_prompts: int


def prepare_data(spec: JobSpec, tokenizer) -> Dataset:
    examples = load_examples(spec.data, cache_root())
    train_ex, val_ex = split_by_prompt(examples, spec.data.val_fraction)
    val_ex = val_ex[: spec.data.max_val_examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return Dataset(tokenize(train_ex, tokenizer, spec.data.max_length),
                   tokenize(val_ex, tokenizer, spec.data.max_length), pad,
                   len({e.prompt for e in train_ex}), len({e.prompt for e in val_ex}))


def seed_batch(seed: int, index: int) -> None:
    """Seed the RNG that draws LoRA dropout masks from the run seed and the batch's BatchPlan index.

    A batch then gets the same masks whichever rank, world size or path trains it: the
    single-process parity reference, which runs every rank's batches in one process, draws the
    masks the sharded run drew, and a resumed run draws the masks the uninterrupted one did.
    With one RNG stream per process instead, the masks differed and LoRA on every linear layer
    left the reference by 1.8e-3 nats at step 2 (dropout 0: 1e-7).
    """
    torch.manual_seed(((seed & 0xFFFFFFFF) << 32) | (index & 0xFFFFFFFF))


def micro_batch(data: Dataset, plan: BatchPlan, index: int) -> dict[str, torch.Tensor]:
    return collate([data.train[j] for j in plan.indices(index)], data.pad_id)


def val_batches(data: Dataset, spec: JobSpec) -> list[dict[str, torch.Tensor]]:
    size = spec.train.micro_batch_size
    items = data.val[: size * spec.train.eval_batches]
    return [collate(items[i:i + size], data.pad_id) for i in range(0, len(items), size)]


def token_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of completion-token cross-entropies, number of such tokens) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:].to(logits.device)
    logits = logits[:, :-1].float()
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())


@torch.no_grad()
def evaluate(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device | str = "cpu") -> float:
    """Mean cross-entropy per completion token over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        loss, n = token_loss(model, {k: v.to(device) for k, v in b.items()})
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


class Progress:
    """One line per logged step to a stream, and every record to ``metrics.jsonl``."""

    def __init__(self, total_steps: int, metrics_path: Path, stream=sys.stdout) -> None:
        self.total = total_steps
        self.metrics_path = metrics_path
        self.stream = stream
        self.t0 = time.time()
        metrics_path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, rec: dict[str, Any], show: bool = True) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if not show:
            return
        if "step" in rec and "loss" in rec:
            elapsed = time.time() - self.t0
            eta = elapsed / rec["step"] * (self.total - rec["step"]) if rec["step"] else 0.0
            print(f"step {rec['step']}/{self.total}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  "
                  f"tok/s {rec['tokens_per_s']:.0f}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                  file=self.stream, flush=True)
        else:
            print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()),
                  file=self.stream, flush=True)


def global_index(step: int, micro: int, rank: int, grad_accum: int, world_size: int) -> int:
    """The BatchPlan index of (step, micro-step, rank): steps count from 1, every rank its own batch."""
    return ((step - 1) * grad_accum + micro) * world_size + rank


def train_steps(model: nn.Module, params: list[nn.Parameter], opt, sched, data: Dataset, plan: BatchPlan,
                spec: JobSpec, world_size: int, steps: range,
                on_step: Callable[[int, float, float, int, float], None] | None = None) -> list[float]:
    """Optimizer steps in one process over the batches that ``world_size`` workers would see.

    Each step averages the loss of every (micro-step, rank) batch, as data-parallel training does,
    so world_size=N in one process is the unsharded reference for an N-worker run.

    Returns:
        The loss of each step (mean over its micro-batches).
    """
    model.train()
    ga = spec.train.grad_accum
    losses = []
    for step in steps:
        t0 = time.time()
        tokens, loss_sum = 0, 0.0
        for micro in range(ga):
            for rank in range(world_size):
                index = global_index(step, micro, rank, ga, world_size)
                batch = micro_batch(data, plan, index)
                seed_batch(spec.train.seed, index)
                out = model(**batch)
                (out.loss / (ga * world_size)).backward()
                loss_sum += out.loss.detach().item()
                tokens += int(batch["attention_mask"].sum())
        if spec.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, spec.train.max_grad_norm)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = loss_sum / (ga * world_size)
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower train.lr")
        losses.append(loss)
        if on_step:
            on_step(step, loss, lr, tokens, time.time() - t0)
    return losses


def make_optimizer(params: list[nn.Parameter], spec: JobSpec):
    opt = torch.optim.AdamW(params, lr=spec.train.lr, weight_decay=spec.train.weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(spec))


def reference_losses(spec: JobSpec, world_size: int, steps: int) -> list[float]:
    """The first ``steps`` losses of an unsharded single-process int8 run on the batches that a
    ``world_size``-worker run sees: the parity guard's reference."""
    seed_everything(spec.train.seed)
    lm = load_model(spec.model.base, lora_or_none(spec), spec.model.quantization, seed=spec.train.seed)
    if spec.train.activation_checkpointing:
        enable_activation_checkpointing(lm.model)
    data = prepare_data(spec, lm.tokenizer)
    params = trainable_parameters(lm.model)
    opt, sched = make_optimizer(params, spec)
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed)
    return train_steps(lm.model, params, opt, sched, data, plan, spec, world_size, range(1, steps + 1))


def artifact_dir(spec: JobSpec, job_id: str) -> Path:
    return Path(spec.output.dir).expanduser() / f"{spec.name}-{job_id}"


def base_manifest(spec: JobSpec, model_dir: Path, quantized: int, trainable: int, data_path: str | None,
                  job_id: str, world_size: int, zero_stage: int, architecture: str) -> dict[str, Any]:
    return {
        "name": spec.name,
        "job_id": job_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": {"id": spec.model.base, "fingerprint": fingerprint(model_dir), "architecture": architecture},
        "quantization": spec.model.quantization,
        "quantized_modules": quantized,
        "lora": {"r": spec.lora.r, "alpha": spec.lora.alpha, "dropout": spec.lora.dropout,
                 "targets": list(spec.lora.targets), "use_rslora": spec.lora.use_rslora, "init": spec.lora.init},
        "trainable_params": trainable,
        "world_size": world_size,
        "zero_stage": zero_stage,
        "data": {"source": spec.data.source, "path": data_path, "max_length": spec.data.max_length},
        "spec": spec.to_dict(),
        "versions": adapter_mod.versions(),
    }


def write_job_artifact(spec: JobSpec, job_id: str, lora: dict, model_dir: Path, injection, trainable: int,
                       world_size: int, zero_stage: int, architecture: str, results: dict[str, Any],
                       metrics_file: Path, extra_manifest: dict[str, Any] | None = None,
                       full_state: dict[str, torch.Tensor] | None = None, tie_word_embeddings: bool = False,
                       dest_root: Path | None = None) -> Path:
    """Manifest + PEFT config + atomic write of the artifact for a finished job.

    ``lora`` is the gathered LoRA pairs; for ``train.method: full`` pass ``full_state`` instead.
    ``dest_root`` overrides output.dir (a local staging directory before an upload to a URI).
    """
    final = (dest_root / f"{spec.name}-{job_id}") if dest_root else artifact_dir(spec, job_id)
    from lora_dist.plot import loss_curve_png

    manifest = base_manifest(spec, model_dir, len(injection.quantized), trainable, spec.data.path, job_id,
                             world_size=world_size, zero_stage=zero_stage, architecture=architecture)
    manifest.update(results)
    manifest.update(extra_manifest or {})
    extra_files = [metrics_file, loss_curve_png(metrics_file, metrics_file.parent / LOSS_CURVE_FILE)]
    if spec.train.method == "full":
        manifest["method"] = "full"
        return adapter_mod.write_full_artifact(final, full_state, model_dir, manifest,
                                               tie_word_embeddings, extra_files=extra_files)
    config = adapter_mod.peft_config(lora, spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.use_rslora,
                                     spec.lora.init, spec.model.base,
                                     fan_in_fan_out=any(n in injection.transposed for n in injection.lora))
    return adapter_mod.write_artifact(final, lora, config, manifest, spec.output.adapter_dtype,
                                      extra_files=extra_files)


def train_local(spec: JobSpec, job_id: str | None = None, stream=sys.stdout) -> Path:
    """Train in this process (no Ray, no DeepSpeed) and write the artifact.

    Returns:
        The artifact directory.

    Raises:
        SpecError, ModelError, DataError, ArtifactError: bad input, with the field named.
    """
    job_id = job_id or adapter_mod.new_job_id()
    final = artifact_dir(spec, job_id)
    if final.exists():
        raise adapter_mod.ArtifactError(f"{final} already exists")
    seed_everything(spec.train.seed)
    t_load = time.time()
    lm = load_model(spec.model.base, lora_or_none(spec), spec.model.quantization, seed=spec.train.seed)
    model = lm.model
    if spec.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    print(f"model {spec.model.base}: {len(lm.injection.quantized)} int8 linears, "
          f"{len(lm.injection.lora)} LoRA modules, {lm.trainable_params:,} trainable parameters "
          f"(loaded in {time.time() - t_load:.1f} s)", file=stream, flush=True)
    data = prepare_data(spec, lm.tokenizer)
    print(f"data: {len(data.train)} train examples ({data.n_train_prompts} prompts), "
          f"{len(data.val)} validation ({data.n_val_prompts} prompts)", file=stream, flush=True)

    params = trainable_parameters(model)
    opt, sched = make_optimizer(params, spec)
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed)
    vbatches = val_batches(data, spec)

    work = final.parent / f".{final.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    progress = Progress(spec.train.max_steps, work / adapter_mod.METRICS_FILE, stream)
    val_before = evaluate(model, vbatches)
    progress.record({"step": 0, "val_loss": val_before})

    def on_step(step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        rec = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": tokens / seconds}
        progress.record(rec, step % spec.train.log_every == 0 or step == spec.train.max_steps)
        if spec.train.eval_every and step % spec.train.eval_every == 0 and step < spec.train.max_steps:
            progress.record({"step": step, "val_loss": evaluate(model, vbatches)})

    losses = train_steps(model, params, opt, sched, data, plan, spec, world_size=1,
                         steps=range(1, spec.train.max_steps + 1), on_step=on_step)
    loss_value = losses[-1]
    val_after = evaluate(model, vbatches)
    progress.record({"step": spec.train.max_steps, "val_loss": val_after})

    full = spec.train.method == "full"
    out = write_job_artifact(spec, job_id, {} if full else adapter_mod.collect_lora(model), lm.model_dir,
                             lm.injection, lm.trainable_params, world_size=1, zero_stage=0,
                             architecture=type(model).__name__,
                             results={"steps": spec.train.max_steps, "final_loss": loss_value,
                                      "val_loss_before": val_before, "val_loss_after": val_after},
                             metrics_file=work / adapter_mod.METRICS_FILE,
                             full_state=model.state_dict() if full else None,
                             tie_word_embeddings=bool(getattr(model.config, "tie_word_embeddings", False)))
    shutil.rmtree(work, ignore_errors=True)
    return out
