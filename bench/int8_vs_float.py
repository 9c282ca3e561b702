"""int8 against float base on held-out E2E batches: mean |logit difference| and top-1 agreement.

    python bench/int8_vs_float.py [--data jobs/data/e2e/devset.csv] [--batches 8]

Both models are SmolLM2-135M with the same fresh LoRA (B = 0), so the difference is the int8
row-wise quantization of every decoder-block linear alone. Validation MRs only (split by MR).
"""

from __future__ import annotations

import argparse
import json
import time

from lora_dist.data import tokenize, collate

from lora_dist.sources import read_e2e, split_by_prompt
from lora_dist.evaluate import logit_agreement
from lora_dist.model import load_model
from lora_dist.spec import LoraSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="jobs/data/e2e/devset.csv")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    args = ap.parse_args()

    lora = LoraSpec(r=8, targets=("q_proj", "v_proj"))
    t0 = time.time()
    fp = load_model("smollm2-135m", lora, "none")
    q8 = load_model("smollm2-135m", lora, "int8", with_tokenizer=False)
    _, val = split_by_prompt(read_e2e(args.data), 0.1)
    items = tokenize(val[: args.batches * args.batch_size], fp.tokenizer, args.max_length)
    pad = fp.tokenizer.pad_token_id
    batches = [collate(items[i:i + args.batch_size], pad) for i in range(0, len(items), args.batch_size)]
    res = logit_agreement(q8.model, fp.model, batches)
    res["seconds"] = round(time.time() - t0, 1)
    print(f"held-out E2E positions: {res['positions']}")
    print(f"mean |logit int8 - float|: {res['mean_abs_logit_diff']:.4f}   max: {res['max_abs_logit_diff']:.3f}")
    print(f"top-1 agreement: {100 * res['top1_agreement']:.2f}%")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
