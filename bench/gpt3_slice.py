"""A GPT-3-width slice trained on this machine (issue 12; docs/design.md decision 10).

    python bench/gpt3_slice.py [--blocks 1] [--workers 1 2] [--steps 3] [--max-length 64]

Writes a GPT-3-shaped model (GPT-2 architecture: d_model 12288, 96 heads, d_ff 49152, vocabulary
50257, context 2048) with k of its 96 decoder blocks as a real Hugging Face safetensors directory
of random fp16 weights, one tensor at a time and each tensor in row blocks (never a whole float
model, nor a whole tensor, in memory); then trains LoRA r=4 on Wq and Wv (the paper's GPT-3
setting: the q and v slices of the fused c_attn) for a few steps through ``lora-dist submit``
with ZeRO-3 on N = 1 and 2 CPU workers, and prints per run:

* int8 base bytes per rank (the manifest's int8_partition_bytes),
* measured peak per rank (metrics.jsonl) against ``lora-dist plan`` of the same slice,
* adapter parameters and bytes against the exact count: 196,608 parameters per block
  (x 96 = 18,874,368; 37,748,736 bytes in fp16). The trained parameters (the manifest's
  trainable_params) are exactly that. The PEFT-format file holds twice as many: PEFT has no LoRA
  on output slices of a fused projection, so the q and v pairs are exported as one rank-2r pair
  whose B is full width with zero rows for k (adapter.py), 393,216 parameters per block.

Compute is fp32 on CPU (train.dtype auto), micro-batch 1, sequences of at most --max-length
tokens (E2E references are short; a 2048-token step at this width takes minutes on two cores).
The slice is written once to <cache>/bench/gpt3-slice-<k> (about 3.6 GB per block + 1.3 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lora_dist.base import resolve_base
from lora_dist.store import cache_root

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
D, HEADS, FF, VOCAB, CONTEXT, FULL_LAYERS = 12288, 96, 4 * 12288, 50257, 2048, 96
LORA_PER_BLOCK = 2 * (4 * D + D * 4)  # r=4 on Wq and Wv: A (r x d) and B (d x r) each
ROWS_PER_WRITE = 1024


def slice_tensors(k: int, D: int = D) -> list[tuple[str, tuple[int, ...], str]]:  # noqa: N803 - the width
    """(name, shape, init) of a k-block GPT-3-width GPT-2 checkpoint, in file order (``D``: another
    width with GPT-3's vocabulary and context, for bench/load.py's memory timeline)."""
    FF = 4 * D  # noqa: N806
    out = [("transformer.wte.weight", (VOCAB, D), "normal"), ("transformer.wpe.weight", (CONTEXT, D), "normal")]
    for i in range(k):
        h = f"transformer.h.{i}."
        out += [(h + "ln_1.weight", (D,), "ones"), (h + "ln_1.bias", (D,), "zeros"),
                (h + "attn.c_attn.weight", (D, 3 * D), "normal"), (h + "attn.c_attn.bias", (3 * D,), "zeros"),
                (h + "attn.c_proj.weight", (D, D), "proj"), (h + "attn.c_proj.bias", (D,), "zeros"),
                (h + "ln_2.weight", (D,), "ones"), (h + "ln_2.bias", (D,), "zeros"),
                (h + "mlp.c_fc.weight", (D, FF), "normal"), (h + "mlp.c_fc.bias", (FF,), "zeros"),
                (h + "mlp.c_proj.weight", (FF, D), "proj"), (h + "mlp.c_proj.bias", (D,), "zeros")]
    out += [("transformer.ln_f.weight", (D,), "ones"), ("transformer.ln_f.bias", (D,), "zeros")]
    return out


def write_slice(k: int, width: int = D) -> Path:
    """The k-block slice as a Hugging Face directory (written once, then reused); ``width``: d_model
    (GPT-3's by default; heads of 128 dimensions, d_ff 4 x width)."""
    from transformers import GPT2Config

    d = cache_root() / "bench" / (f"gpt3-slice-{k}" if width == D else f"gpt3-slice-{k}-d{width}")
    if (d / "config.json").is_file():
        return d
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    GPT2Config(n_layer=k, n_embd=width, n_head=width // 128, n_inner=4 * width, n_positions=CONTEXT, vocab_size=VOCAB,
               activation_function="gelu_new", attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
               tie_word_embeddings=True, dtype="float16").save_pretrained(tmp)
    tensors = slice_tensors(k, width)
    header, offset = {}, 0
    for name, shape, _ in tensors:
        size = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(tmp / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, init in tensors:
            rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
            std = 0.02 / (2 * FULL_LAYERS) ** 0.5 if init == "proj" else 0.02
            for r in range(0, rows, ROWS_PER_WRITE):
                n = min(ROWS_PER_WRITE, rows - r)
                if init in ("normal", "proj"):
                    block = (torch.randn(n, cols, generator=gen) * std).half()
                else:
                    block = (torch.ones if init == "ones" else torch.zeros)(n, cols, dtype=torch.float16)
                f.write(block.numpy().tobytes())
            print(f"  wrote {name} {tuple(shape)}", flush=True)
    # a real tokenizer: SmolLM2's (49,152 ids, all below GPT-3's 50,257)
    src = resolve_base("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, tmp / name)
    os.rename(tmp, d)
    print(f"slice with {k} block(s) written to {d} in {time.time() - t0:.0f} s "
          f"({(d / 'model.safetensors').stat().st_size / 1e9:.2f} GB)", flush=True)
    return d


def slice_spec(base: Path, workers: int, steps: int, max_length: int, out: Path) -> dict:
    return {"name": f"gpt3-slice-n{workers}",
            "model": {"base": str(base), "quantization": "int8"},
            "lora": {"r": 4, "alpha": 4, "dropout": 0.0, "targets": ["c_attn"]},
            "data": {"source": "e2e", "path": str(DATA), "max_length": max_length, "max_val_examples": 4},
            "train": {"max_steps": steps, "micro_batch_size": 1, "lr": 1e-4, "warmup_steps": 0, "eval_batches": 1,
                      "log_every": 1},
            "cluster": {"workers": workers, "zero_stage": 3, "cpus_per_worker": max(1, 2 // workers)},
            "output": {"dir": str(out), "adapter_dtype": "float16"}}


def cli(*args: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"lora-dist {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def run_slice(base: Path, workers: int, steps: int, max_length: int, work: Path) -> dict:
    """Train the slice through `lora-dist submit`; return what it measured and what was planned."""
    import yaml

    out = work / f"n{workers}"
    out.mkdir(parents=True, exist_ok=True)
    job = work / f"gpt3-slice-n{workers}.yaml"
    spec = slice_spec(base, workers, steps, max_length, out)
    job.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "LORA_DIST_OUTPUT_ROOT": str(work), "TOKENIZERS_PARALLELISM": "false"}
    plan = json.loads(cli("plan", str(job), "--gpus", str(workers), "--device", "cpu", "--json", env=env))
    t0 = time.time()
    stdout = cli("submit", str(job), env=env)
    artifact = Path(stdout.strip().splitlines()[-1])
    manifest = json.loads((artifact / "manifest.json").read_text())
    recs = [json.loads(x) for x in (artifact / "metrics.jsonl").read_text().splitlines() if '"peak_memory_bytes"' in x]
    from safetensors import safe_open

    with safe_open(str(artifact / "adapter_model.safetensors"), "pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
        dtypes = {f.get_slice(key).get_dtype() for key in f.keys()}
    adapter_params = sum(int(torch.Size(s).numel()) for s in shapes.values())
    return {"workers": workers, "spec": spec, "seconds": time.time() - t0, "artifact": str(artifact),
            "int8_partition_bytes": manifest["int8_partition_bytes"], "int8_full_bytes": manifest["int8_full_bytes"],
            "measured_peak": recs[-1]["peak_memory_bytes"], "planned_peak": plan["per_worker_bytes"],
            "plan_terms": plan["methods"]["lora_int8_zero3"]["terms"],
            "losses": [r["loss"] for r in recs], "tokens_per_s": recs[-1]["tokens_per_s"],
            "trainable_params": manifest["trainable_params"],
            "adapter_params": adapter_params, "adapter_dtypes": sorted(dtypes),
            "adapter_tensor_bytes": 2 * adapter_params,
            "adapter_file_bytes": (artifact / "adapter_model.safetensors").stat().st_size,
            "val_loss_before": manifest.get("val_loss_before"), "val_loss_after": manifest.get("val_loss_after")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=1, choices=(1, 2))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--save", default=None, help="write the runs to this JSON file")
    args = ap.parse_args()
    base = write_slice(args.blocks)
    runs = []
    with tempfile.TemporaryDirectory(prefix="gpt3-slice-") as tmp:
        for n in args.workers:
            print(f"training the {args.blocks}-block slice on {n} worker(s) ...", flush=True)
            try:
                runs.append(run_slice(base, n, args.steps, args.max_length, Path(tmp)))
            except SystemExit as e:  # one failed N (out of memory, say) keeps the others' figures
                print(f"N={n} failed: {str(e)[-600:]}", flush=True)
            if args.save:
                Path(args.save).write_text(json.dumps(runs, indent=1))
    if not runs:
        raise SystemExit("no run of the slice finished")
    k = args.blocks
    print(f"\nGPT-3-width slice: {k} of 96 blocks (d_model {D}, {HEADS} heads, d_ff {FF}, vocab {VOCAB}), "
          f"LoRA r=4 on Wq, Wv, ZeRO-3, fp32 compute on CPU, micro-batch 1 x <= {args.max_length} tokens")
    print(f"{'N':>2} {'int8 base / rank':>18} {'of':>15} {'measured peak GiB / rank':>26} {'planned GiB':>12} "
          f"{'worst error':>12} {'tok/s':>7} {'losses':>24}")
    for r in runs:
        worst = max(abs(r["planned_peak"] - m) / m for m in r["measured_peak"])
        print(f"{r['workers']:>2} {r['int8_partition_bytes']:>18,} {r['int8_full_bytes']:>15,} "
              f"{str([round(m / 2**30, 2) for m in r['measured_peak']]):>26} {r['planned_peak'] / 2**30:>12.2f} "
              f"{100 * worst:>11.1f}% {r['tokens_per_s']:>7.1f} {str([round(x, 3) for x in r['losses']]):>24}")
    r = runs[-1]
    exact = LORA_PER_BLOCK * k
    print(f"\ntrained LoRA parameters: {r['trainable_params']:,} (exact: {LORA_PER_BLOCK:,} per block x {k} = "
          f"{exact:,}: {'equal' if r['trainable_params'] == exact else 'DIFFERENT'}); at 96 blocks "
          f"{LORA_PER_BLOCK * 96:,} parameters, {2 * LORA_PER_BLOCK * 96:,} bytes in fp16 (the paper's 35 MB)")
    print(f"PEFT-format adapter file: {r['adapter_params']:,} parameters ({r['adapter_params'] / exact:.1f}x: B full "
          f"width with zero rows for k), {r['adapter_tensor_bytes']:,} bytes of {'/'.join(r['adapter_dtypes'])} "
          f"tensors, {r['adapter_file_bytes']:,} bytes with the header; at 96 blocks "
          f"{r['adapter_tensor_bytes'] // k * 96:,} bytes")


if __name__ == "__main__":
    main()
