"""The artifact: a PEFT-compatible LoRA adapter plus a manifest that PEFT's config cannot hold.

    <output.dir>/<name>-<id>/
        adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
        adapter_config.json         PEFT LoraConfig fields
        metrics.jsonl               one line per logged step
        manifest.json               sha256 of every file, base fingerprint, settings, versions

The directory is written under a hidden ``.partial`` name and renamed into place only when
every file and the manifest are complete (store.atomic_dir), so a failed or stopped job never
leaves something that looks like a finished artifact. Loading verifies every sha256 and the base
fingerprint.

A slice-wise LoRA on a fused projection (GPT-2 ``c_attn``: q and v only) is exported exactly as
a PEFT LoRA of rank r * n_slices whose B is block-structured: PEFT computes
(alpha'/r') B' A' x with A' = [A_q; A_v], B' = [[B_q, 0], [0, 0], [0, B_v]], and alpha' is
scaled so that alpha'/r' equals our alpha/r (``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lora_dist.base import fingerprint, resolve_base
from lora_dist.chat import chat_template, template_sha256
from lora_dist.counting import check_fits
from lora_dist.data import special_tokens
from lora_dist.sources import template_for
from lora_dist.errors import ArtifactError
from lora_dist.hub import commit_of, split_ref
from lora_dist.lora import LoRALinear, LoraTensors
from lora_dist.model import LoadedModel, load_model
from lora_dist.plot import loss_curve_png
from lora_dist.records import BaseModelRecord, DataRecord, Manifest
from lora_dist.runtime_env import redacted
from lora_dist.spec import JobSpec, LoraSpec
from lora_dist.specid import spec_digest
from lora_dist.store import (ADAPTER_FILE, CONFIG_FILE, FORMAT, FULL_MODEL_FILE, LOSS_CURVE_FILE, MANIFEST_FILE,
                             atomic_dir, manifest_signature, sha256_file, signing_key, verify_artifact)

PEFT_PREFIX = "base_model.model."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- LoRA tensors <-> PEFT tensors ---------------------------------------------------------------

def to_peft_tensors(lora: dict[str, LoraTensors]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in lora.items():
        if t.full_width:
            a, b = t.A, t.B
        else:
            a = t.A  # (r * k, in): the slices' A stacked
            b = torch.zeros(t.out_features, t.r * len(t.slices))
            row = 0
            for i, (start, stop) in enumerate(t.slices):
                b[start:stop, i * t.r:(i + 1) * t.r] = t.B[row:row + stop - start]
                row += stop - start
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.contiguous()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.contiguous()
    return out


def load_into(model: nn.Module, peft_tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-named tensors into the LoRA modules of ``model`` (inverse of ``to_peft_tensors``)."""
    expected = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, LoRALinear):
            continue
        ka, kb = f"{PEFT_PREFIX}{name}.lora_A.weight", f"{PEFT_PREFIX}{name}.lora_B.weight"
        expected |= {ka, kb}
        if ka not in peft_tensors or kb not in peft_tensors:
            raise ArtifactError(f"{ADAPTER_FILE}: no tensors for module {name}")
        a, b = peft_tensors[ka].float(), peft_tensors[kb].float()
        if not mod.full_width:
            b = torch.cat([b[start:stop, i * mod.r:(i + 1) * mod.r] for i, (start, stop) in enumerate(mod.slices)])
        if a.shape != mod.lora_A.shape or b.shape != mod.lora_B.shape:
            raise ArtifactError(f"{ADAPTER_FILE}: {name} has A {tuple(a.shape)}, B {tuple(b.shape)}; the model "
                                f"expects A {tuple(mod.lora_A.shape)}, B {tuple(mod.lora_B.shape)}")
        with torch.no_grad():
            mod.lora_A.copy_(a.to(mod.lora_A.dtype))
            mod.lora_B.copy_(b.to(mod.lora_B.dtype))
    extra = set(peft_tensors) - expected
    if extra:
        raise ArtifactError(f"{ADAPTER_FILE}: tensors for modules the model does not have: {sorted(extra)[:3]}")


