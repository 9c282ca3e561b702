"""The job spec: YAML in, a validated, typed, frozen JobSpec out. No torch, no ray.

Every problem in a spec is reported at once, each line naming its field (``lora.r: must be an
integer >= 1, got 0``). Unknown keys are rejected. Command-line overrides (``--set
train.max_steps=5``) are applied to the raw mapping before validation, so they are checked
exactly like the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

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
URI_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
RUNTIME_ENV_KEYS = ("env_vars", "pip")
URI_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "file")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SpecError(ValueError):
    """A job spec is invalid. ``problems`` lists one message per field."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid job spec{where}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True)
class ModelSpec:
    base: str = "smollm2-135m"  # a built-in id or a local Hugging Face directory
    quantization: str = "int8"  # int8 | none


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names, or ("all-linear",)
    init: str = "kaiming"  # kaiming | gaussian
    use_rslora: bool = False


@dataclass(frozen=True)
class DataSpec:
    source: str = "e2e"  # e2e | jsonl
    path: str | None = None  # None: the official E2E release, downloaded and cached
    max_length: int = 128
    val_fraction: float = 0.1
    max_val_examples: int = 256


@dataclass(frozen=True)
class TrainSpec:
    method: str = "lora"  # lora | full (full fine-tuning: every float weight trains; the baseline)
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 10  # capped at max_steps, so `--set train.max_steps=5` works on any job
    schedule: str = "linear"  # linear | cosine decay after warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate before and after training only
    eval_batches: int = 8
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    checkpoint_every: int = 0  # LoRA-only resumable checkpoint every N steps (0: none)
    parity_check: bool = False  # run the first parity_steps against an unsharded int8 reference
    parity_steps: int = 2
    parity_tolerance: float = 1e-3  # largest allowed |loss difference| per step, nats/token


@dataclass(frozen=True)
class ClusterSpec:
    workers: int = 1
    zero_stage: int = 3
    gpus_per_worker: int = 0  # 0: CPU workers (gloo, fp32); 1: a GPU each (nccl, bf16)
    cpus_per_worker: int = 1
    placement: str = "pack"  # pack | spread: Ray placement strategy across nodes
    max_failures: int = 0  # worker-group restarts, each resuming from the last complete checkpoint
    runtime_env: dict = field(default_factory=dict)  # Jobs API runtime_env: env_vars, pip only


