"""The model: build a base's skeleton without weights, quantize, inject LoRA, stream the weights in.

No worker ever holds the whole model in 16/32-bit (docs/design.md decision 3): the Hugging Face
architecture is built with every parameter on the meta device, decoder-block linears are
replaced by :class:`Int8Linear` (or kept float), LoRA wraps the targets (:func:`build_skeleton`,
the one builder every path uses: loading, the ZeRO engine, checks and the planner's counts), and
then tensors are streamed one at a time from the safetensors files (``weights.py``), each linear
weight quantized as it arrives. Where the base comes from and what its directory must hold is
``base.py``; the planner's counting on the skeleton is ``counting.py``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lora_dist.base import SUPPORTED, FileHasher, base_config, cached_fingerprint, combine_fingerprint, \
    resolve_base, weight_files
from lora_dist.errors import ModelError
from lora_dist.hub import split_ref
from lora_dist.lora import LoRALinear, set_trainable, trainable_parameters
from lora_dist.quant import Int8Linear
from lora_dist.spec import LINEAR_TARGET_ALL, SHAPES, LoraSpec
from lora_dist.weights import load_weights, plan_weights


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
    transposed: set[str]  # module paths whose stored weight is (in, out) (GPT-2 Conv1D)


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


class FrozenMatmul(torch.autograd.Function):
    """y = x · Wᵀ + bias for a frozen W, keeping W itself on the context (as ``quant.Int8Matmul``)
    where ``F.linear`` saves the view ``Wᵀ``. Under ZeRO-3 that view keeps the gathered storage
    alive after DeepSpeed releases the parameter, and the backward then gathers a second copy: at
    GPT-3 width the head's 50257 x 12288 fp32 weight held twice at once (bench/RESULTS.md)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.weight = weight  # the parameter, not a view of the storage it has now
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ ctx.weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None


class FrozenHead(nn.Linear):
    """The output projection (the head) when it does not train: :class:`FrozenMatmul`, the same
    product as ``nn.Linear``; a head that trains (``train.method: full``) runs ``nn.Linear``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad):
            return super().forward(x)
        return FrozenMatmul.apply(x, self.weight, self.bias)


def build_skeleton(config, lora: LoraSpec | None, quantization: str, *, full: bool = False,
                   dtype: torch.dtype | None = None, meta_buffers: bool = False) -> tuple[nn.Module, Injection]:
    """The architecture of ``config`` with every parameter on the meta device (nothing allocated;
    a float linear that will be int8 never exists), tied embeddings tied, decoder-block linears
    quantized and LoRA injected (:func:`prepare`), and the trainable set made
    (``lora.set_trainable``). Every path builds its model here: the single-process load, the ZeRO
    engine (which then gives it storage), the checks, and the planner's counts.

    Args:
        config: a transformers config (``base.base_config``).
        lora: LoRA settings; None injects no LoRA.
        quantization: ``int8`` or ``none``.
        full: ``train.method: full``: no LoRA (``lora`` is ignored) and every float weight trains.
        dtype: the float parameters' dtype; None: the config's.
        meta_buffers: buffers (rotary tables) on the meta device too, for a model that is only
            counted or checked; otherwise they are real, as a model that is loaded and run needs.

    Returns:
        The model and the :class:`Injection` record.

    Raises:
        ModelError: as :func:`prepare`.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta") if meta_buffers else params_on_meta():
        model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
        if getattr(model.config, "tie_word_embeddings", False):
            model.tie_weights()
        injection = prepare(model, None if full else lora, quantization, device="meta")
    set_trainable(model, full)
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:  # the same module and parameters (a tied head stays tied); its forward saves less
        head.__class__ = FrozenHead
    return model, injection


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant: gradients reach LoRA inside
    blocks whose inputs do not require grad, as with a frozen base)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def embeddings_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (as PEFT does for k-bit training): with a
    frozen base the first block's input would otherwise not, and a block's full backward hook
    (ZeRO-3's, ``engine.blocks_as_zero3_leaves``) would fire before its LoRA gradients exist."""
    model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True))


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
    and the base's weight files against it: their format and every tensor's name and shape, from
    the file headers alone (not a hub id's, whose weights only the job downloads: from its config alone).

    Raises:
        ModelError: naming lora.targets, lora.r, or what the weight files lack.
    """
    model, injection = build_skeleton(base_config(base), lora, quantization, meta_buffers=True)
    if base not in SHAPES and not split_ref(base):
        plan_weights(model, resolve_base(base), injection.transposed).close()  # the file headers only
    return injection


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
    from transformers import AutoConfig, AutoTokenizer

    model_dir = resolve_base(base)
    model, injection = build_skeleton(AutoConfig.from_pretrained(model_dir), lora, quantization,
                                      full=lora is None, dtype=dtype)
    fp = cached_fingerprint(model_dir)
    hasher = FileHasher(weight_files(model_dir)) if fp is None else None
    load_weights(model, model_dir, injection.transposed)
    if hasher is not None:
        fp = combine_fingerprint(model_dir, hasher.result())
    materialize_lora(model, seed)
    trainable = sum(p.numel() for p in trainable_parameters(model).values())
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir) if with_tokenizer else None
    return LoadedModel(model, tokenizer, model_dir, injection, trainable, fp)