def check_trained(lora: dict[str, LoraTensors], steps: int) -> None:
    """Refuse an export that would be empty or untrained (DeepSpeed#3620-style failures)."""
    if not lora:
        raise ArtifactError("export: the model has no LoRA modules")
    for name, t in lora.items():
        width = sum(stop - start for start, stop in t.slices)
        if t.A.dim() != 2 or t.A.shape[0] != t.r * len(t.slices) or t.B.shape != (width, t.r):
            raise ArtifactError(f"export: {name} has A {tuple(t.A.shape)}, B {tuple(t.B.shape)}: wrong shape "
                                f"(gathered from a partition?)")
        if not torch.isfinite(t.A).all() or not torch.isfinite(t.B).all():
            raise ArtifactError(f"export: {name} has non-finite LoRA weights")
    if steps > 0 and all(not t.B.any() for t in lora.values()):
        raise ArtifactError("export: every lora_B is all zero after training: the adapter would be a no-op "
                            "(were the weights gathered before saving?)")


def peft_config(lora: dict[str, LoraTensors], r: int, alpha: float, dropout: float, use_rslora: bool,
                init: str, base_name: str, fan_in_fan_out: bool) -> dict[str, Any]:
    modules = sorted({name.rsplit(".", 1)[-1] for name in lora})
    rank_pattern, alpha_pattern = {}, {}
    for name, t in lora.items():
        k = len(t.slices)
        if k > 1:
            short = name.rsplit(".", 1)[-1]
            rank_pattern[short] = r * k
            # PEFT scales by alpha'/r' (or alpha'/sqrt(r')); keep the product equal to ours.
            alpha_pattern[short] = alpha * (math.sqrt(k) if use_rslora else k)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": modules,
        "use_rslora": use_rslora,
        "init_lora_weights": True if init == "kaiming" else "gaussian",
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": None,
        "inference_mode": True,
    }


# --- writing and verifying -----------------------------------------------------------------------

def write_artifact(final_dir: Path, lora: dict[str, LoraTensors], config: dict[str, Any],
                   manifest: Manifest, dtype: str = "float32",
                   extra_files: Iterable[Path] = ()) -> Path:
    """Write the artifact atomically to ``final_dir`` and return it.

    Args:
        final_dir: where the finished artifact appears; must not exist yet.
        lora: gathered LoRA tensors (see :func:`collect_lora`).
        config: PEFT adapter config (see :func:`peft_config`).
        manifest: what to record; what the files are (``kind``, ``files``, ...) is filled in here.
        dtype: tensor dtype of the saved adapter.
        extra_files: files copied in and listed in the manifest (metrics.jsonl, plots).

    Raises:
        ArtifactError: ``final_dir`` exists, or the tensors fail :func:`check_trained`.
    """
    from safetensors.torch import save_file

    check_trained(lora, manifest.steps or 0)

    def payload(d: Path) -> dict[str, Any]:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in to_peft_tensors(lora).items()}
        save_file(tensors, str(d / ADAPTER_FILE), metadata={"format": "pt"})
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return {"kind": "adapter", "adapter_dtype": dtype, "adapter_bytes": (d / ADAPTER_FILE).stat().st_size}

    return _publish(final_dir, manifest, extra_files, payload)


def _publish(final_dir: Path, manifest: Manifest, extra_files: Iterable[Path],
             payload: Callable[[Path], dict[str, Any]]) -> Path:
    """Write an artifact aside and rename it into place when complete (store.atomic_dir):
    ``payload(dir)`` writes the model files and returns what the manifest says of them, extra
    files are copied in, the manifest (sha256 of every file, signed where a key is set) comes last."""
    if final_dir.exists():
        raise ArtifactError(f"{final_dir} already exists; an artifact is never overwritten")
    with atomic_dir(final_dir) as partial:
        fields = payload(partial)
        for f in extra_files:
            shutil.copyfile(f, partial / Path(f).name)
        files = sorted(p.name for p in partial.iterdir() if p.is_file())
        body = manifest.updated(format=FORMAT, **fields,
                                files={name: sha256_file(partial / name) for name in files}).to_json()
        key = signing_key()
        if key is not None:
            body["signature"] = manifest_signature(body, key)
        (partial / MANIFEST_FILE).write_text(json.dumps(body, indent=2) + "\n")
    return final_dir


