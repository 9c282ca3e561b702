"""The job spec: YAML in, a validated, typed, frozen JobSpec out. No torch, no ray.

Each section is a pydantic model: the library checks types, unknown keys and ranges; the few
checks that look at the world (does this file exist) or at two fields at once are written out
below. Every problem in a spec is reported at once, each line naming its field
(``lora.r: must be from 1 to 4096, got 0``). Command-line overrides (``--set
train.max_steps=5``) are applied to the raw mapping before validation, so they are checked
exactly like the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, get_args

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError, \
    ValidationInfo, field_validator, model_validator

from lora_dist import safeyaml
from lora_dist.confine import uri_problem
from lora_dist.datafiles import location_problem
from lora_dist.hub import DEFAULT_REVISION, is_hub_id, revision_problem
from lora_dist.runtime_env import runtime_env_problems
from lora_dist.specid import Short
from lora_dist.store import URI_SCHEMES, is_uri
from lora_dist.tracking import MlflowUri, absolute_target

BUILTIN_MODELS = ("smollm2-135m",)
# Public architectures without weights here: `lora-dist plan` only (exact counts on the meta device).
SHAPES: dict[str, dict[str, Any]] = {
    "gpt3-175b": {"model_type": "gpt2", "n_layer": 96, "n_embd": 12288, "n_head": 96, "n_positions": 2048,
                  "vocab_size": 50257},
    "llama2-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                  "tie_word_embeddings": False},
    "llama2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                   "tie_word_embeddings": False},
}
LINEAR_TARGET_ALL = "all-linear"
MAX_SPEC_BYTES = 1 << 20  # a job spec is a few hundred bytes
MAX_SPEC_NODES, MAX_SPEC_DEPTH = safeyaml.MAX_NODES, safeyaml.MAX_DEPTH  # YAML nodes (aliases expanded), nesting
SOURCE_COLUMNS = {"e2e": ("mr", "ref"), "jsonl": ("prompt", "completion"), "chat": ("messages",),
                  "alpaca": ("instruction", "input", "output"), "text": ("text",)}


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MODULE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A job spec is invalid. ``problems`` lists one message per field."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid job spec{where}:\n" + "\n".join(f"  - {p}" for p in problems))


def _number(value: Any) -> Any:
    # YAML 1.1 reads 2e-4 as a string: accept numeric strings; refuse booleans (True is not 1.0).
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    return value


def _names(value: Any) -> Any:
    return (value,) if isinstance(value, str) else value


Number = Annotated[float, BeforeValidator(_number)]
Int = StrictInt
Names = Annotated[tuple[Annotated[str, Field(min_length=1)], ...], BeforeValidator(_names), Field(min_length=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelSpec(_Section):
    """The frozen base model."""

    base: str = Field("smollm2-135m", min_length=1, description=(
        "The base: a built-in id (`smollm2-135m`), a Hugging Face hub id `ORG/NAME` or a local directory of a "
        "dense decoder-only causal LM (config.json + safetensors; docs/how-it-works.md: Base models, Hub models), or a "
        "planning shape without weights (`gpt3-175b`, `llama2-7b`, `llama2-70b`: `lora-dist plan` only)."))
    revision: str = Field(DEFAULT_REVISION, exclude_if=lambda v: v == DEFAULT_REVISION, description=(
        "A hub id's branch, tag or commit; the manifest records the commit it resolved to."))
    quantization: Literal["int8", "none"] = Field("int8", description=(
        "`int8`: every linear layer inside the decoder blocks is stored int8 with a per-row absmax scale; "
        "`none`: the base stays float."))

    @field_validator("base")
    @classmethod
    def _base_exists(cls, base: str) -> str:
        if base in BUILTIN_MODELS or base in SHAPES or is_hub_id(base):
            return base
        bp = Path(base).expanduser()
        if not bp.is_dir():
            raise ValueError(f"{base!r} is neither a built-in id ({', '.join(BUILTIN_MODELS)}), "
                             f"a planning shape ({', '.join(SHAPES)}), a hub id (ORG/NAME) nor an existing directory")
        if not (bp / "config.json").is_file():
            raise ValueError(f"{bp} has no config.json (expected a Hugging Face model directory)")
        return base  # its weight files and format: base.check_model_dir

    @field_validator("revision")
    @classmethod
    def _revision(cls, revision: str, info: ValidationInfo) -> str:
        if problem := revision_problem(revision, info.data.get("base")):
            raise ValueError(problem)
        return revision


class LoraSpec(_Section):
    """The LoRA pairs: h = W0 x + (alpha / r) B A x."""

    r: Annotated[Int, Ge(1), Le(4096)] = Field(8, description="The rank of A and B.")
    alpha: Annotated[Number, Gt(0)] = Field(16.0, description="The scaling: B A x is multiplied by alpha / r.")
    dropout: Annotated[Number, Ge(0), Lt(1)] = Field(0.05, description="Dropout on the LoRA input.")
    targets: Names = Field(("q_proj", "v_proj"), description=(
        "Module names to put LoRA on, or `all-linear` (every linear layer of the decoder blocks). GPT-2's fused "
        "`c_attn` gets LoRA on its q and v slices only, as in the paper."))
    init: Literal["kaiming", "gaussian"] = Field("kaiming", description=(
        "How A starts: `kaiming` (as loralib) or `gaussian` (std 1/r); B always starts at zero."))
    use_rslora: StrictBool = Field(False, description="rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.")

    @field_validator("targets")
    @classmethod
    def _target_names(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if LINEAR_TARGET_ALL in targets and len(targets) > 1:
            raise ValueError(f"'{LINEAR_TARGET_ALL}' stands alone, got {list(targets)}")
        bad = [t for t in targets if not MODULE_NAME_RE.match(t)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a module name")
        return targets


class DataSpec(_Section):
    """The training data and how it becomes batches."""

    source: Literal["e2e", "jsonl", "chat", "alpaca", "text"] = Field("e2e", description=(
        "`e2e`: an E2E NLG csv (columns `mr`, `ref`); `jsonl`: `prompt` and `completion` columns, the loss on "
        "completion tokens only; `chat`: OpenAI's fine-tuning format (a `messages` list of `role`/`content` "
        "turns), rendered with the tokenizer's chat template, the loss on assistant turns; `alpaca`: "
        "`instruction`, `input`, `output`; `text`: continued pretraining on a `text` column, the loss on "
        "every token."))
    path: Optional[str] = Field(None, description=(
        "The data: a `.jsonl`, `.json`, `.csv` or `.parquet` file, a `save_to_disk` directory, a storage URI "
        "or `hf://datasets/ORG/NAME`; relative to the directory the command runs from. null (e2e only): the "
        "official E2E release is downloaded and cached."))
    val_path: Optional[str] = Field(None, description="Validation data of its own (then `data.path` is not split).")
    columns: dict[str, str] = Field({}, description="The file's column names for the source's: `{prompt: question}`.")
    revision: Optional[str] = Field(None, description="`hf://datasets/...`: the branch, tag or commit (default main).")
    hf_split: str = Field("train", description="`hf://datasets/...` or a `save_to_disk` DatasetDict: the split read.")
    max_length: Annotated[Int, Ge(8), Le(131072)] = Field(128, description=(
        "Tokens per example (longer ones are cut; chat: after the last whole assistant turn that fits)."))
    val_fraction: Annotated[Number, Gt(0), Lt(1)] = Field(0.1, description=(
        "The share of prompts (E2E: meaning representations) held out for validation."))
    max_val_examples: Annotated[Int, Ge(1)] = Field(256, description=(
        "At most this many held-out examples are kept for validation, spread evenly over the held-out split."))
    batching: Literal["padded", "grouped", "packed"] = Field("grouped", description=(
        "How examples become micro-batches (`data.BatchPlan`): `padded`, consecutive shuffled examples padded "
        "to their longest; `grouped`, neighbours in length batched together within windows of 64 micro-batches "
        "of the shuffled order; `packed`, examples end to end in rows of `data.max_length` tokens "
        "(`train.micro_batch_size` rows per micro-batch), each attending only to itself (Llama, Mistral, Qwen2, "
        "GPT-2 and GPT-NeoX models; refused for others)."))
    split: Literal["name", "mr"] = Field("name", description=(
        "E2E's train/validation split. `name` holds out whole restaurants (every MR of a held-out `name[...]`, "
        "names taken in sha256 order until at least `data.val_fraction` of the MRs is held out), so validation "
        "measures restaurants never trained on, like E2E's unseen test data; `mr` holds out meaning "
        "representations, whose restaurants the training side also has. A jsonl source always splits by prompt; "
        "chat by restaurant where its user turns carry E2E MRs, else by prompt (the turns before the last "
        "assistant turn)."))
    chat_template: Optional[str] = Field(None, description=(
        "`chat` only: a Jinja chat template (as in a tokenizer_config.json) used instead of the tokenizer's, "
        "for a model whose tokenizer has none. The artifact's manifest records the template used."))

    @field_validator("path", "val_path")
    @classmethod
    def _path_exists(cls, path: str | None) -> str | None:
        problem = location_problem(path) if path is not None else None
        if problem:
            raise ValueError(problem)
        return path


class TrainSpec(_Section):
    """The optimization: steps, batches, schedule, validation, checkpoints."""

    method: Literal["lora", "full"] = Field("lora", description=(
        "`lora`: only the LoRA pairs train; `full`: the full fine-tuning baseline, every weight of a float base "
        "trains (needs `model.quantization: none`)."))
    max_steps: Optional[Annotated[Int, Ge(1), Le(10_000_000)]] = Field(100, description=(
        "Optimizer steps; or set `train.epochs` instead (not both)."))
    epochs: Optional[Annotated[Number, Gt(0), Le(1_000_000)]] = Field(None, description=(
        "Passes over the training examples, instead of `max_steps`: the steps they take at the job's worker count "
        "and batches (`epochs.planned_steps`) are printed at start and recorded (manifest `epoch_plan`)."))
    micro_batch_size: Annotated[Int, Ge(1), Le(65536)] = Field(8, description=(
        "Examples per micro-batch on each worker (`packed`: rows)."))
    grad_accum: Annotated[Int, Ge(1), Le(65536)] = Field(1, description="Micro-batches per optimizer step.")
    lr: Annotated[Number, Gt(0), Le(1)] = Field(2e-4, description="AdamW's peak learning rate.")
    warmup_steps: Annotated[Int, Ge(0)] = Field(10, description=(
        "transformers' warmup from 0 (the first step's lr is 0), capped at `max_steps - 1` so that "
        "`--set train.max_steps=5` works."))
    schedule: Literal["linear", "cosine"] = Field("linear", description="The decay to 0 after warmup.")
    weight_decay: Annotated[Number, Ge(0)] = Field(0.0, description="AdamW's weight decay.")
    max_grad_norm: Annotated[Number, Ge(0)] = Field(1.0, description="Gradient clipping norm; 0 disables clipping.")
    seed: Annotated[Int, Ge(0)] = Field(42, description=(
        "Seeds the LoRA initialization, the data order and the dropout masks (with the batch index)."))
    log_every: Annotated[Int, Ge(1)] = Field(1, description="A progress line every N steps.")
    eval_every: Annotated[Int, Ge(0)] = Field(0, description=(
        "Validate every N steps; 0: before and after training only."))
    eval_batches: Annotated[Int, Ge(1)] = Field(8, description=(
        "Micro-batches of validation examples per validation, spread evenly over the held-out split."))
    early_stop_patience: Annotated[Int, Ge(0)] = Field(0, description=(
        "Early stop (0: off; needs `train.eval_every` > 0 and `train.method: lora`): stop after this many "
        "validations in a row (every `eval_every` steps and at the last step) that do not lower the best "
        "validation loss by more than `early_stop_min_delta`, and export the adapter of the best validation "
        "after step 1 (before training is only the baseline). The manifest records `best_step`, "
        "`best_val_loss`, `stopped_at` and `val_loss_last`; checkpoints carry the best adapter, so a resumed "
        "job stops where it would have."))
    early_stop_min_delta: Annotated[Number, Ge(0)] = Field(0.0, description=(
        "The improvement, in nats/token, that counts as lowering the best validation loss."))
    activation_checkpointing: StrictBool = Field(False, description=(
        "Recompute each decoder block's activations in backward: less memory, more compute."))
    checkpoint_every: Annotated[Int, Ge(0)] = Field(0, description=(
        "A LoRA-only resumable checkpoint every N steps; a job on Ray also writes one at its last step "
        "(0: that one only)."))
    parity_check: StrictBool = Field(False, description=(
        "Run an unsharded single-process int8 reference on the same batches first, and fail the job if a "
        "sharded step's loss differs from it by more than `parity_tolerance`."))
    parity_steps: Annotated[Int, Ge(1), Le(1000)] = Field(2, description="Steps the parity check compares.")
    parity_tolerance: Annotated[Number, Gt(0)] = Field(1e-3, description=(
        "The largest allowed |sharded - reference| loss difference, nats/token."))
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description=(
        "Compute dtype of the forward and backward, whatever the checkpoint's config.json says (auto: bf16 on "
        "GPU workers, fp32 on CPU). LoRA master weights and AdamW state stay fp32; fp16 needs GPU workers "
        "(DeepSpeed's dynamic loss scaling)."))

    @model_validator(mode="before")
    @classmethod
    def _steps_from_epochs(cls, raw: Any) -> Any:
        # train.epochs given without max_steps: max_steps has no default then (spec.to_dict keeps the null)
        if isinstance(raw, dict) and raw.get("epochs") is not None and "max_steps" not in raw:
            return {**raw, "max_steps": None}
        return raw


class ClusterSpec(_Section):
    """Where and how wide the job runs."""

    workers: Annotated[Int, Ge(1), Le(4096)] = Field(1, description="Ray Train workers (ranks).")
    zero_stage: Literal["auto", 1, 2, 3] = Field("auto", description=(
        "DeepSpeed ZeRO stage. `auto` (`plan.choose_zero_stage`) runs the cheapest stage whose plan fits the "
        "smallest worker's memory (a GPU's free memory; on CPU the host's available memory shared by the job's "
        "workers on that node): 1 where the int8 base fits replicated within 90% of it (no parameter gathers), "
        "2 where it fits only with the gradients partitioned too, else 3. The manifest records `zero_stage` "
        "and `zero_stage_reason`; `lora-dist plan` shows the choice."))
    gpus_per_worker: Annotated[Int, Ge(0), Le(16)] = Field(0, description=(
        "0: CPU workers (gloo); 1: a GPU each (nccl)."))
    cpus_per_worker: Literal["auto"] | Int = Field("auto", description=(
        "CPUs Ray reserves for each worker (1 to 1024); a CPU worker runs that many torch threads. `auto`: on "
        "the embedded Ray this machine's cores shared by the job's workers (at least 1 each); on a cluster what "
        "its nodes offer each worker (the largest nodes' CPUs divided among the workers placed on each), no more "
        "than the cluster's free CPUs shared by the workers. The manifest records the figure (`cpus_per_worker`, "
        "`torch_threads`)."))
    placement: Literal["pack", "spread"] = Field("pack", description=(
        "Ray's placement of the workers: `pack` them together, or `spread` them one per node where possible."))
    max_failures: Annotated[Int, Ge(0), Le(1000)] = Field(0, description=(
        "Worker-group restarts, each resuming from the last complete checkpoint (needs "
        "`train.checkpoint_every` > 0)."))
    runtime_env: dict[str, Any] = Field(default_factory=dict, description=(
        "The Jobs API runtime_env: only `env_vars` and `pip`. Env var names from an allow-list (`HF_*`, `MLFLOW_*`, "
        "`TOKENIZERS_*` without endpoints, certificates or code; thread counts, NCCL tuning: docs/how-it-works.md) "
        "and the cluster's `LORA_DIST_ALLOW_ENV`, never a secret's (`*TOKEN*`, `*KEY*`, ...: set those on the "
        "cluster); values never reach the manifest. pip entries are plain requirements (`name[extra]==version`), "
        "refused where the cluster sets `LORA_DIST_ALLOW_PIP=0`."))

    @field_validator("cpus_per_worker", mode="before")
    @classmethod
    def _cpus(cls, value: Any) -> Any:
        # before the union: one message naming both forms (pydantic would report each member apart)
        if value == "auto" or (type(value) is int and 1 <= value <= 1024):
            return value
        raise ValueError(f"must be 'auto' or an integer from 1 to 1024, got {Short(value)!r}")

    @field_validator("runtime_env")
    @classmethod
    def _runtime_env(cls, env: dict[str, Any]) -> dict[str, Any]:
        problems = runtime_env_problems(env)
        if problems:
            raise ValueError("; ".join(problems))
        return env


class OutputSpec(_Section):
    """Where the artifact and the checkpoints go."""

    dir: str = Field("runs", min_length=1, description=(
        "Where artifacts go, as `<dir>/<name>-<id>/`: a directory, or a storage URI (`s3://`, `gs://`, "
        "`hdfs://`, `file://`, ...). `..` is refused, also percent-encoded. A job sent through the Jobs API may "
        "write only under the cluster's `$LORA_DIST_OUTPUT_ROOT`."))
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description=(
        "The dtype of the saved adapter tensors."))
    shared: StrictBool = Field(False, description=(
        "Declares a local `dir` that every node of the cluster mounts at the same path (NFS, a shared volume): "
        "required of a local dir when a job's workers may run on more than one node; `submit --address` refuses "
        "a job with `cluster.workers` > 1 on a plain local directory without it."))

    @field_validator("dir")
    @classmethod
    def _dir(cls, d: str) -> str:
        if is_uri(d):
            scheme, rest = d.split("://", 1)
            if scheme.lower() not in URI_SCHEMES:
                raise ValueError(f"URI scheme {scheme.lower()!r} is not supported (use {', '.join(URI_SCHEMES)})")
            if problem := uri_problem(d):  # as pyarrow reads it: percent-decoded
                raise ValueError(problem)
        elif ".." in Path(d).parts:
            raise ValueError(f"must not contain '..' (it would escape the output root), got {d!r}")
        return d


class TrackingSpec(_Section):
    """Experiment tracking on the main process (lora_dist.tracking): the spec, metrics.jsonl, the artifact."""

    mlflow: Optional[MlflowUri] = Field(None, description=(
        "An MLflow tracking URI: `sqlite:///PATH`, a server `http(s)://HOST[:PORT]` or a `file:PATH` store "
        "(relative paths resolve against the current directory); credentials go in MLFLOW_TRACKING_* env vars."))
    experiment: Optional[str] = Field(None, min_length=1, description="The MLflow experiment (default: the job's name).")
    tensorboard: Optional[str] = Field(None, min_length=1, description="A directory or storage URI for event files.")


class JobSpec(_Section):
    """A whole job: its name and one section per concern."""

    name: str = Field(description=(
        "Names the job and its artifact directory `<output.dir>/<name>-<id>/`: 1-64 letters, digits, `.`, `_` "
        "or `-`, starting with a letter or digit."))
    model: ModelSpec = Field(ModelSpec(), description=ModelSpec.__doc__)
    lora: LoraSpec = Field(LoraSpec(), description=LoraSpec.__doc__)
    data: DataSpec = Field(DataSpec(), description=DataSpec.__doc__)
    train: TrainSpec = Field(TrainSpec(), description=TrainSpec.__doc__)
    cluster: ClusterSpec = Field(ClusterSpec(), description=ClusterSpec.__doc__)
    output: OutputSpec = Field(OutputSpec(), description=OutputSpec.__doc__)
    tracking: TrackingSpec = Field(TrackingSpec(), description=TrackingSpec.__doc__)

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME_RE.match(name) or ".." in name:
            raise ValueError(f"must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit "
                             f"(it names the output directory), got {name!r}")
        return name

    @property
    def full(self) -> bool:
        """train.method full: every float weight trains and no LoRA is injected (the baseline)."""
        return self.train.method == "full"

    @property
    def injected_lora(self) -> LoraSpec | None:
        """The LoRA settings a job injects; None for full fine-tuning (every weight trains)."""
        return None if self.full else self.lora

    def with_absolute_paths(self) -> "JobSpec":
        """The same spec with data.path and output.dir made absolute against the current directory:
        what crosses to workers, whose working directory is not the user's. URIs stay as they are."""
        data, output = self.data, self.output
        data = data.model_copy(update={k: str(Path(v).expanduser().resolve()) for k in ("path", "val_path")
                                       if (v := getattr(data, k)) is not None and not is_uri(v)})
        if not is_uri(output.dir):
            output = output.model_copy(update={"dir": str(Path(output.dir).expanduser().resolve())})
        t = self.tracking
        tracking = t.model_copy(update={k: absolute_target(getattr(t, k)) for k in ("mlflow", "tensorboard")})
        return self.model_copy(update={"data": data, "output": output, "tracking": tracking})

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (lists for tuples) that ``spec_from_dict`` turns back into this spec."""
        return self.model_dump(mode="json")


# --- loading -------------------------------------------------------------------------------------

def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply ``key=value`` overrides, validate.

    Args:
        path: the YAML file.
        overrides: strings like ``"train.max_steps=5"``; values are parsed as YAML scalars.

    Returns:
        The validated JobSpec.

    Raises:
        SpecError: the file is missing or unreadable, is not a mapping, or any field is invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError([f"spec file not found: {p}"], str(p))
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError([f"the spec is {p.stat().st_size:,} bytes; a job spec is at most {MAX_SPEC_BYTES:,}"], str(p))
    try:
        raw = safeyaml.load(p.read_text(encoding="utf-8"))
    except safeyaml.TooLarge as e:
        raise SpecError([f"the spec {e}"], str(p)) from None
    except yaml.constructor.ConstructorError as e:
        raise SpecError([f"YAML tags are not allowed (safe YAML only): {e.problem} at line "
                         f"{e.problem_mark.line + 1 if e.problem_mark else '?'}"], str(p)) from None
    except yaml.YAMLError as e:
        raise SpecError([f"not valid YAML: {e}"], str(p)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError([f"the top level must be a mapping of sections, got {type(raw).__name__}"], str(p))
    raw = apply_overrides(raw, overrides or [], source=str(p))
    return spec_from_dict(raw, source=str(p))


def apply_overrides(raw: Mapping[str, Any], overrides: list[str], source: str | None = None) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` applied (value parsed as YAML)."""
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    problems = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=5")
            continue
        try:
            parsed = safeyaml.load(value) if value.strip() else None
        except safeyaml.TooLarge as e:
            problems.append(f"--set {key}: the value {e}")
            continue
        except yaml.YAMLError:
            problems.append(f"--set {key}: value {value!r} is not valid YAML")
            continue
        parts = key.split(".")
        if len(parts) == 1:
            out[key] = parsed
        elif len(parts) == 2:
            section = out.get(parts[0])
            if section is None:
                section = out[parts[0]] = {}
            if not isinstance(section, dict):
                problems.append(f"--set {key}: '{parts[0]}' is not a section")
                continue
            section[parts[1]] = parsed
        else:
            problems.append(f"--set {key}: keys have the form section.field")
    if problems:
        raise SpecError(problems, source)
    return out


