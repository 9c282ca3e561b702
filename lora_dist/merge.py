"""Merge an adapter into its base: W0 + s·BA written as a standard Hugging Face model directory.

    base safetensors ──(headers)──► plan: every stored tensor, its merged dtype, its shard
          │
          └──(one row block at a time)──► W0  ─► [int8: dequant(quant(W0))] ─► + s·B[rows] A ─► cast
                                                                                         │
    DIR/model-0000k-of-0000N.safetensors ◄──(appended piece by piece)───────────────────┘

Nothing is loaded whole: the stored tensors are matched to the model's modules from the file
headers alone (``weights.plan_weights`` on a meta skeleton, the loader's own mapping), the shard
split and every shard's header are worked out from their sizes before any weight is read
(huggingface_hub's splitting, as ``save_pretrained`` splits), and then each tensor is read a row
block at a time, merged in fp32, cast and appended to its shard (``weights.SafetensorsWriter``).
Peak memory is about one row block (a transposed GPT-2 weight: one tensor) and the adapter,
whatever the model's size or the shard size: a model larger than the machine's memory merges.

``--from float`` (the default) folds into the base's own float weights, as PEFT's
``merge_and_unload``. ``--from int8`` folds into what the adapter trained against: every weight
training held as int8 (each decoder-block linear) becomes dequantize(quantize(W0)), quantized
from its stored dtype a row block at a time exactly as the loader quantizes it
(``weights.default_place``), adapted or not, so the merged model computes what training's did.

Keys stay as the base stores them (GPT-2's Conv1D weights (in, out), a base-class checkpoint's
keys without ``transformer.``, a tied ``lm_head`` absent), so ``from_pretrained`` loads the merged
directory exactly as it loads the base. The directory is written aside and renamed into place when
complete (``store.atomic_dir``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from lora_dist.adapter import LoraDelta, base_of, lora_deltas, versions
from lora_dist.base import base_config, cached_fingerprint, fingerprint, resolve_base
from lora_dist.errors import ArtifactError, ModelError
from lora_dist.hub import ALLOW_PATTERNS, WEIGHTS_INDEX
from lora_dist.lora import LoRALinear
from lora_dist.model import build_skeleton
from lora_dist.plan import fmt_bytes, parse_bytes
from lora_dist.quant import DEQUANT_BLOCK_ELEMENTS, LOAD_BLOCK_ELEMENTS, Int8Linear, dequantize_rowwise, \
    quantize_rowwise, row_blocks
from lora_dist.records import Manifest
from lora_dist.spec import LoraSpec
from lora_dist.store import atomic_dir, manifest_digest, verify_artifact
from lora_dist.weights import SafetensorsWriter, TensorSource, plan_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
FROM = ("float", "int8")
DEFAULT_SHARD_SIZE = "5GB"
MERGE_RECORD = "lora_dist_merge.json"
MERGE_FORMAT = "lora-dist-merge/1"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Elements read and merged at once, but for int8 and transposed weights (Item.pieces): 2^22 is 16 MiB
# in fp32, so a vocabulary-sized embedding passes through in pieces rather than as one block of a
# quarter GiB.
BLOCK_ELEMENTS = 1 << 22


@dataclass
class Item:
    """One stored tensor of the merged model: where it comes from and what is done to it."""
    key: str  # as the base stores it (and the merged model will)
    source: TensorSource
    dtype: torch.dtype  # in the merged files
    delta: LoraDelta | None = None  # the adapter's update of this weight
    quantized: bool = False  # --from int8: training held this weight as int8

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.source.reader.shape(self.key))

    @property
    def nbytes(self) -> int:
        return self.source.numel * self.dtype.itemsize

    def pieces(self) -> Iterator[torch.Tensor]:
        """The merged value in the stored layout, a row block at a time (a transposed GPT-2 Conv1D
        weight, whose model rows are stored columns, whole)."""
        src = self.source
        if len(src.shape) != 2:
            yield src.read().to(self.dtype)
            return
        rows, cols = src.shape
        # an int8 weight in the loader's blocks (quant.LOAD_BLOCK_ELEMENTS: its quantization's
        # temporaries are a few times the block); a transposed one in quant.DEQUANT_BLOCK_ELEMENTS
        # (each model row is a read per stored row); anything else in smaller ones
        block = LOAD_BLOCK_ELEMENTS if self.quantized else DEQUANT_BLOCK_ELEMENTS if src.transposed else BLOCK_ELEMENTS
        spans = row_blocks(rows, cols, block)
        if not src.transposed:
            yield from (self._rows(r0, r1) for r0, r1 in spans)
            return
        out = torch.empty(cols, rows, dtype=self.dtype)
        for r0, r1 in spans:
            out[:, r0:r1] = self._rows(r0, r1).t()
        yield out

    def _rows(self, r0: int, r1: int) -> torch.Tensor:
        w = self.source.rows(r0, r1)
        if not (self.quantized or self.delta is not None):
            return w.to(self.dtype)
        if self.quantized:  # as weights.default_place quantizes it: per row, from the stored dtype
            q, absmax = quantize_rowwise(w)
            w = dequantize_rowwise(q, absmax, torch.float32)
        else:
            w = w.float()
        if self.delta is not None:
            w.addmm_(self.delta.B[r0:r1], self.delta.A, alpha=self.delta.scale)
        return w.to(self.dtype)


def merge_adapter(artifact: Path, out: Path, dtype: str | None = None, source: str = "float",
                  max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                  say: Callable[[str], None] | None = None) -> Path:
    """Write the base with the adapter folded in as a Hugging Face model directory at ``out``.

    Args:
        artifact: a LoRA adapter artifact directory (verified first: sha256s, signature when a key is set).
        out: the directory to create; must not exist.
        dtype: ``bf16``, ``fp16`` or ``fp32`` for the merged float weights; None: the base's (its config.json).
        source: ``float`` (the base's own weights) or ``int8`` (the dequantized int8 weights trained against).
        max_shard_size: bytes per safetensors file, or a size like ``5GB``.
        say: progress lines (one per shard written).

    Returns:
        ``out``.

    Raises:
        ArtifactError: the artifact fails verification, its base's fingerprint differs, or ``out`` exists.
        ModelError: a full-model artifact, ``--from int8`` for an adapter trained on a float base,
            or a base this loader cannot take.
        ValueError: a bad ``dtype``, ``source`` or ``max_shard_size``.
    """
    say = say or (lambda _: None)
    artifact, out = Path(artifact), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r}; expected one of {', '.join(DTYPES)}")
    if source not in FROM:
        raise ValueError(f"--from: {source!r}; expected one of {', '.join(FROM)}")
    shard_bytes = parse_bytes(str(max_shard_size), "--max-shard-size")
    if out.exists():
        raise ArtifactError(f"--out: {out} already exists; a merged model is never written over anything")
    manifest = verify_artifact(artifact)
    model_dir = _check_adapter(artifact, manifest, source, say)
    deltas = lora_deltas(artifact, manifest)
    config = json.loads((model_dir / "config.json").read_text())
    merged = DTYPES[dtype] if dtype else _config_dtype(config)
    quantization = manifest.quantization if source == "int8" else "none"
    items = _plan(model_dir, manifest, deltas, quantization, merged)
    try:
        split = _split(items, shard_bytes)
        say(f"merging {artifact.name} into {base_of(manifest.base_model)} (from {source}, {DTYPE_NAMES[merged]}): "
            f"{len(items)} tensors, {fmt_bytes(split.metadata['total_size'])} in {len(split.filename_to_tensors)} "
            f"file(s)")
        with atomic_dir(out) as partial:
            _write_shards(partial, items, split, say)
            _write_config(partial, config, merged)
            _write_tokenizer(partial, model_dir, manifest)
            record = {"format": MERGE_FORMAT, "manifest_digest": manifest_digest(artifact),
                      "adapter": {"name": manifest.name, "job_id": manifest.job_id},
                      "base_model": manifest.base_model.to_json(), "from": source, "dtype": DTYPE_NAMES[merged],
                      "max_shard_size": shard_bytes, "files": sorted(split.filename_to_tensors),
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": versions()}
            (partial / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        for reader in {id(i.source.reader): i.source.reader for i in items}.values():
            reader.close()
    return out


def _check_adapter(artifact: Path, manifest: Manifest, source: str, say: Callable[[str], None]) -> Path:
    """The base directory a verified adapter belongs to, resolved as ``adapter.load_adapted``
    resolves it and checked against the fingerprint the adapter recorded."""
    if manifest.kind == "full":
        raise ModelError(f"{artifact}: a fully fine-tuned model (kind: full), not an adapter: there is nothing to "
                         f"merge; it already holds a Hugging Face model directory's files")
    base = manifest.base_model
    if base is None or manifest.spec is None or manifest.quantization is None:
        raise ArtifactError(f"{artifact}: its manifest does not record the base model, spec and quantization "
                            f"an adapter is merged into")
    if source == "int8" and manifest.quantization != "int8":
        raise ModelError(f"--from int8: {artifact} was trained on a float base (quantization: "
                         f"{manifest.quantization}), so there are no int8 weights it trained against; use --from float")
    ref = base_of(base)
    model_dir = resolve_base(ref, say)
    if cached_fingerprint(model_dir) is None:
        say(f"fingerprinting {model_dir}'s weight files (once on this machine)")
    got = fingerprint(model_dir)
    if got != base.fingerprint:
        raise ArtifactError(f"{artifact}: trained on base {ref!r} with fingerprint {base.fingerprint}, but {model_dir} "
                            f"has fingerprint {got}: the adapter does not belong to these weights")
    return model_dir


def _config_dtype(config: dict) -> torch.dtype:
    named = config.get("dtype") or config.get("torch_dtype")
    return {v: k for k, v in DTYPE_NAMES.items()}.get(named, torch.float32)


def _plan(model_dir: Path, manifest: Manifest, deltas: dict[str, LoraDelta], quantization: str,
          dtype: torch.dtype) -> list[Item]:
    """Every stored tensor, matched to the module it loads into by the loader's own mapping (on a
    meta skeleton with the adapter's LoRA and the quantization it is folded into), from the file
    headers alone. Tensors the model rebuilds itself (an old GPT-2's ``attn.bias``) pass through."""
    lora = LoraSpec.model_validate(manifest.spec["lora"])
    model, injection = build_skeleton(base_config(str(model_dir)), lora, quantization, meta_buffers=True)
    paths = {id(m): n for n, m in model.named_modules()}
    paths.update({id(m.base): n for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    plan = plan_weights(model, model_dir, injection.transposed)
    items, placed, found = [], set(), set()
    for module, pname, src in plan.entries:
        path = paths[id(module)]
        delta = deltas.get(path) if pname == "weight" else None
        if delta is not None:
            found.add(path)
            if (delta.B.shape[0], delta.A.shape[1]) != tuple(src.shape):
                plan.close()
                raise ArtifactError(f"{path}: the adapter's update is {delta.B.shape[0]} x {delta.A.shape[1]}, the "
                                    f"base's weight {tuple(src.shape)}")
        items.append(Item(src.key, src, _dtype(src, dtype), delta,
                          quantized=isinstance(module, Int8Linear) and pname == "weight"))
        placed.add((id(src.reader), src.key))
    missing = sorted(set(deltas) - found)
    if missing:
        plan.close()
        raise ArtifactError(f"the adapter updates modules the base has no weight for: {missing[:3]}")
    for reader in plan.readers:  # what the loader leaves to the model passes through unchanged
        for key in reader.keys():
            if (id(reader), key) not in placed:
                items.append(Item(key, TensorSource(reader, key), _dtype(TensorSource(reader, key), dtype)))
    return items


def _dtype(source: TensorSource, merged: torch.dtype) -> torch.dtype:
    stored = source.reader.dtype(source.key)
    return merged if stored.is_floating_point else stored


def _split(items: list[Item], shard_bytes: int):
    """The shards as huggingface_hub (and so ``save_pretrained``) splits a state dict: in order, a
    new file whenever the next tensor would pass the limit; one larger tensor alone in its own."""
    from huggingface_hub import split_state_dict_into_shards_factory

    return split_state_dict_into_shards_factory({i.key: i for i in items}, get_storage_size=lambda i: i.nbytes,
                                                filename_pattern="model{suffix}.safetensors",
                                                max_shard_size=shard_bytes)


def _write_shards(d: Path, items: list[Item], split, say: Callable[[str], None]) -> None:
    by_key = {i.key: i for i in items}
    n = len(split.filename_to_tensors)
    for k, (name, keys) in enumerate(split.filename_to_tensors.items(), 1):
        t0 = time.time()
        shard = [by_key[key] for key in keys]
        with SafetensorsWriter(d / name, [(i.key, i.dtype, i.stored_shape) for i in shard],
                               metadata={"format": "pt"}) as writer:
            for i in shard:
                writer.write(i.key, i.pieces())
        say(f"wrote {name} ({k}/{n}): {len(shard)} tensors, {fmt_bytes(sum(i.nbytes for i in shard))} "
            f"in {time.time() - t0:.1f} s")
    if n > 1:
        total = sum(i.source.numel for i in items)
        index = {"metadata": {**split.metadata, "total_parameters": total}, "weight_map": split.tensor_to_filename}
        (d / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_config(d: Path, config: dict, dtype: torch.dtype) -> None:
    """The base's config.json as a plain float model of the merged dtype."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["dtype"] = DTYPE_NAMES[dtype]
    if "torch_dtype" in config:  # written by transformers before 4.56: both say the same
        config["torch_dtype"] = DTYPE_NAMES[dtype]
    (d / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_tokenizer(d: Path, model_dir: Path, manifest: Manifest) -> None:
    """The base's tokenizer and generation config as they are; a chat adapter's template (the
    one it trained with, from its manifest) as the tokenizer's own, so the model chats as trained."""
    template = manifest.data.chat_template if manifest.data is not None else None
    for name in ALLOW_PATTERNS:  # the files besides the weights a base directory holds (hub.py)
        f = model_dir / name
        if name == "config.json" or not f.is_file() or (template and name == "chat_template.json"):
            continue
        shutil.copyfile(f, d / name)
    if template:
        (d / CHAT_TEMPLATE_FILE).write_text(template)
        tok_config = d / "tokenizer_config.json"
        if tok_config.is_file():  # a template there as well would compete with the file's
            raw = json.loads(tok_config.read_text())
            if raw.pop("chat_template", None) is not None:
                tok_config.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
