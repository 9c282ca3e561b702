"""Will a job fit the memory its workers will have? Asked before anything starts.

A job whose plan (``plan.memory_terms``, the same arithmetic as ``lora-dist plan``) is over the
memory its workers will have is refused with both figures (exit 2) instead of being started and
killed by Ray's memory monitor or the kernel. The memory a worker will have is its node's shared
by the job's workers placed on it:

* on the embedded default, this machine's available memory (capped by its cgroup's limit);
* on a cluster, each alive node's ``memory`` resource (Ray's figure for what tasks and actors may
  reserve: what the node detected at ``ray start``, or what its operator gave ``--memory``), read
  through the cluster's State API.

The job's workers reserve their planned bytes as Ray's ``memory`` resource (``launch._trainer``),
so Ray never places more of them on a node than fit this count. On GPU workers the plan is GPU
memory, which a Ray node does not advertise: the workers check it themselves, before the model is
built, against the least free memory among their GPUs (:func:`device_problem`, from
``worker._choose_stage``), and the job fails with both figures instead of running out of memory.

Under ``cluster.zero_stage: auto`` the check uses ZeRO-3's plan, the least the job can need; the
workers then pick the cheapest stage that fits the memory they find (``plan.choose_zero_stage``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from lora_dist.plan import Setup, fmt_bytes, per_worker_bytes
from lora_dist.spec import JobSpec


@dataclass(frozen=True)
class Node:
    """What a node offers a job's workers."""

    name: str
    memory: int  # bytes its workers may take together


@dataclass(frozen=True)
class Need:
    """What each worker of a job needs, from its plan."""

    bytes: int  # planned peak per worker
    stage: int  # the ZeRO stage planned (auto: 3)
    workers: int
    auto: bool = False  # cluster.zero_stage: auto (the stage planned is the least it can need)


_NEEDS: dict[tuple, Need] = {}  # a process plans a job once (the submit check, then the driver's reservation)


def job_need(spec: JobSpec, base: str | None = None) -> Need:
    """The plan's bytes per worker for ``spec`` on its ``cluster.workers`` CPU workers, counted on
    a meta skeleton (no weights). ``base`` is ``model.base`` already resolved (a hub id pinned)."""
    from lora_dist.hub import hub_ref, pin

    base = base or pin(hub_ref(spec.model))
    t, c = spec.train, spec.cluster
    key = (base, spec.model.quantization, repr(spec.lora), spec.full, c.workers, c.zero_stage, t.micro_batch_size,
           spec.data.max_length, t.dtype, t.activation_checkpointing)
    if key not in _NEEDS:
        _NEEDS[key] = _plan_need(spec, base)
    return _NEEDS[key]


def _plan_need(spec: JobSpec, base: str) -> Need:
    from lora_dist.counting import count_activations, count_model

    method = "full" if spec.full else "lora"
    setup = Setup(workers=spec.cluster.workers, micro_batch=spec.train.micro_batch_size,
                  seq_len=spec.data.max_length, device="cpu", dtype=spec.train.dtype,
                  activation_checkpointing=spec.train.activation_checkpointing)
    counts = count_model(base, spec.lora, spec.model.quantization)
    acts = {method: count_activations(base, spec.injected_lora, spec.model.quantization, setup.micro_batch,
                                      setup.seq_len, setup.dtype_name, method=method, device="cpu")}
    stage = 3 if spec.cluster.zero_stage == "auto" else spec.cluster.zero_stage
    return Need(per_worker_bytes(counts, "full" if spec.full else "lora_int8_zero3", setup, acts, stage), stage,
                spec.cluster.workers, spec.cluster.zero_stage == "auto")


