"""The GPU checks of bench/gpu_check.sh, one section per call; each exits non-zero on failure.

    python bench/gpu_check.py int8        CUDA int8 linear and LoRA: forward, backward, dtypes
    python bench/gpu_check.py throughput  ours against PEFT + bitsandbytes 8-bit, same batches
    python bench/gpu_check.py slice OUT   the GPT-3-width slice on the GPU: tok/s, MFU, peak vs plan
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense bf16 FLOP/s by GPU name


def check(cond: bool, what: str) -> None:
    print(f"  {'ok  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        raise SystemExit(f"gpu check failed: {what}")


def int8() -> None:
    from lora_dist.lora import LoRALinear
    from lora_dist.quant import Int8Linear

    check(torch.cuda.is_available(), "a CUDA device is visible")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w = torch.randn(4096, 4096) * 0.02
    cpu_layer = Int8Linear.from_float(w)
    layer = Int8Linear.from_float(w.to(dev))
    check(torch.equal(layer.weight.cpu(), cpu_layer.weight) and torch.allclose(layer.weight_absmax.cpu(),
          cpu_layer.weight_absmax), "quantization on CUDA equals quantization on CPU")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(4, 512, 4096, device=dev, dtype=dtype, requires_grad=True)
        y = layer(x)
        ref = x.detach().float() @ layer.dequantized_weight(torch.float32).t()
        rel = float((y.float() - ref).norm() / ref.norm())
        y.float().square().mean().backward()
        check(y.dtype == dtype and x.grad.dtype == dtype and bool(torch.isfinite(x.grad).all()),
              f"{dtype}: output and input gradient in {dtype}, finite")
        check(rel < (1e-2 if dtype != torch.float32 else 1e-5), f"{dtype}: relative error {rel:.2e} against the "
              f"dequantized fp32 matmul")
    x = torch.randn(8, 4096, device=dev)
    check(torch.allclose(layer(x).cpu(), cpu_layer(x.cpu()), atol=1e-3), "fp32 forward on CUDA equals the CPU path")
    lora = LoRALinear(Int8Linear.from_float(w.to(dev)), r=8, alpha=16, dropout=0.05)
    check(lora.lora_A.device.type == "cuda" and lora.lora_A.dtype == torch.float32, "LoRA A on CUDA in fp32")
    x = torch.randn(4, 128, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
    out = lora(x)
    out.float().square().mean().backward()
    check(out.dtype == torch.bfloat16, "LoRA output in the compute dtype")
    check(lora.lora_A.grad is not None and lora.lora_A.grad.dtype == torch.float32
          and bool(torch.isfinite(lora.lora_A.grad).all()), "LoRA A gradient fp32 and finite")
    check(lora.lora_B.grad is not None and float(lora.lora_B.grad.abs().sum()) > 0, "LoRA B gradient nonzero")
    for name, fn in (("int8 linear (bf16)", lambda: layer(x.detach().view(-1, 4096))),
                     ("bf16 matmul", lambda: x.detach().view(-1, 4096) @ w.to(dev, torch.bfloat16).t())):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.time()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        print(f"  {name}: {(time.time() - t) / 20 * 1e3:.3f} ms per 512 tokens x 4096 x 4096")


def throughput(steps: int = 12) -> None:
    """Ours (int8, single process, bf16) against PEFT + bitsandbytes 8-bit (its default threshold
    6.0), LoRA r=8 on every linear, the main job's first micro-batches, same order."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_dist.data import BatchPlan
    from lora_dist.base import resolve_base
    from lora_dist.lora import trainable_parameters
    from lora_dist.model import load_model
    from lora_dist.spec import load_spec
    from lora_dist.train import micro_batch, prepare_data

    dev = torch.device("cuda")
    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [f"data.path={REPO / 'jobs/data/e2e/devset.csv'}",
                                                          "train.micro_batch_size=32"])
    d = resolve_base("smollm2-135m")
    ours = load_model("smollm2-135m", spec.injected_lora, "int8", seed=0, dtype=torch.bfloat16)
    data = prepare_data(spec, ours.tokenizer)
    plan = BatchPlan(len(data.train), 32, 0)
    batches = [{k: v.to(dev) for k, v in micro_batch(data, plan, i).items()} for i in range(steps)]

    def bench(model, name: str) -> float:
        opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-4)
        torch.cuda.reset_peak_memory_stats()
        tokens, t = 0, 0.0
        for i, b in enumerate(batches):
            if i == 2:
                torch.cuda.synchronize()
                t = time.time()
            loss = model(**b).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum()) if i >= 2 else 0
        torch.cuda.synchronize()
        rate = tokens / (time.time() - t)
        print(f"  {name:<40} {rate:10.0f} tokens/s  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB  "
              f"last loss {float(loss):.4f}", flush=True)
        check(bool(torch.isfinite(loss)), f"{name}: finite loss")
        return rate

    model = ours.model.to(dev)
    model.train()
    r_ours = bench(model, "ours: int8 base, bf16 compute")
    del model, ours
    torch.cuda.empty_cache()
    peft = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                dtype=torch.bfloat16, device_map={"": 0})
    peft = get_peft_model(peft, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))
    peft.train()
    r_peft = bench(peft, "PEFT + bitsandbytes 8-bit (threshold 6.0)")
    print(f"  ours / PEFT: {r_ours / r_peft:.2f}x")


