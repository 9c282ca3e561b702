"""The records a job writes to storage, typed: the artifact's ``manifest.json`` (:class:`Manifest`)
and a checkpoint's ``state.json`` (:class:`CheckpointState`). No torch.

Their JSON keys are contracts (an artifact written by an earlier version loads and verifies;
``tests/data`` holds one of each): each field here is named as its key, and a record is written
with :meth:`Record.to_json`, which leaves out the fields its writer did not set, so that a
single-process run's manifest has no ``nodes`` key and a checkpoint without early stop no
``early_stop`` key, as before. Writers build a record; readers use its fields.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from lora_dist.errors import ArtifactError

ADAPTER_FORMAT = "lora-dist-adapter/1"


class Record(BaseModel):
    """A frozen record whose every field is a JSON key; an unknown key is refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @classmethod
    def from_json(cls, raw: dict[str, Any], where: str) -> Self:
        """The record of a parsed JSON object read from ``where``.

        Raises:
            ArtifactError: naming the first key that is unknown, missing or of the wrong type.
        """
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            raise ArtifactError(f"{where}: not a {cls.__name__} ({'.'.join(map(str, first['loc']))}: "
                                f"{first['msg']})") from None

    def to_json(self) -> dict[str, Any]:
        """The JSON object as written: the fields that were set, nested records as objects."""
        return self.model_dump(exclude_unset=True)

    def updated(self, **fields: Any) -> Self:
        """A copy with ``fields`` set (validated)."""
        return type(self).model_validate({**self.to_json(), **fields})


# --- the artifact's manifest.json -----------------------------------------------------------------

class BaseModelRecord(Record):
    id: str  # model.base as the spec named it
    fingerprint: str  # of the base's weights (model.fingerprint): the adapter belongs to these
    architecture: str  # the transformers class trained
    revision: str | None = None  # a hub id's model.revision (bases of other kinds: unset)
    commit: str | None = None  # the commit that revision resolved to: what loading the adapter loads


class DataRecord(Record):
    source: str
    path: str | None = None
    max_length: int
    prompt_template: str | None = None  # artifacts from before the record: the source's template then
    special_tokens: dict[str, Any] | None = None  # data.special_tokens: bos, bos_token, eos_token
    chat_template: str | None = None  # data.source chat: the Jinja template rendered with (chat.chat_template)
    chat_template_sha256: str | None = None


class EpochPlan(Record):
    """train.epochs as the steps they take (epochs.planned_steps), fixed at the job's first start:
    a resumed job keeps them, whatever its worker count, so that its schedule is the one it began."""
    epochs: float
    steps: int
    micro_batches_per_epoch: float  # data.BatchPlan.micro_batches over one pass of the training examples
    workers: int
    micro_batch_size: int
    grad_accum: int


class Manifest(Record):
    """``manifest.json``: sha256 of every file, the base's fingerprint, the settings and the run's
    results. Only ``format`` and ``files`` are always there; the rest as the writer set them (a
    worker records its nodes and ZeRO settings, a single process does not).

    The fields are declared in the order they are written, so that the file reads as before.
    """

    format: str = ADAPTER_FORMAT
    # what was trained, from what (adapter.write_job_artifact)
    name: str | None = None
    job_id: str | None = None
    created: str | None = None  # UTC, ISO 8601
    base_model: BaseModelRecord | None = None
    quantization: str | None = None  # of the base as trained: int8 | none
    quantized_modules: int | None = None
    lora: dict[str, Any] | None = None  # the spec's lora section
    trainable_params: int | None = None
    data: DataRecord | None = None
    spec: dict[str, Any] | None = None  # the spec, env var values redacted
    spec_digest: str | None = None  # what this job id is bound to
    versions: dict[str, str] | None = None
    # the run (train.train_local, worker.run_worker)
    world_size: int | None = None
    zero_stage: int | None = None
    zero_stage_reason: str | None = None
    steps: int | None = None  # trained: max_steps, or where early stop ended it
    final_loss: float | None = None
    val_loss_before: float | None = None
    val_loss_after: float | None = None  # of what was exported
    resumed_from_step: int | None = None
    parity_max_loss_diff: float | None = None
    nodes: list[Any] | None = None  # each rank's Ray node
    node_history: list[list[Any]] | None = None  # each attempt that trained, oldest first
    int8_partition_bytes: int | None = None
    int8_full_bytes: int | None = None
    precision: dict[str, str] | None = None  # device.Placement.record
    zero_settings: dict[str, Any] | None = None
    cpus_per_worker: int | None = None  # cluster.cpus_per_worker as resolved (a Ray worker)
    torch_threads: int | None = None  # each process's torch intra-op threads
    # each rank's resident memory before its model was built (CPU: the plan's overhead term)
    process_bytes_before_model: list[int] | None = None
    # model FLOPs utilization (mfu.py): the mean over the steps after the first, its parts
    mfu: float | None = None
    model_flops_per_token: float | None = None  # the dense part; attention adds per token squared
    peak_flops_per_s: float | None = None  # every process's GEMM probe peak in the compute dtype, summed
    epoch_plan: EpochPlan | None = None  # train.epochs
    # train.early_stop_patience (earlystop.EarlyStop.fields)
    best_step: int | None = None
    best_val_loss: float | None = None
    stopped_at: int | None = None
    val_loss_last: float | None = None
    # what the artifact holds (adapter._publish)
    method: Literal["full"] | None = None
    kind: Literal["adapter", "full"] | None = None
    adapter_dtype: str | None = None
    adapter_bytes: int | None = None
    model_bytes: int | None = None
    files: dict[str, str] = {}  # name -> sha256
    signature: str | None = None  # hmac-sha256 (store.manifest_signature), with $LORA_DIST_SIGNING_KEY


# --- a checkpoint's state.json --------------------------------------------------------------------

class LoraShape(Record):
    """What rebuilds a LoRA pair from its two tensors (lora.LoraTensors without them)."""
    r: int
    slices: list[tuple[int, int]]  # the output rows each slice of a fused projection covers
    out_features: int


class EarlyStopState(Record):
    """earlystop.EarlyStop as a checkpoint carries it (the best adapter's tensors beside it, best/...)."""
    best_step: int | None
    best_val: float
    since: int  # validations since the best
    stopped_at: int | None
    last_val: float | None
    modules: dict[str, LoraShape]



class CheckpointState(Record):
    """``state.json`` of a resumable checkpoint (written by the worker, on the main process)."""

    step: int
    loss: float = math.nan  # of the step (checkpoints from before the record: unknown)
    next_index: int  # the BatchPlan index the run continues at
    world_size: int  # how many workers wrote it (RNG states are restored only at the same count)
    scalars: dict[str, Any]  # engine.gather_train_state: optimizer step count, scheduler state
    rng: list[dict[str, Any]]  # each rank's RNG states
    spec: dict[str, Any]  # redacted
    spec_digest: str
    val_loss_before: float | None = None
    node_history: list[list[Any]] = []  # each attempt's nodes, this one last
    early_stop: EarlyStopState | None = None  # with train.early_stop_patience
    epoch_plan: EpochPlan | None = None  # with train.epochs