@dataclass(frozen=True)
class OutputSpec:
    dir: str = "runs"
    adapter_dtype: str = "float32"  # float32 | bfloat16 | float16: the saved adapter's tensors


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: ModelSpec = field(default_factory=ModelSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    cluster: ClusterSpec = field(default_factory=ClusterSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def with_absolute_paths(self) -> "JobSpec":
        """The same spec with data.path and output.dir made absolute against the current directory:
        what crosses to workers, whose working directory is not the user's. URIs stay as they are."""
        data = self.data
        if data.path is not None:
            data = dataclasses.replace(data, path=str(Path(data.path).expanduser().resolve()))
        output = self.output
        if not URI_RE.match(output.dir):
            output = dataclasses.replace(output, dir=str(Path(output.dir).expanduser().resolve()))
        return dataclasses.replace(self, data=data, output=output)

    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (lists for tuples) that ``spec_from_dict`` turns back into this spec."""
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v
        return {f.name: ({k: plain(v) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}
                         if dataclasses.is_dataclass(getattr(self, f.name)) else getattr(self, f.name))
                for f in fields(self)}


SECTIONS: dict[str, type] = {
    "model": ModelSpec, "lora": LoraSpec, "data": DataSpec, "train": TrainSpec,
    "cluster": ClusterSpec, "output": OutputSpec,
}


# --- loading -------------------------------------------------------------------------------------

class _NoTagsLoader(yaml.SafeLoader):
    """safe_load, but a message that names the file when a Python tag appears."""


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
    try:
        raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_NoTagsLoader)
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
            parsed = yaml.safe_load(value) if value.strip() else None
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


# --- validation ----------------------------------------------------------------------------------

def output_root() -> Path:
    """Where local artifacts may go: $LORA_DIST_OUTPUT_ROOT, else the current directory."""
    return Path(os.environ.get("LORA_DIST_OUTPUT_ROOT") or os.getcwd()).expanduser().resolve()


def cache_root() -> Path:
    """This machine's cache: the converted base model, fingerprints, the embedded-job registry."""
    return Path(os.environ.get("LORA_DIST_CACHE", Path.home() / ".cache" / "lora-dist")).expanduser()


def check_output_root(spec: JobSpec) -> None:
    """Reject a local output.dir outside the output root (URIs are the storage's business).

    Raises:
        SpecError: naming output.dir and the root.
    """
    if URI_RE.match(spec.output.dir):
        return
    root = output_root()
    target = Path(spec.output.dir).expanduser().resolve()
    if target != root and root not in target.parents:
        raise SpecError([f"output.dir: {target} is outside the output root {root} (run from a directory "
                         f"above it, set LORA_DIST_OUTPUT_ROOT, or use a relative path)"])


def spec_from_dict(raw: Mapping[str, Any], source: str | None = None) -> JobSpec:
    """Validate a plain mapping (from YAML or from the Ray worker boundary) into a JobSpec."""
    problems: list[str] = []
    allowed_top = {"name", *SECTIONS}
    for key in raw:
        if key not in allowed_top:
            problems.append(f"{key}: unknown key (allowed: {', '.join(sorted(allowed_top))})")

    name = raw.get("name")
    if name is None:
        problems.append("name: required (letters, digits, '.', '_', '-'; at most 64 characters)")
    elif not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        problems.append(f"name: must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or "
                        f"digit (it names the output directory), got {name!r}")

    sections: dict[str, Any] = {}
    for sec_name, cls in SECTIONS.items():
        sec_raw = raw.get(sec_name, {}) or {}
        if not isinstance(sec_raw, dict):
            problems.append(f"{sec_name}: must be a mapping, got {type(sec_raw).__name__}")
            sec_raw = {}
        sections[sec_name] = _build_section(sec_name, cls, sec_raw, problems)

    if not problems:
        _check_semantics(sections, problems)
    if problems:
        raise SpecError(problems, source)
    return JobSpec(name=name, **sections)


def _build_section(sec_name: str, cls: type, sec_raw: Mapping[str, Any], problems: list[str]) -> Any:
    known = {f.name: f for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in sec_raw.items():
        if key not in known:
            problems.append(f"{sec_name}.{key}: unknown key (allowed: {', '.join(known)})")
            continue
        default = known[key].default
        ok, converted, expected = _coerce(value, default, known[key].type)
        if not ok:
            problems.append(f"{sec_name}.{key}: expected {expected}, got {value!r}")
            continue
        values[key] = converted
    try:
        return cls(**values)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        problems.append(f"{sec_name}: {e}")
        return cls()


def _coerce(value: Any, default: Any, annotation: Any) -> tuple[bool, Any, str]:
    """Convert a YAML value to the field's type. Returns (ok, value, expected-description)."""
    ann = str(annotation)
    if ann == "dict" or annotation is dict:
        return isinstance(value, dict), value, "a mapping"
    if "tuple" in ann:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            return True, tuple(value), "a list of names"
        return False, None, "a non-empty list of names"
    if isinstance(default, bool):
        return (isinstance(value, bool), value, "true or false")
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value, "an integer"
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 2e-4 as a string; accept it as a number
            try:
                value = float(value)
            except ValueError:
                return False, None, "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None, "a number"
    if "None" in ann:  # optional string
        return (value is None or isinstance(value, str)), value, "a string or null"
    return isinstance(value, str), value, "a string"


def _check_semantics(s: dict[str, Any], problems: list[str]) -> None:
    m, lo, d, t, c, o = (s[k] for k in ("model", "lora", "data", "train", "cluster", "output"))

    if m.quantization not in ("int8", "none"):
        problems.append(f"model.quantization: must be 'int8' or 'none', got {m.quantization!r}")
    if not m.base:
        problems.append("model.base: required: a built-in id "
                        f"({', '.join(BUILTIN_MODELS)}) or a local Hugging Face directory")
    elif m.base not in BUILTIN_MODELS and m.base not in SHAPES:
        bp = Path(m.base).expanduser()
        if not bp.is_dir():
            problems.append(f"model.base: {m.base!r} is neither a built-in id ({', '.join(BUILTIN_MODELS)}), "
                            f"a planning shape ({', '.join(SHAPES)}) nor an existing directory")
        elif not (bp / "config.json").is_file():
            problems.append(f"model.base: {bp} has no config.json (expected a Hugging Face model directory)")
        elif not any(bp.glob("*.safetensors")):
            problems.append(f"model.base: {bp} has no *.safetensors weights")

    if not 1 <= lo.r <= 4096:
        problems.append(f"lora.r: must be an integer from 1 to 4096, got {lo.r}")
    if not lo.alpha > 0:
        problems.append(f"lora.alpha: must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if lo.init not in ("kaiming", "gaussian"):
        problems.append(f"lora.init: must be 'kaiming' or 'gaussian', got {lo.init!r}")
    if LINEAR_TARGET_ALL in lo.targets and len(lo.targets) > 1:
        problems.append(f"lora.targets: '{LINEAR_TARGET_ALL}' stands alone, got {list(lo.targets)}")
    for tname in lo.targets:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*$", tname):
            problems.append(f"lora.targets: {tname!r} is not a module name")

    if d.source not in ("e2e", "jsonl"):
        problems.append(f"data.source: must be 'e2e' or 'jsonl', got {d.source!r}")
    if d.path is not None:
        dp = Path(d.path).expanduser()
        if not dp.is_file():
            problems.append(f"data.path: file not found: {dp.resolve()} (relative paths resolve against "
                            f"the current directory)")
    elif d.source == "jsonl":
        problems.append("data.path: required for source 'jsonl' (a file of {\"prompt\", \"completion\"} lines)")
    if not 8 <= d.max_length <= 131072:
        problems.append(f"data.max_length: must be from 8 to 131072 tokens, got {d.max_length}")
    if not 0 < d.val_fraction < 1:
        problems.append(f"data.val_fraction: must be in (0, 1), got {d.val_fraction}")
    if d.max_val_examples < 1:
        problems.append(f"data.max_val_examples: must be >= 1, got {d.max_val_examples}")

    if t.method not in ("lora", "full"):
        problems.append(f"train.method: must be 'lora' or 'full', got {t.method!r}")
    elif t.method == "full" and m.quantization != "none":
        problems.append("train.method: 'full' trains every weight, which an int8 base cannot; "
                        "set model.quantization: none")
    if not 1 <= t.max_steps <= 10_000_000:
        problems.append(f"train.max_steps: must be from 1 to 10,000,000, got {t.max_steps}")
    if not 1 <= t.micro_batch_size <= 65536:
        problems.append(f"train.micro_batch_size: must be from 1 to 65536, got {t.micro_batch_size}")
    if not 1 <= t.grad_accum <= 65536:
        problems.append(f"train.grad_accum: must be from 1 to 65536, got {t.grad_accum}")
    if not 0 < t.lr <= 1:
        problems.append(f"train.lr: must be in (0, 1], got {t.lr}")
    if t.warmup_steps < 0:
        problems.append(f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    if t.schedule not in ("linear", "cosine"):
        problems.append(f"train.schedule: must be 'linear' or 'cosine', got {t.schedule!r}")
    if t.weight_decay < 0:
        problems.append(f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    if t.max_grad_norm < 0:
        problems.append(f"train.max_grad_norm: must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
    if t.seed < 0:
        problems.append(f"train.seed: must be >= 0, got {t.seed}")
    if t.log_every < 1:
        problems.append(f"train.log_every: must be >= 1, got {t.log_every}")
    if t.eval_every < 0:
        problems.append(f"train.eval_every: must be >= 0, got {t.eval_every}")
    if t.eval_batches < 1:
        problems.append(f"train.eval_batches: must be >= 1, got {t.eval_batches}")

    if not 1 <= c.workers <= 4096:
        problems.append(f"cluster.workers: must be from 1 to 4096, got {c.workers}")
    if c.zero_stage not in (1, 2, 3):
        problems.append(f"cluster.zero_stage: must be 1, 2 or 3, got {c.zero_stage}")
    if not 0 <= c.gpus_per_worker <= 16:
        problems.append(f"cluster.gpus_per_worker: must be from 0 to 16, got {c.gpus_per_worker}")
    if not 1 <= c.cpus_per_worker <= 1024:
        problems.append(f"cluster.cpus_per_worker: must be from 1 to 1024, got {c.cpus_per_worker}")
    if c.placement not in ("pack", "spread"):
        problems.append(f"cluster.placement: must be 'pack' or 'spread', got {c.placement!r}")
    bad_env = sorted(set(c.runtime_env) - set(RUNTIME_ENV_KEYS))
    if bad_env:
        problems.append(f"cluster.runtime_env: keys {bad_env} are not allowed (allowed: {', '.join(RUNTIME_ENV_KEYS)})")
    env_vars = c.runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()):
        problems.append("cluster.runtime_env.env_vars: must map names to string values")
    pip = c.runtime_env.get("pip", [])
    if not isinstance(pip, list) or not all(isinstance(x, str) for x in pip):
        problems.append("cluster.runtime_env.pip: must be a list of requirement strings")
    if not 0 <= c.max_failures <= 1000:
        problems.append(f"cluster.max_failures: must be from 0 to 1000, got {c.max_failures}")
    if t.checkpoint_every < 0:
        problems.append(f"train.checkpoint_every: must be >= 0 (0: no checkpoints), got {t.checkpoint_every}")
    if c.max_failures > 0 and t.checkpoint_every == 0:
        problems.append("cluster.max_failures: restarts resume from checkpoints; set train.checkpoint_every > 0")
    if not 1 <= t.parity_steps <= 1000:
        problems.append(f"train.parity_steps: must be from 1 to 1000, got {t.parity_steps}")
    if not t.parity_tolerance > 0:
        problems.append(f"train.parity_tolerance: must be > 0, got {t.parity_tolerance}")

    if o.adapter_dtype not in ("float32", "bfloat16", "float16"):
        problems.append(f"output.adapter_dtype: must be float32, bfloat16 or float16, got {o.adapter_dtype!r}")
    if not o.dir:
        problems.append("output.dir: must not be empty")
    elif URI_RE.match(o.dir):
        scheme = o.dir.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            problems.append(f"output.dir: URI scheme {scheme!r} is not supported (use {', '.join(URI_SCHEMES)})")
        elif ".." in o.dir.split("://", 1)[1].split("/"):
            problems.append(f"output.dir: must not contain '..', got {o.dir!r}")
    elif ".." in Path(o.dir).parts:
        problems.append(f"output.dir: must not contain '..' (it would escape the output root), got {o.dir!r}")