def write_full_artifact(final_dir: Path, state_dict: dict[str, torch.Tensor], base_dir: Path,
                        manifest: Manifest, tie_word_embeddings: bool,
                        extra_files: Iterable[Path] = ()) -> Path:
    """Write a fully fine-tuned model (the baseline ``train.method: full``) as a Hugging Face
    directory plus the same manifest, atomically like :func:`write_artifact`."""
    from safetensors.torch import save_file

    def payload(d: Path) -> dict[str, Any]:
        tensors, seen = {}, set()
        for k, v in state_dict.items():
            if v.data_ptr() in seen or (tie_word_embeddings and k == "lm_head.weight"):
                continue  # tied to the input embedding: transformers re-ties on load
            seen.add(v.data_ptr())
            tensors[k] = v.detach().cpu().contiguous()
        save_file(tensors, str(d / FULL_MODEL_FILE), metadata={"format": "pt"})
        for f in sorted(base_dir.iterdir()):
            if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith("."):
                shutil.copyfile(f, d / f.name)  # config, generation config, tokenizer
        return {"kind": "full", "model_bytes": (d / FULL_MODEL_FILE).stat().st_size}

    return _publish(final_dir, manifest, extra_files, payload)


def write_job_artifact(dest: Path, spec: JobSpec, job_id: str, built: LoadedModel,
                       lora: dict[str, LoraTensors] | None, full_state: dict[str, torch.Tensor] | None,
                       fields: dict[str, Any], metrics_file: Path) -> Path:
    """Write a finished job's artifact atomically to ``dest``: the adapter (or, for
    ``train.method: full``, the whole model), its metrics and loss curve, and the manifest.

    Args:
        dest: the artifact directory to create (must not exist).
        built: the model as built for training (base directory, injection, trainable count).
        lora: the gathered LoRA pairs (None for full fine-tuning).
        full_state: the gathered state dict (full fine-tuning only).
        fields: run results for the manifest (steps, losses, world_size, zero_stage, ...).
        metrics_file: the run's metrics.jsonl.
    """
    manifest = Manifest(
        name=spec.name,
        job_id=job_id,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        base_model=BaseModelRecord(id=spec.model.base, fingerprint=built.fingerprint,
                                   architecture=type(built.model).__name__, **hub_fields(spec, built.model_dir)),
        quantization=spec.model.quantization,
        quantized_modules=len(built.injection.quantized),
        lora=spec.lora.model_dump(mode="json"),
        trainable_params=built.trainable_params,
        data=DataRecord(source=spec.data.source, path=spec.data.path, max_length=spec.data.max_length,
                        prompt_template=template_for(spec.data.source),
                        special_tokens=special_tokens(built.tokenizer), **chat_fields(spec, built.tokenizer)),
        spec=redacted(spec.to_dict()),  # env var values (often secrets) never reach the manifest
        spec_digest=spec_digest(spec.to_dict()),  # what this job id is bound to (specid.bound_fields)
        versions=versions(),
        **fields,
    )
    extra_files = [metrics_file, loss_curve_png(metrics_file, metrics_file.parent / LOSS_CURVE_FILE)]
    if spec.full:
        manifest = manifest.updated(method="full")
        tied = bool(getattr(built.model.config, "tie_word_embeddings", False))
        return write_full_artifact(dest, full_state, built.model_dir, manifest, tied, extra_files=extra_files)
    config = peft_config(lora, spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.use_rslora,
                         spec.lora.init, spec.model.base,
                         fan_in_fan_out=any(n in built.injection.transposed for n in built.injection.lora))
    return write_artifact(dest, lora, config, manifest, spec.output.adapter_dtype, extra_files=extra_files)


def hub_fields(spec: JobSpec, model_dir: Path) -> dict[str, str]:
    """What the manifest records of a hub base: its revision and the commit loaded (the snapshot
    directory is named by it); nothing for a base of another kind."""
    commit = commit_of(model_dir)
    return {"revision": spec.model.revision, "commit": commit} if commit and split_ref(spec.model.base) else {}


def base_of(record: BaseModelRecord) -> str:
    """The base an adapter is loaded onto: a hub id at the commit it was trained on, not the
    branch's head now; any other base as the spec named it."""
    return f"{record.id}@{record.commit}" if record.commit and split_ref(record.id) else record.id


def chat_fields(spec: JobSpec, tokenizer) -> dict[str, str]:
    """The chat template a chat run rendered with, for the manifest's data record (none otherwise)."""
    if spec.data.source != "chat":
        return {}
    template = chat_template(tokenizer, spec.data.chat_template)
    return {"chat_template": template, "chat_template_sha256": template_sha256(template)}


