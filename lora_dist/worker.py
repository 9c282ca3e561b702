"""``train_loop_per_worker``: one Ray Train worker of a job (DeepSpeed ZeRO over the int8 base).

The spec arrives as a plain dict (the Ray boundary) and is validated back into a JobSpec at once.
Every worker computes its own batches from (step, rank) alone, so after a restart it continues
exactly where the last complete checkpoint left off: no batch skipped, none trained twice.
"""

from __future__ import annotations

import json
import os
import warnings
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lora_dist import engine as eng
from lora_dist.data import BatchPlan
from lora_dist.model import resolve_base
from lora_dist.spec import spec_from_dict
from lora_dist.train import (evaluate, global_index, lr_lambda, micro_batch, prepare_data, seed_batch, seed_everything,
                             val_batches)


class ParityError(RuntimeError):
    """The sharded run's loss left the unsharded reference's by more than the tolerance."""


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.random.get_rng_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["torch"])
    random.setstate(state["python"])


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    from transformers import AutoConfig, AutoTokenizer

    # DeepSpeed still calls torch.distributed's *_tensor collectives; torch warns on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated")
    spec = spec_from_dict(config["spec"])
    job_id: str = config["job_id"]
    work_dir = Path(config["work_dir"])  # shared by the job's workers on this machine / filesystem
    cuda = spec.cluster.gpus_per_worker > 0
    rank, world = eng.init_distributed(cuda)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if not cuda:
        torch.set_num_threads(max(1, spec.cluster.cpus_per_worker))
    dtype = torch.bfloat16 if cuda else torch.float32
    seed_everything(spec.train.seed + rank)
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    (work_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    nodes: list[Any] = [None] * world
    dist.all_gather_object(nodes, _node_id())

    t0 = time.time()
    model_dir = resolve_base(spec.model.base)
    hf_config = AutoConfig.from_pretrained(model_dir)
    ds_cfg = eng.ds_config(spec, world, cuda)
    model, injection = eng.build_sharded(hf_config, spec, ds_cfg)
    eng.stream_weights(model, model_dir, injection, rank, dtype)
    eng.init_lora_sharded(model, spec.train.seed, rank)
    if spec.train.activation_checkpointing:
        from lora_dist.model import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    engine, _, _ = eng.initialize(model, ds_cfg, lr_lambda(spec))
    parts = eng.partition_report(model)
    log(f"[rank 0/{world}] model {spec.model.base} sharded (ZeRO-{spec.cluster.zero_stage}) in "
        f"{time.time() - t0:.1f} s: int8 base {parts['int8_local_bytes']:,} of {parts['int8_full_bytes']:,} "
        f"bytes on this rank; {trainable:,} trainable parameters")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = prepare_data(spec, tokenizer)
    plan = BatchPlan(len(data.train), spec.train.micro_batch_size, spec.train.seed)
    vbatches = val_batches(data, spec)

    start = 1
    resumed_from = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            final = Path(d) / FINAL_FILE
            if final.is_file():  # this job already finished: a retry only reports its artifact again
                _report_final(json.loads(final.read_text()), rank)
                return
            state = eng.load_checkpoint(engine, Path(d))
        start = int(state["step"]) + 1
        resumed_from = int(state["step"])
        _set_rng_state(state["rng"][rank])
        log(f"resumed from the checkpoint of step {resumed_from}")

    metrics_path = work_dir / "metrics.jsonl"
    if resumed_from is not None and rank == 0 and metrics_path.is_file():
        # Steps after the checkpoint are trained again from its state: keep the history that the
        # final weights actually went through.
        kept = [line for line in metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_from]
        kept.append(json.dumps({"step": resumed_from, "resumed_from": resumed_from}))
        metrics_path.write_text("\n".join(kept) + "\n")

    def record(rec: dict[str, Any]) -> None:
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    val_before = None
    if start == 1:
        val_before = _evaluate_sharded(engine, vbatches, device)
        record({"step": 0, "val_loss": val_before})
        log(f"step 0  val_loss {val_before:.4f}")
    reference = config.get("parity_reference")
    parity_max = 0.0
    ga = spec.train.grad_accum
    loss_value = float("nan")
    t_run = time.time()
    for step in range(start, spec.train.max_steps + 1):
        engine.train()
        t_step = time.time()
        tokens = 0
        loss_sum = torch.zeros((), dtype=torch.float64)
        for micro in range(ga):
            index = global_index(step, micro, rank, ga, world)
            batch = {k: v.to(device) for k, v in micro_batch(data, plan, index).items()}
            seed_batch(spec.train.seed, index)
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            loss_sum += out.loss.detach().double().cpu()
            tokens += int(batch["attention_mask"].sum())
        stats = torch.tensor([float(loss_sum) / ga, tokens, eng.peak_memory_bytes(cuda),
                              parts["int8_local_bytes"]], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
        loss_value = sum(float(g[0]) for g in gathered) / world
        seconds = time.time() - t_step
        rec = {"step": step, "loss": loss_value, "lr": _lr_used(spec, step),
               "tokens_per_s": sum(float(g[1]) for g in gathered) / seconds, "step_s": seconds,
               "peak_memory_bytes": [int(g[2]) for g in gathered],
               "int8_partition_bytes": [int(g[3]) for g in gathered]}
        if reference is not None and step <= len(reference):
            diff = abs(loss_value - reference[step - 1])
            parity_max = max(parity_max, diff)
            rec["parity_diff"] = diff
            if diff > spec.train.parity_tolerance:
                raise ParityError(f"parity check failed at step {step}: sharded loss {loss_value:.6f}, unsharded "
                                  f"reference {reference[step - 1]:.6f}, difference {diff:.2e} > "
                                  f"train.parity_tolerance {spec.train.parity_tolerance:g}")
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"loss became {loss_value} at step {step}; lower train.lr")
        record(rec)
        if step % spec.train.log_every == 0 or step == spec.train.max_steps:
            elapsed = time.time() - t_run
            eta = elapsed / (step - start + 1) * (spec.train.max_steps - step)
            log(f"step {step}/{spec.train.max_steps}  loss {loss_value:.4f}  lr {rec['lr']:.2e}  "
                f"tok/s {rec['tokens_per_s']:.0f}  mem/rank {max(rec['peak_memory_bytes']) / 2**30:.2f} GiB  "
                f"eta {eta:.0f}s")
        if spec.train.eval_every and step % spec.train.eval_every == 0 and step < spec.train.max_steps:
            v = _evaluate_sharded(engine, vbatches, device)
            record({"step": step, "val_loss": v})
            log(f"step {step}  val_loss {v:.4f}")
        if spec.train.checkpoint_every and step % spec.train.checkpoint_every == 0 and step < spec.train.max_steps:
            _checkpoint(engine, step, rank, world, {"loss": loss_value, "step": step})

    val_after = _evaluate_sharded(engine, vbatches, device)
    record({"step": spec.train.max_steps, "val_loss": val_after})
    log(f"step {spec.train.max_steps}  val_loss {val_after:.4f}")
    full = spec.train.method == "full"
    lora = None if full else eng.gather_lora(model, rank)
    full_state = eng.gather_full_state(engine) if full else None
    location = None
    if rank == 0:
        from lora_dist.jobs import is_uri, publish
        from lora_dist.train import write_job_artifact

        extra = {"resumed_from_step": resumed_from, "parity_max_loss_diff": parity_max if reference else None,
                 "nodes": nodes, "int8_partition_bytes": parts["int8_local_bytes"],
                 "int8_full_bytes": parts["int8_full_bytes"]}
        results = {"steps": spec.train.max_steps, "final_loss": loss_value, "val_loss_before": val_before,
                   "val_loss_after": val_after}
        out = write_job_artifact(spec, job_id, lora, model_dir, injection, trainable, world_size=world,
                                 zero_stage=spec.cluster.zero_stage, architecture=type(model).__name__,
                                 results=results, metrics_file=metrics_path, extra_manifest=extra,
                                 full_state=full_state,
                                 tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
                                 dest_root=work_dir / "staging" if is_uri(spec.output.dir) else None)
        location = publish(out, spec.output.dir) if is_uri(spec.output.dir) else str(out)
        log(f"artifact written: {location}")
    dist.barrier()
    _report_final({"step": spec.train.max_steps, "loss": loss_value, "artifact": location}, rank)


FINAL_FILE = "final.json"


def _report_final(final: dict[str, Any], rank: int) -> None:
    """Report the finished job as a tiny checkpoint holding the artifact's location: Ray Train
    keeps the metrics of checkpoints (the driver reads them from the Result), and a retried job
    finds it and does not train again."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="lora-dist-final-"))
    try:
        checkpoint = None
        if rank == 0:
            (tmp / FINAL_FILE).write_text(json.dumps(final))
            checkpoint = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report({**final, "done": True}, checkpoint=checkpoint)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _lr_used(spec, step: int) -> float:
    return spec.train.lr * lr_lambda(spec)(step - 1)


def _evaluate_sharded(engine, batches, device) -> float:
    # Under ZeRO-3 a forward is collective: every rank runs the same validation batches.
    return evaluate(engine, batches, device)


def _checkpoint(engine, step: int, rank: int, world: int, metrics: dict[str, Any]) -> None:
    import ray.train

    rng = [None] * world
    dist.all_gather_object(rng, _rng_state())
    tmp = Path(tempfile.mkdtemp(prefix=f"lora-dist-ckpt{step}-r{rank}-"))
    try:
        eng.save_checkpoint(engine, tmp, step, {"step": step, "rng": rng}, rank)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