def slice_on_gpu(out: Path) -> None:
    """The 1-block GPT-3-width slice through `lora-dist submit` on one GPU (bf16): tokens/s, MFU,
    measured peak against `lora-dist plan`."""
    sys.path.insert(0, str(REPO / "bench"))
    import yaml

    from gpt3_slice import LORA_PER_BLOCK, slice_spec, write_slice

    base = write_slice(1)
    spec = slice_spec(base, 1, 6, 128, out / "runs")
    spec["train"]["micro_batch_size"] = 16
    spec["cluster"].update({"gpus_per_worker": 1, "cpus_per_worker": 4})
    job = out / "gpt3-slice-gpu.yaml"
    (out / "runs").mkdir(parents=True, exist_ok=True)
    job.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "LORA_DIST_OUTPUT_ROOT": str(out)}
    plan = json.loads(subprocess.run([sys.executable, "-m", "lora_dist.cli", "plan", str(job), "--json"],
                                     check=True, capture_output=True, text=True, env=env).stdout)
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", "submit", str(job)], capture_output=True, text=True,
                          env=env)
    print(proc.stdout[-2000:])
    check(proc.returncode == 0, f"the slice trained on the GPU (exit {proc.returncode}): {proc.stderr[-1500:]}")
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    recs = [json.loads(x) for x in (artifact / "metrics.jsonl").read_text().splitlines() if '"peak_memory_bytes"' in x]
    rate = sum(r["tokens_per_s"] for r in recs[2:]) / max(1, len(recs[2:]))
    params = plan["model"]["total_params"]
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    measured = max(recs[-1]["peak_memory_bytes"])
    print(f"  slice: {params:,} parameters, {rate:.0f} tokens/s"
          + (f", MFU {4 * params * rate / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16" if peak else "")
          + f"; peak {measured / 2**30:.2f} GiB, planned {plan['per_worker_bytes'] / 2**30:.2f} GiB "
          f"({100 * (plan['per_worker_bytes'] - measured) / measured:+.1f}%); CUDA overhead calibration: "
          f"{(measured - plan['per_worker_bytes'] + plan['methods']['lora_int8_zero3']['terms']['overhead']) / 2**30:.2f}"
          f" GiB")
    manifest = json.loads((artifact / "manifest.json").read_text())
    check(manifest["precision"]["compute_dtype"] == "bf16", "the slice computed in bf16")
    from safetensors import safe_open

    with safe_open(str(artifact / "adapter_model.safetensors"), "pt") as f:
        n = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    check(n == LORA_PER_BLOCK, f"adapter parameters {n:,} == {LORA_PER_BLOCK:,} per block")


if __name__ == "__main__":
    what = sys.argv[1]
    {"int8": int8, "throughput": throughput}.get(what, lambda: slice_on_gpu(Path(sys.argv[2])))()
