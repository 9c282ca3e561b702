"""Planner against measurement: real jobs at N = 1, 2, 4 workers on SmolLM2-135M and on a
Llama-shaped ~1B model with random weights (written once to safetensors), each worker's measured
peak memory against the plan's prediction (issue 5).

    python bench/plan_vs_measured.py [--steps 2] [--workers 1 2 4]

The per-process overhead is calibrated once, on SmolLM2 at N=1, and then held fixed for every
other case. Measured memory is each rank's peak RSS (CPU workers, fp32 compute, one thread each).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import ray

from lora_dist.launch import run_job
from lora_dist.model import count_model, resolve_base
from lora_dist.plan import GiB, OVERHEAD_BYTES, Setup, memory_terms
from lora_dist.spec import LoraSpec, cache_root, load_spec
from lora_dist.store import METRICS_FILE

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=2048)


def llama_1b_dir() -> Path:
    """A Llama-shaped model of about 1B parameters with random weights, SmolLM2's tokenizer."""
    d = cache_root() / "bench" / "llama-1b-random"
    if (d / "config.json").is_file():
        return d
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B))
    tmp = d.with_name(d.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(resolve_base("smollm2-135m")).save_pretrained(tmp)
    del model
    os.rename(tmp, d)
    return d


def measure(base: str, workers: int, steps: int, out: Path) -> list[int]:
    spec = load_spec(REPO / "jobs" / "smollm2-e2e.yaml", [
        f"model.base={base}", f"cluster.workers={workers}", f"train.max_steps={steps}", f"output.dir={out}",
        "train.micro_batch_size=4", "data.max_length=64", "train.eval_batches=1", "train.log_every=1",
        f"data.path={DATA}"])
    artifact = run_job(spec)
    recs = [json.loads(x) for x in (artifact / METRICS_FILE).read_text().splitlines() if '"loss"' in x]
    return recs[-1]["peak_memory_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--save", default=None, help="write the measurements to this JSON file")
    ap.add_argument("--measured", default=None, help="re-plan against measurements saved by --save (no runs)")
    args = ap.parse_args()
    models = {"smollm2-135m": "smollm2-135m", "llama-1b (random)": str(llama_1b_dir())}
    lora = LoraSpec(r=8, targets=("q_proj", "v_proj"))
    if args.measured:
        runs = json.loads(Path(args.measured).read_text())
    else:
        runs = []
        ray.init(num_cpus=max(args.workers), runtime_env={"env_vars": {
            "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "TOKENIZERS_PARALLELISM": "false"}})
        with tempfile.TemporaryDirectory() as tmp:
            for label, base in models.items():
                for n in args.workers:
                    runs.append({"model": label, "workers": n,
                                 "measured": measure(base, n, args.steps, Path(tmp) / f"{label[:6]}-{n}")})
        ray.shutdown()
        if args.save:
            Path(args.save).write_text(json.dumps(runs))
    counts = {label: count_model(base, lora) for label, base in models.items()}
    rows = [{**r, "terms": memory_terms(counts[r["model"]], "lora_int8_zero3",
                                        Setup(workers=r["workers"], micro_batch=4, seq_len=64, device="cpu"))}
            for r in runs]

    # Calibrate the overhead once: SmolLM2 at the smallest N, rank 0.
    first = rows[0]
    calibrated = first["measured"][0] - (sum(first["terms"].values()) - first["terms"]["overhead"])
    print(f"overhead calibrated once on {first['model']} N={first['workers']}: {calibrated / GiB:.3f} GiB "
          f"(plan.py constant: {OVERHEAD_BYTES['cpu'] / GiB:.3f} GiB)")
    print(f"\n{'model':<18} {'N':>2} {'base shard/worker':>18} {'predicted GiB':>14} {'measured GiB (per rank)':>32} "
          f"{'worst error':>12}")
    worst_all = 0.0
    for r in rows:
        predicted = sum(r["terms"].values()) - r["terms"]["overhead"] + calibrated
        errs = [abs(predicted - m) / m for m in r["measured"]]
        worst = max(errs)
        if r is not first:
            worst_all = max(worst_all, worst)
        print(f"{r['model']:<18} {r['workers']:>2} {r['terms']['base_weights'] / 2**20:>15.1f} MiB "
              f"{predicted / GiB:>14.3f} {str([round(m / GiB, 3) for m in r['measured']]):>32} {100 * worst:>11.1f}%")
    print(f"\nlargest error (calibration case excluded): {100 * worst_all:.1f}% (target: 15%)")
    print("terms of the largest case (bytes):", json.dumps(rows[-1]["terms"]))


if __name__ == "__main__":
    main()