def room(node: Node, need: Need) -> int:
    """How many of the job's workers ``node`` holds: its memory shared among them. (CPUs are Ray's
    to wait for: a job short of them is PENDING until they free up, not refused.)"""
    return int(node.memory // max(1, need.bytes))


def placement_problem(need: Need, nodes: Sequence[Node], where: str) -> str | None:
    """Why the job's workers cannot all be placed within ``nodes``' memory, with the plan's figure
    and the memory each worker would have; None where they can."""
    held = {n.name: room(n, need) for n in nodes}
    if sum(held.values()) >= need.workers:
        return None
    plan = (f"the plan needs {fmt_bytes(need.bytes)} per worker (ZeRO-{need.stage}"
            f"{', the least cluster.zero_stage auto can need' if need.auto else ''}; `lora-dist plan`)")
    if len(nodes) == 1:
        n = nodes[0]
        have = f"{where} has {fmt_bytes(n.memory)} available"
        if need.workers > 1:
            have += f" for its {need.workers} workers, {fmt_bytes(n.memory // need.workers)} each"
    else:
        have = f"the nodes of {where} hold {sum(held.values())} of its {need.workers} workers (" + ", ".join(
            f"{n.name}: {fmt_bytes(n.memory)}, room for {held[n.name]}" for n in nodes) + ")"
    return (f"cluster.workers: this job will not fit: {plan}; {have}. Use fewer workers per node (more nodes), "
            f"a smaller train.micro_batch_size or data.max_length, train.activation_checkpointing, or nodes with "
            f"more memory")


def device_problem(need: int, stage: int, free: int, device: str, auto: bool = False) -> str | None:
    """Why a job on GPU workers will not fit: the plan per worker (``need`` bytes at ZeRO-``stage``)
    against ``free``, the least free memory among the workers' devices; None when it fits."""
    if need <= free:
        return None
    return (f"cluster.gpus_per_worker: this job will not fit: the plan needs {fmt_bytes(need)} per worker "
            f"(ZeRO-{stage}{', the least cluster.zero_stage auto can need' if auto else ''}; `lora-dist plan`); "
            f"the worker with the least has {fmt_bytes(free)} free on its {device}. Use more workers (ZeRO-3 shards "
            f"the base across them), GPUs with more memory, a smaller train.micro_batch_size or data.max_length, "
            f"or train.activation_checkpointing")


def this_machine() -> list[Node]:
    """The embedded default's one node: this machine's available memory (cgroup-capped)."""
    from lora_dist.device import available_bytes

    return [Node("this machine", available_bytes("cpu"))]


def cluster_nodes(address: str) -> list[Node]:
    """The alive nodes of the cluster at ``address`` (its dashboard URL), each with its ``memory``
    resource as Ray advertises it, through the State API (token auth as the Jobs API client uses
    it).

    Raises:
        JobError: the cluster cannot be reached (exit 3), as for every ``--address`` command.
    """
    from ray.util.state import list_nodes

    from lora_dist.errors import JobError
    from lora_dist.jobs import client

    client(address)  # reachable, with the token (retried as every --address command is); else JobError, exit 3
    try:
        nodes = list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    except Exception as e:  # the Jobs API answered and the State API did not
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise JobError(f"cannot read the nodes of the cluster at {address} through its State API: {last}") from None
    out = []
    for n in nodes:
        res = n.resources_total or {}
        name = n.node_name or n.node_ip or n.node_id[:12]
        out.append(Node(name, int(res.get("memory", 0))))
    return out


# --- a worker killed for memory anyway --------------------------------------------------------------

_NODE_RE = re.compile(r"was ([\d.]+)GB used / ([\d.]+)GB limit")
_WORKER_RE = re.compile(r"^\s*\d+\s+([\d.]+)\s+ray::(?:RayTrainWorker|_RayTrainWorker)", re.M)


def killed_for_memory(error: BaseException) -> str | None:
    """One line saying a worker was killed for memory, with what the node and the largest worker
    held when it was (from Ray's message); None when ``error`` is not that."""
    from lora_dist.jobs import chain_text

    text = chain_text(error)
    if "OutOfMemoryError" not in text and "killed due to memory" not in text and "OOM kill" not in text:
        return None
    node = _NODE_RE.search(text)
    workers = [float(x) for x in _WORKER_RE.findall(text)]
    held = []
    if workers:
        held.append(f"its largest worker held {max(workers):.2f} GB")
    if node:
        held.append(f"the node {node.group(1)} GB used of {node.group(2)} GB")
    return "a worker was killed for memory by Ray's memory monitor" + (f" ({'; '.join(held)})" if held else "")
