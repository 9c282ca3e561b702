"""The base's weights: read safetensors with positioned reads and stream them into a skeleton.

Tensors are matched to the model's parameters from the file headers alone (:func:`plan_weights`),
then read one at a time (:class:`SafetensorsReader`: no memory map, so only what is being read is
resident); each int8 linear weight is quantized a row block at a time as it arrives. ``place`` is
the one hook where a tensor lands in a parameter, so the distributed loader (``engine``) can keep
only its rank's partition.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lora_dist import safejson
from lora_dist.base import weight_files
from lora_dist.errors import ModelError
from lora_dist.lora import LoRALinear, is_lora_param
from lora_dist.quant import LOAD_BLOCK_ELEMENTS, Int8Linear, quantize_rowwise, row_blocks

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own cap (MAX_HEADER_SIZE)


def _check_layout(header: dict, data_len: int) -> None:
    """Every tensor's ``data_offsets`` inside the file's ``data_len`` data bytes, as long as its
    dtype and shape say, and no two overlapping: a read never leaves the file nor takes another
    tensor's bytes, so a header that lies is refused when it is read (before submit), not mid-load.

    Raises:
        ValueError, KeyError, TypeError: naming the tensor and the field.
    """
    spans = []
    for key, info in header.items():
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {key} has unsupported dtype {dtype}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise ValueError(f"tensor {key}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
            raise ValueError(f"tensor {key}: data_offsets {offsets!r} is not [start, end]")
        start, end = offsets
        if not 0 <= start <= end <= data_len:
            raise ValueError(f"tensor {key}: data_offsets {offsets} outside the file's {data_len:,} data bytes")
        if end - start != math.prod(shape) * _ST_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {key}: {end - start} bytes for shape {shape} in {dtype}")
        spans.append((start, end, key))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"tensors {first} and {second} overlap (data_offsets)")


class SafetensorsReader:
    """Read tensors, or byte ranges of them, from a .safetensors file with plain positioned reads.

    ``safe_open`` memory-maps the file, and every page it touches stays in the process's resident
    set until the file is closed: streaming a whole model through one mapping would count the
    whole model against the reading rank. Positioned reads keep only what is being read, and
    ``bytes_read`` counts them (a rank reading its share reads 1/N of the weight files).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        self.bytes_read = 0
        try:
            size = os.fstat(self._fd).st_size
            (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if n > MAX_HEADER_BYTES:  # refused before a byte of it is read
                raise ValueError(f"its header length is {n:,} bytes; safetensors allows at most {MAX_HEADER_BYTES:,}")
            if 8 + n > size:
                raise ValueError(f"header length {n} exceeds the file")
            header = safejson.loads(os.pread(self._fd, n, 8), MAX_HEADER_BYTES)
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            header.pop("__metadata__", None)
            _check_layout(header, size - 8 - n)
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


class SafetensorsWriter:
    """Write a .safetensors file a piece at a time, the inverse of :class:`SafetensorsReader`.

    Every tensor's name, dtype and shape are given up front, so the header (written first, padded
    to 8 bytes as the safetensors library pads it) holds the offsets before any data exists; each
    tensor's bytes then follow in that order, in as many pieces as the caller likes. Nothing but
    the piece being written need be resident (``merge`` writes a 70B model's shards this way).
    """

    def __init__(self, path: Path, tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> None:
        names = {dtype: name for name, dtype in _ST_DTYPES.items()}
        header: dict = {"__metadata__": metadata} if metadata else {}
        self._sizes: list[tuple[str, int]] = []
        offset = 0
        for name, dtype, shape in tensors:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append((name, size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, pieces) -> None:
        """Write tensor ``name`` (the next one the header lists) from ``pieces``: tensors whose
        bytes, in row-major order one after the other, make up its stored value."""
        if not self._sizes or self._sizes[0][0] != name:
            raise ValueError(f"{self.path}: {name} written out of the header's order")
        _, size = self._sizes.pop(0)
        done = 0
        for piece in pieces:
            data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._f.write(memoryview(data))
            done += data.nbytes
        if done != size:
            raise ValueError(f"{self.path}: {name} has {done} bytes, its header says {size}")

    def close(self) -> None:
        self._f.close()
        if self._sizes:
            raise ValueError(f"{self.path}: {len(self._sizes)} tensors never written ({self._sizes[0][0]}, ...)")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()


@dataclass
class TensorSource:
    """One stored tensor as the model sees it (GPT-2's Conv1D weights transposed to (out, in)),
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
    """Put a stored tensor into ``module.<pname>`` of a meta skeleton: an Int8Linear weight is
    read and quantized a row block at a time (never a whole float copy), anything else as is. The
    new parameter keeps the old one's ``requires_grad``: loading does not change the trainable set
    (``lora.set_trainable``) the skeleton was built with."""
    if isinstance(module, Int8Linear) and pname == "weight":
        rows, cols = source.shape
        q = torch.empty(rows, cols, dtype=torch.int8)
        absmax = torch.empty(rows, dtype=torch.float32)
        for r0, r1 in row_blocks(rows, cols, LOAD_BLOCK_ELEMENTS):
            q[r0:r1], absmax[r0:r1] = quantize_rowwise(source.rows(r0, r1))
        module.weight = nn.Parameter(q, requires_grad=False)
        module.weight_absmax = nn.Parameter(absmax, requires_grad=False)
        return
    value = source.read()
    old = getattr(module, pname)
    dtype = old.dtype if old.is_floating_point() and value.is_floating_point() else value.dtype
    setattr(module, pname, nn.Parameter(value.to(dtype).contiguous(),
                                        requires_grad=old.requires_grad and dtype.is_floating_point))


@dataclass
class WeightPlan:
    """Where every stored tensor goes, worked out from the file headers alone."""
    entries: list[tuple[nn.Module, str, TensorSource]]
    readers: list[SafetensorsReader]
    files: list[Path]

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self.readers)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def plan_weights(model: nn.Module, model_dir: Path, transposed: set[str]) -> WeightPlan:
    """Match the stored tensors to the model's parameters before reading any weight.

    ``transposed``: module paths whose stored weight is (in, out) (GPT-2's Conv1D,
    ``model.Injection.transposed``).

    Keys are renamed as transformers renames them (GPT-NeoX's ``embed_out``), and weights
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
        return _plan_weights(model, model_dir, transposed, files, readers)
    except BaseException:
        for r in readers:
            r.close()
        raise


def _plan_weights(model, model_dir, transposed, files, readers) -> WeightPlan:
    modules = dict(model.named_modules())
    rename = _key_renamer(model)
    params = {id(p): n for n, p in model.named_parameters()}  # tied weights: one name each
    wanted = {n for n in params.values() if not is_lora_param(n)}
    prefix = getattr(model, "base_model_prefix", "") or ""
    keys = [(r, k) for r in readers for k in r.keys()]
    # as transformers decides: the model expects the prefix and no stored key has it
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
            leftover.append(key)  # e.g. GPT-2's attn.bias buffer in old files: rebuilt by the model
            continue
        source = TensorSource(reader, key, transposed=mod_path in transposed and pname == "weight")
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
        raise ModelError(f"{model_dir}: the weight files have no weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''} ({len(missing)} parameters); tensors it has "
                         f"that match nothing: {leftover[:5]}{' ...' if len(leftover) > 5 else ''}")
    return WeightPlan(entries, readers, files)


def load_weights(model: nn.Module, model_dir: Path, transposed: set[str],
                 place: Placer = default_place) -> WeightPlan:
    """Stream the weight files into the skeleton, one tensor at a time, in file order.

    ``transposed``: as :func:`plan_weights`.

    ``place(module, name, source)`` puts each tensor in, reading from ``source`` only what it
    keeps (see :class:`TensorSource`); float tensors are cast to the parameter's dtype as they are
    copied, and int8 linear weights are quantized from their stored dtype.

    Returns:
        The :class:`WeightPlan` it followed (its readers closed; ``bytes_read`` counts what was read).
    """
    plan = plan_weights(model, model_dir, transposed)
    try:
        for module, pname, source in plan.entries:
            place(module, pname, source)
    finally:
        plan.close()
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return plan



def _key_renamer(model: nn.Module) -> Callable[[str], str]:
    """Map stored key names to the model's (GPT-NeoX saves ``lm_head`` as ``embed_out``).

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