def spec_from_dict(raw: Mapping[str, Any], source: str | None = None) -> JobSpec:
    """Validate a plain mapping (from YAML or from the Ray worker boundary) into a JobSpec.

    Raises:
        SpecError: every problem at once, each naming its field.
    """
    try:
        spec = JobSpec.model_validate(dict(raw))
    except ValidationError as e:
        raise SpecError([_describe(err) for err in e.errors()], source) from None
    problems = _cross_field_problems(spec)
    if problems:
        raise SpecError(problems, source)
    return spec


def _cross_field_problems(s: JobSpec) -> list[str]:
    """The checks that involve two fields; each message names the field to change."""
    problems = []
    if s.data.source != "e2e" and s.data.path is None:
        problems.append(f"data.path: required for source {s.data.source!r} (only e2e downloads its data)")
    if set(s.data.columns) - set(SOURCE_COLUMNS[s.data.source]):
        problems.append(f"data.columns: {sorted(set(s.data.columns) - set(SOURCE_COLUMNS[s.data.source]))} are not "
                        f"columns of source {s.data.source!r} ({', '.join(SOURCE_COLUMNS[s.data.source])})")
    if s.full and s.model.quantization != "none":
        problems.append("train.method: 'full' trains every weight, which an int8 base cannot; "
                        "set model.quantization: none")
    if s.train.dtype == "fp16" and s.cluster.gpus_per_worker == 0:
        problems.append("train.dtype: fp16 needs GPU workers (cluster.gpus_per_worker >= 1) for DeepSpeed's "
                        "loss scaling; on CPU use fp32 or bf16")
    if s.train.early_stop_patience > 0 and s.train.eval_every == 0:
        problems.append("train.early_stop_patience: counts validations; set train.eval_every > 0")
    if s.train.early_stop_patience > 0 and s.full:
        problems.append("train.early_stop_patience: keeping the best copy of a full fine-tune would hold a "
                        "second model; early stop is for train.method: lora")
    if s.train.epochs is not None and s.train.max_steps is not None:
        problems.append("train.max_steps, train.epochs: set one of them, not both (over a spec that sets "
                        "max_steps: --set train.max_steps=null --set train.epochs=N)")
    if s.train.epochs is None and s.train.max_steps is None:
        problems.append("train.max_steps: required unless train.epochs is set")
    if s.cluster.max_failures > 0 and s.train.checkpoint_every == 0:
        problems.append("cluster.max_failures: restarts resume from checkpoints; set train.checkpoint_every > 0")
    return problems


