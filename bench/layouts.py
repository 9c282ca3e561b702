"""The checkpoint layouts users have, built here from small random configs, and how we load them.

Each family is written as its publishers write it: sharded safetensors with
``model.safetensors.index.json`` (a small ``max_shard_size``), in bf16 or fp16; GPT-2 and OPT
saved from the base model class (keys without ``transformer.`` / ``model.``, as ``gpt2`` and the
OPT family are published). For each, the table reports:

* ``none |dlogit|``: max |logit difference| of our loader with ``quantization: none`` against
  ``AutoModelForCausalLM.from_pretrained`` (both fp32);
* ``int8 top-1``: how often the int8 base's next-token argmax agrees with ``from_pretrained``'s;
* ``PEFT |dlogit|`` (with ``--adapters``): a 2-step LoRA run at N=2 under ZeRO-3 (the job's worker
  code, gloo) makes an adapter; max |logit difference| between PEFT loading it onto the
  ``from_pretrained`` model and our own loading of it.

    python bench/layouts.py [--adapters] [--tokenizer DIR]

tests/test_layouts.py asserts the same comparisons.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# family -> (config class name, config kwargs, dtype, saved from the base class, lora targets)
LAYOUTS: dict[str, tuple[str, dict, torch.dtype, bool, tuple[str, ...]]] = {
    "llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=256),
              torch.bfloat16, False, ("q_proj", "v_proj")),
    "mistral": ("MistralConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                      max_position_embeddings=256, sliding_window=None),
                torch.float16, False, ("q_proj", "v_proj")),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256),
              torch.bfloat16, False, ("q_proj", "v_proj")),
    "gpt2": ("GPT2Config", dict(n_layer=2, n_embd=64, n_head=4, n_positions=256), torch.float16, True, ("c_attn",)),
    "opt": ("OPTConfig", dict(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4,
                              word_embed_proj_dim=64, max_position_embeddings=256), torch.bfloat16, True,
            ("q_proj", "v_proj")),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                       num_attention_heads=4, max_position_embeddings=256, tie_word_embeddings=False),
                 torch.float16, False, ("query_key_value",)),
}
SHARD = "48KB"  # small enough that every family is split across several files, with an index


def write_layout(family: str, dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write ``family``'s checkpoint to ``dest`` as it is published (see the module docstring),
    with the tokenizer of ``tokenizer_dir``."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    cls, kwargs, dtype, base_class, _ = LAYOUTS[family]
    # AutoTokenizer picks the family's tokenizer class from config.json (Qwen2's adds its own
    # special tokens): size the vocabulary by the tokenizer as this directory will load it
    dest.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dest)
    (dest / "config.json").write_text(getattr(transformers, cls)().to_json_string())
    tok = AutoTokenizer.from_pretrained(dest)
    special = {"bos_token_id": tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id,
               "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    config = getattr(transformers, cls)(vocab_size=len(tok), **kwargs, **special)
    torch.manual_seed(seed)
    model = (AutoModel if base_class else AutoModelForCausalLM).from_config(config).to(dtype)
    model.save_pretrained(dest, max_shard_size=SHARD)
    tok.save_pretrained(dest)
    if not (dest / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"{family}: expected a sharded checkpoint in {dest}")
    return dest


def write_refused(dest: Path, tokenizer_dir: Path) -> dict[str, tuple[Path, str]]:
    """Checkpoints the loader refuses, each with the phrase its error must contain:
    kind -> (directory, phrase)."""
    import json

    import transformers
    from transformers import AutoModelForCausalLM

    good = write_layout("llama", dest / "good", tokenizer_dir)
    out: dict[str, tuple[Path, str]] = {}

    def variant(kind: str, phrase: str) -> Path:
        d = dest / kind
        shutil.copytree(good, d)
        out[kind] = (d, phrase)
        return d

    d = variant("pickle-only (.bin)", "only pickle weights")
    for f in d.glob("model*.safetensors*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not unpickled")
    d = variant("trust_remote_code (auto_map)", "needs trust_remote_code")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    d = variant("unknown model_type", "does not ship")
    cfg = json.loads((good / "config.json").read_text())
    cfg["model_type"] = "custom_llama"
    (d / "config.json").write_text(json.dumps(cfg))
    d = variant("index names a missing shard", "not found in")
    next(iter(sorted(d.glob("model-*.safetensors")))).unlink()
    d = variant("no model.safetensors, no index", "no model.safetensors and no model.safetensors.index.json")
    (d / "model.safetensors.index.json").unlink()
    d = variant("not a safetensors file", "not a safetensors file")
    next(iter(sorted(d.glob("model-*.safetensors")))).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    d = variant("tensor shape differs from config", "tensor shapes differ")
    cfg = json.loads((good / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    moe = dest / "mixture-of-experts (Mixtral)"
    config = transformers.MixtralConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        vocab_size=1024)
    AutoModelForCausalLM.from_config(config).save_pretrained(moe)
    shutil.copy(good / "tokenizer.json", moe)
    out["mixture-of-experts (Mixtral)"] = (moe, "mixture-of-experts")
    return out


def compare(model_dir: Path, targets: tuple[str, ...], n: int = 4, length: int = 24) -> dict[str, float]:
    """Our loader against from_pretrained: max |logit diff| (float base), int8 top-1 agreement."""
    from transformers import AutoModelForCausalLM

    from lora_dist.model import load_model
    from lora_dist.spec import LoraSpec

    lora = LoraSpec(r=4, targets=targets)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, ref.config.vocab_size, (n, length), generator=gen)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        ours = load_model(str(model_dir), lora, "none", with_tokenizer=False).model(input_ids=ids).logits
        q8 = load_model(str(model_dir), lora, "int8", with_tokenizer=False).model(input_ids=ids).logits
    return {"none_max_abs": float((ours - want).abs().max()),
            "int8_top1": float((q8.argmax(-1) == want.argmax(-1)).float().mean())}


def peft_difference(model_dir: Path, artifact: Path, n: int = 4, length: int = 24) -> tuple[float, float]:
    """(max |logit diff| between PEFT loading our adapter onto from_pretrained and our own load of
    it, max |logit change| the adapter makes to the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_dist.adapter import load_adapted

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(ref, str(artifact)).eval()
    ours = load_adapted(artifact, quantization="none")[0].model
    ids = torch.randint(3, ref.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = peft(input_ids=ids).logits
        with peft.disable_adapter():
            base = peft(input_ids=ids).logits
        return float((theirs - ours(input_ids=ids).logits).abs().max()), float((theirs - base).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="tokenizer directory (default: the packaged SmolLM2's)")
    ap.add_argument("--adapters", action="store_true", help="also train at N=2 under ZeRO-3 and load with PEFT")
    ap.add_argument("--refused", action="store_true", help="print the refused checkpoint kinds and their messages")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "tests"))
    from lora_dist.base import resolve_base

    tok_dir = args.tokenizer or resolve_base("smollm2-135m")
    work = Path(tempfile.mkdtemp(prefix="lora-dist-layouts-"))
    try:
        if args.refused:
            from lora_dist.errors import ModelError
            from lora_dist.model import check_model

            print("| checkpoint | message (exit 2, before anything is submitted) |\n|---|---|")
            for kind, (d, _) in write_refused(work / "refused", tok_dir).items():
                try:
                    check_model(str(d), None, "int8")
                    message = "NOT REFUSED"
                except ModelError as e:
                    message = str(e).replace(str(d), "<dir>")
                print(f"| {kind} | {message} |", flush=True)
            return
        dirs = {f: write_layout(f, work / f, tok_dir) for f in LAYOUTS}
        arts = {}
        if args.adapters:
            from zero_run import train_adapters

            arts = train_adapters({f: (d, LAYOUTS[f][4]) for f, d in dirs.items()}, work / "runs", world=2)
        print(f"{'family':<9} {'layout':<34} {'dtype':<9} {'none |dlogit|':>13} {'int8 top-1':>10} "
              f"{'PEFT |dlogit|':>13}")
        for f, d in dirs.items():
            _, _, dtype, base_class, targets = LAYOUTS[f]
            r = compare(d, targets)
            files = len(list(d.glob("model-*.safetensors")))
            layout = f"{files} shards + index" + (", base-class keys" if base_class else "")
            peft = f"{peft_difference(d, arts[f])[0]:.2e}" if f in arts else "-"
            print(f"{f:<9} {layout:<34} {str(dtype).split('.')[-1]:<9} {r['none_max_abs']:>13.2e} "
                  f"{r['int8_top1']:>10.3f} {peft:>13}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
