"""The artifact: a PEFT-compatible LoRA adapter plus a manifest that PEFT's config cannot hold.

    <output.dir>/<name>-<id>/
        adapter_model.safetensors   base_model.model.<module>.lora_A.weight / .lora_B.weight
        adapter_config.json         PEFT LoraConfig fields
        metrics.jsonl               one line per logged step
        manifest.json               sha256 of every file, base fingerprint, settings, versions

The directory is written under a hidden ``.partial`` name and renamed into place only when
every file and the manifest are complete, so a failed or stopped job never leaves something
that looks like a finished artifact. Loading verifies every sha256 and the base fingerprint.

A slice-wise LoRA on a fused projection (GPT-2 ``c_attn``: q and v only) is exported exactly as
a PEFT LoRA of rank r * n_slices whose B is block-structured: PEFT computes
(alpha'/r') B' A' x with A' = [A_q; A_v], B' = [[B_q, 0], [0, 0], [0, B_v]], and alpha' is
scaled so that alpha'/r' equals our alpha/r (``rank_pattern`` / ``alpha_pattern``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lora_dist.errors import ArtifactError  # noqa: F401  (re-exported)
from lora_dist.lora import LoRALinear
from lora_dist.model import sha256_file

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
PEFT_PREFIX = "base_model.model."
FORMAT = "lora-dist-adapter/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --- LoRA tensors <-> PEFT tensors ---------------------------------------------------------------

@dataclass
class LoraTensors:
    """One module's LoRA pair as trained, with what is needed to export it."""
    A: torch.Tensor
    B: torch.Tensor
    r: int
    slices: list[tuple[int, int]]
    out_features: int

    @property
    def full_width(self) -> bool:
        return self.slices == [(0, self.out_features)]


def collect_lora(model: nn.Module) -> dict[str, LoraTensors]:
    """Copy every LoRA pair out of ``model`` (the caller gathers them first under ZeRO-3)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            out[name] = LoraTensors(mod.lora_A.detach().float().cpu().clone(),
                                    mod.lora_B.detach().float().cpu().clone(),
                                    mod.r, list(mod.slices), mod.out_features)
    return out


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
                   manifest: dict[str, Any], dtype: str = "float32",
                   extra_files: Iterable[Path] = ()) -> Path:
    """Write the artifact atomically to ``final_dir`` and return it.

    Args:
        final_dir: where the finished artifact appears; must not exist yet.
        lora: gathered LoRA tensors (see :func:`collect_lora`).
        config: PEFT adapter config (see :func:`peft_config`).
        manifest: fields to record; ``files`` and ``format`` are filled in here.
        dtype: tensor dtype of the saved adapter.
        extra_files: files copied in and listed in the manifest (metrics.jsonl, plots).

    Raises:
        ArtifactError: ``final_dir`` exists, or the tensors fail :func:`check_trained`.
    """
    from safetensors.torch import save_file

    check_trained(lora, manifest.get("steps", 0))

    def payload(d: Path) -> dict[str, Any]:
        tensors = {k: v.to(DTYPES[dtype]) for k, v in to_peft_tensors(lora).items()}
        save_file(tensors, str(d / ADAPTER_FILE), metadata={"format": "pt"})
        (d / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return {"kind": "adapter", "adapter_dtype": dtype, "adapter_bytes": (d / ADAPTER_FILE).stat().st_size}

    return _publish(final_dir, manifest, extra_files, payload)


def _publish(final_dir: Path, manifest: dict[str, Any], extra_files: Iterable[Path],
             payload: Callable[[Path], dict[str, Any]]) -> Path:
    """Write an artifact under a hidden ``.partial`` name and rename it into place when complete:
    ``payload(dir)`` writes the model files, extra files are copied in, the manifest (sha256 of
    every file) comes last. On any failure the partial directory is removed."""
    if final_dir.exists():
        raise ArtifactError(f"{final_dir} already exists; an artifact is never overwritten")
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = final_dir.parent / f".{final_dir.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        fields = payload(partial)
        for f in extra_files:
            shutil.copyfile(f, partial / Path(f).name)
        files = sorted(p.name for p in partial.iterdir() if p.is_file())
        full = {"format": FORMAT, **manifest, **fields,
                "files": {name: sha256_file(partial / name) for name in files}}
        (partial / MANIFEST_FILE).write_text(json.dumps(full, indent=2) + "\n")
        os.rename(partial, final_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final_dir


FULL_MODEL_FILE = "model.safetensors"


def write_full_artifact(final_dir: Path, state_dict: dict[str, torch.Tensor], base_dir: Path,
                        manifest: dict[str, Any], tie_word_embeddings: bool,
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


def read_manifest(artifact: Path) -> dict[str, Any]:
    path = Path(artifact) / MANIFEST_FILE
    if not Path(artifact).is_dir():
        raise ArtifactError(f"{artifact}: not a directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing: not a complete lora-dist artifact")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise ArtifactError(f"{path}: not a {FORMAT} manifest")
    return manifest


def verify_artifact(artifact: Path) -> dict[str, Any]:
    """Check every file listed in the manifest against its sha256; return the manifest.

    Raises:
        ArtifactError: naming the first missing, truncated or modified file.
    """
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    required_files = (FULL_MODEL_FILE,) if manifest.get("kind") == "full" else (ADAPTER_FILE, CONFIG_FILE)
    for required in required_files:
        if required not in manifest["files"]:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: does not list {required}")
    for name, digest in manifest["files"].items():
        if Path(name).name != name:
            raise ArtifactError(f"{artifact / MANIFEST_FILE}: file name {name!r} is not a plain name")
        f = artifact / name
        if not f.is_file():
            raise ArtifactError(f"{f}: missing")
        if sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 mismatch (modified or truncated)")
    return manifest


def read_lora_tensors(artifact: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(artifact) / ADAPTER_FILE))


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("lora-dist", "torch", "transformers", "bitsandbytes", "safetensors", "deepspeed", "ray", "peft"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + os.urandom(3).hex()


def load_adapted(artifact: Path, quantization: str | None = None, check_base: bool = True):
    """Verify an artifact, rebuild its base with LoRA, and load the adapter into it.

    Args:
        artifact: the artifact directory.
        quantization: ``int8`` / ``none`` to override the base's quantization as trained.
        check_base: compare the base model's fingerprint with the manifest's.

    Returns:
        (LoadedModel, manifest).

    Raises:
        ArtifactError: a file fails its sha256, or the base model is not the one trained on.
    """
    from lora_dist.model import fingerprint, load_model, resolve_base
    from lora_dist.spec import spec_from_dict

    manifest = verify_artifact(artifact)
    spec = spec_from_dict(_spec_without_paths(manifest["spec"]))
    if manifest.get("kind") == "full":  # a fully fine-tuned model is its own base
        return load_model(str(artifact), None, quantization or "none"), manifest
    base_id = manifest["base_model"]["id"]
    if check_base:
        got = fingerprint(resolve_base(base_id))
        want = manifest["base_model"]["fingerprint"]
        if got != want:
            raise ArtifactError(f"{artifact}: trained on base {base_id!r} with fingerprint {want}, but that base "
                                f"now has fingerprint {got}: the adapter does not belong to these weights")
    loaded = load_model(base_id, spec.lora, quantization or manifest["quantization"])
    load_into(loaded.model, read_lora_tensors(artifact))
    return loaded, manifest


def _spec_without_paths(raw: dict[str, Any]) -> dict[str, Any]:
    # The data file of the training run need not exist where the adapter is used.
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    out.get("data", {})["path"] = None
    return out