# pydantic's error types -> what this field expected, in the words the messages have always used
_EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
             "float_type": "a number", "float_parsing": "a number", "bool_type": "true or false",
             "bool_parsing": "true or false", "string_type": "a string", "dict_type": "a mapping",
             "tuple_type": "a non-empty list of names", "list_type": "a list"}


def _describe(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``field.path: what is wrong, got <value>`` (the value cut short)."""
    loc = [str(x) for x in err["loc"]]
    # a list of names reports each element by index: name the field itself
    while loc and loc[-1].isdigit():
        loc.pop()
    field, kind, raw = ".".join(loc) or "spec", err["type"], err.get("input")
    value = Short(raw)
    if kind == "missing":
        return f"{field}: required"
    if kind == "extra_forbidden":
        return f"{field}: unknown key (allowed: {', '.join(_model_at(loc[:-1]).model_fields)})"
    if kind in ("model_type", "model_attributes_type"):
        return f"{field}: must be a mapping, got {type(raw).__name__}"
    if kind == "too_short":
        return f"{field}: expected a non-empty list, got {value!r}"
    if kind in _EXPECTED:
        return f"{field}: expected {_EXPECTED[kind]}, got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"{field}: must be {_range(loc)}, got {value!r}"
    if kind == "literal_error":
        return f"{field}: must be {err['ctx']['expected']}, got {value!r}"
    if kind == "finite_number":
        return f"{field}: must be a finite number, got {value!r}"
    if kind == "string_too_short":
        return f"{field}: must not be empty"
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{field}: {message}"


def _model_at(loc: list[str]) -> type[BaseModel]:
    model: type[BaseModel] = JobSpec
    for part in loc:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return model


def _range(loc: list[str]) -> str:
    """A field's allowed range from its declared bounds: 'from 1 to 4096', 'in (0, 1]', '>= 0'."""
    info = _model_at(loc[:-1]).model_fields[loc[-1]]  # an Optional field: its Annotated's bounds
    metadata = info.metadata or [m for a in get_args(info.annotation) for m in getattr(a, "__metadata__", ())]
    lo = next(((m.ge, "[") for m in metadata if isinstance(m, Ge)), None) or \
        next(((m.gt, "(") for m in metadata if isinstance(m, Gt)), None)
    hi = next(((m.le, "]") for m in metadata if isinstance(m, Le)), None) or \
        next(((m.lt, ")") for m in metadata if isinstance(m, Lt)), None)
    if lo and hi:
        if lo[1] == "[" and hi[1] == "]" and isinstance(lo[0], int) and isinstance(hi[0], int):
            return f"from {lo[0]} to {hi[0]}"
        return f"in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
    if lo:
        return f"{'>=' if lo[1] == '[' else '>'} {lo[0]}"
    return f"{'<=' if hi[1] == ']' else '<'} {hi[0]}"


# --- where things go -----------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def resolve_dtype(dtype: str, device_type: str) -> str:
    """``train.dtype`` made concrete for a device kind: auto is bf16 on ``cuda``, fp32 elsewhere."""
    if dtype == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"train.dtype: must be one of auto, bf16, fp16, fp32, got {dtype!r}")
    return dtype
