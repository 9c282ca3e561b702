"""Every check a job passes before anything starts, beyond the spec's own (spec.load_spec), in one
place. Which checks an entry point makes depends on where it runs:

    where    who                                                  checks
    train    lora-dist train (train.train_local): one process     key, fp16, model, packing, data, chat, tracking
    submit   a job handed to the embedded local Ray               key, model, packing, data, chat, tracking, memory
    remote   lora-dist submit --address (the client side)         nodes, model, packing, data, chat, memory
    cluster  jobrun: the cluster side of the Jobs API             key, output root
    build    a process about to build the model and train:        packing, tracking
             a Ray worker, the parity reference

    key          $LORA_DIST_SIGNING_KEY, where set, is a key: set but empty would silently mean
                 unsigned (store.signing_key)
    fp16         train.dtype fp16 needs DeepSpeed's loss scaling on GPU workers: never in one process
                 (device.local_placement); a spec asking for it without GPUs is refused by the spec
    model        lora.targets and lora.r against the architecture, and the stored weights
                 against it, on a skeleton without weights (model.check_model); a hub id from
                 its config.json alone (no weights are downloaded before the job runs)
    memory       the plan per worker within the memory its workers will have: this machine's available
                 memory, or the cluster's nodes' (fits.placement_problem); CPU workers only
    packing      data.batching: packed only where attention keeps packed examples apart
                 (data.check_packing)
    data         the data read and split as the run will, every row checked, no tokenizer
                 (sources.check_data): a bad file is named with its row before anything starts
    chat         data.source: chat has a chat template (data.chat_template or the tokenizer's) whose
                 assistant turns can be located and end on a special token, on the tokenizer alone
                 (chat.check_chat)
    nodes        a job of several workers writes where every node sees it (store.multi_node_storage_problem)
    output root  a local output.dir under the cluster's $LORA_DIST_OUTPUT_ROOT (store.output_root_problem)
    data root    a local data.path / data.val_path under the cluster's $LORA_DIST_DATA_ROOT, else its
                 output root (datafiles.data_root_problem); a storage or hub URI is the storage's business
    tracking     tracking.mlflow / tracking.tensorboard need their package here (tracking.missing_packages)

Imports nothing heavy until a check that needs it runs: ``lora-dist submit --address`` checks the
spec without torch.
"""

from __future__ import annotations

from typing import Literal

from lora_dist.hub import hub_ref, pin
from lora_dist.spec import JobSpec, SpecError
from lora_dist.datafiles import data_root_problem
from lora_dist.store import data_roots, multi_node_storage_problem, output_root_problem, signing_key

Where = Literal["train", "submit", "remote", "cluster", "build"]
CHECKS: dict[str, tuple[str, ...]] = {
    "train": ("key", "fp16", "model", "packing", "data", "chat", "tracking"),
    "submit": ("key", "model", "packing", "data", "chat", "tracking", "memory"),
    "remote": ("nodes", "model", "packing", "data", "chat", "memory"),
    "cluster": ("key", "output_root", "data_root"),
    "build": ("packing", "tracking"),
}


def validate_job(spec: JobSpec, where: Where, source: str | None = None, address: str | None = None) -> None:
    """Make the checks of ``where`` (see the module's table) on a validated spec.

    Args:
        spec: the job spec (spec.load_spec has checked it on its own).
        where: which entry point asks.
        source: the spec's file, named in a SpecError.
        address: the cluster's dashboard URL (``remote``): whose nodes the memory check reads.

    Raises:
        SpecError: output.dir outside the output root or not seen by every node, train.dtype
            fp16 in one process, or a plan over the memory the job's workers will have.
        ModelError: lora.targets or lora.r do not fit the model, or its weight files do not.
        SettingError: $LORA_DIST_SIGNING_KEY is set but empty.
        DataError: data.batching packed on a model whose packed examples would attend to each other,
            data that is not what data.source reads (naming the file, the row and the problem), or
            data.source chat without a usable chat template.
    """
    checks = CHECKS[where]
    if "key" in checks:
        signing_key()  # before anything starts: a job must not run to its export to find it unusable
    problems = []
    if "output_root" in checks:
        problems.append(output_root_problem(spec.output.dir))
    if "data_root" in checks:
        problems += [data_root_problem(f"data.{k}", getattr(spec.data, k), data_roots()) for k in ("path", "val_path")]
    if "nodes" in checks:
        problems.append(multi_node_storage_problem(spec.output.dir, spec.cluster.workers, spec.output.shared))
    if "fp16" in checks:
        from lora_dist.device import local_placement

        try:
            local_placement(spec)
        except ValueError as e:
            problems.append(str(e))
    if "tracking" in checks:
        from lora_dist.tracking import missing_packages

        problems += missing_packages(spec.tracking)
    problems = [p for p in problems if p]
    if problems:
        raise SpecError(problems, source)
    refs: list[str] = []

    def base() -> str:  # model.base, a hub branch pinned to its commit once (later reads hit the cache)
        if not refs:
            refs.append(pin(hub_ref(spec.model)))
        return refs[0]

    if "model" in checks:
        from lora_dist.model import check_model

        check_model(base(), spec.injected_lora, spec.model.quantization)
    if "packing" in checks and spec.data.batching == "packed":
        from lora_dist.data import check_packing
        from lora_dist.base import model_type

        check_packing(model_type(base()))
    if "data" in checks:
        from lora_dist.sources import check_data
        from lora_dist.store import cache_root

        check_data(spec.data, cache_root())
    if "chat" in checks and (spec.data.source == "chat" or spec.data.chat_template is not None):
        from lora_dist.base import tokenizer_source
        from lora_dist.chat import check_chat

        check_chat(spec.data, tokenizer_source(base()))  # a hub model's tokenizer alone: no weights yet
    if "memory" in checks and spec.cluster.gpus_per_worker == 0:  # last: with --address it asks the cluster
        problem = _memory_problem(spec, base(), where, address)
        if problem:
            raise SpecError([problem], source)


def _memory_problem(spec: JobSpec, base: str, where: Where, address: str | None) -> str | None:
    from lora_dist.fits import cluster_nodes, job_need, placement_problem, this_machine

    if where == "remote":
        if not address or not address.startswith(("http://", "https://")):
            return None  # a ray:// client address has no State API to read the nodes from
        nodes, named = cluster_nodes(address), f"the cluster at {address}"
    else:
        nodes, named = this_machine(), "this machine"
    return placement_problem(job_need(spec, base), nodes, named)