def read_lora_tensors(artifact: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(artifact) / ADAPTER_FILE))


@dataclass
class LoraDelta:
    """One module's trained update as PEFT holds it: delta W = scale · B A, with A (r', in) and B
    (out, r') (a fused projection's slices as one block-structured pair, :func:`to_peft_tensors`)."""
    A: torch.Tensor
    B: torch.Tensor
    scale: float


def lora_scale(manifest: Manifest) -> float:
    """alpha / r (rsLoRA: alpha / sqrt(r)) of the spec the adapter trained with: the scale of every
    module's PEFT pair, sliced or not (PEFT's alpha'/r' is kept equal to it, :func:`peft_config`)."""
    lora = LoraSpec.model_validate((manifest.spec or {}).get("lora") or {})
    return lora.alpha / math.sqrt(lora.r) if lora.use_rslora else lora.alpha / lora.r


def lora_deltas(artifact: Path, manifest: Manifest) -> dict[str, LoraDelta]:
    """Each adapted module's pair by module path (``model.layers.0.self_attn.q_proj``), fp32, from a
    verified artifact's tensors: what serving and merging fold into the base.

    Raises:
        ArtifactError: a module has an A or B without its partner, or shapes that do not pair.
    """
    tensors = read_lora_tensors(artifact)
    scale = lora_scale(manifest)
    out: dict[str, LoraDelta] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")] if key.startswith(PEFT_PREFIX) else None
        b_key = key[:-len("lora_A.weight")] + "lora_B.weight"
        a, b = tensors[key].float(), tensors.get(b_key)
        if module is None or b is None or b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ArtifactError(f"{Path(artifact) / ADAPTER_FILE}: {key} has no matching {b_key} of shape "
                                f"(out, {a.shape[0]})")
        out[module] = LoraDelta(a, b.float(), scale)
    unpaired = [k for k in tensors if k.endswith(".lora_B.weight")
                and k[len(PEFT_PREFIX):-len(".lora_B.weight")] not in out]
    if unpaired or not out:
        raise ArtifactError(f"{Path(artifact) / ADAPTER_FILE}: " + (f"{unpaired[0]} has no lora_A" if unpaired
                                                                   else "holds no LoRA pair"))
    return out


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lora-dist", "torch", "transformers", "bitsandbytes", "safetensors", "deepspeed", "ray", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_adapted(artifact: Path, quantization: str | None = None,
                 check_base: bool = True) -> tuple[LoadedModel, Manifest]:
    """Verify an artifact, rebuild its base with LoRA, and load the adapter into it.

    Only the manifest's LoRA settings are needed to rebuild the model: the training run's data
    file, output directory and cluster need not exist where the adapter is used.

    Args:
        artifact: the artifact directory.
        quantization: ``int8`` / ``none`` to override the base's quantization as trained.
        check_base: compare the base model's fingerprint with the manifest's.

    Returns:
        (LoadedModel, its Manifest).

    Raises:
        ArtifactError: a file fails its sha256, or the base model is not the one trained on.
    """
    manifest = verify_artifact(artifact)
    if manifest.kind == "full":  # a fully fine-tuned model is its own base
        check_fits(str(artifact), None, quantization or "none")
        return load_model(str(artifact), None, quantization or "none"), manifest
    base = manifest.base_model
    if base is None or manifest.spec is None or manifest.quantization is None:
        raise ArtifactError(f"{artifact}: its manifest does not record the base model, spec and quantization "
                            f"an adapter is loaded onto")
    ref = base_of(base)
    if check_base:
        got = fingerprint(resolve_base(ref))
        if got != base.fingerprint:
            raise ArtifactError(f"{artifact}: trained on base {ref!r} with fingerprint {base.fingerprint}, but "
                                f"that base now has fingerprint {got}: the adapter does not belong to these weights")
    try:
        lora = LoraSpec.model_validate(manifest.spec.get("lora"))
    except ValueError as e:  # pydantic's ValidationError: a manifest another tool wrote, or edited
        raise ArtifactError(f"{artifact}: its manifest's spec.lora is not a LoRA section "
                            f"({str(e).splitlines()[-1].strip()[:200]})") from None
    check_fits(ref, lora, quantization or manifest.quantization)
    loaded = load_model(ref, lora, quantization or manifest.quantization)
    load_into(loaded.model, read_lora_tensors(artifact))
    return loaded, manifest
