"""E2E quality like the paper's Table 3 (issue 6): train on the main job's split of
jobs/data/e2e/devset.csv (``data.split``: by default whole restaurants held out), evaluate on the
held-out MRs with the paper's decoding: BLEU, NIST, METEOR, ROUGE-L, CIDEr and the slot error
rate (SER: missing, wrong and added attributes over all of the MRs' attributes, lora_dist/slots.py).

Rows (same examples in the same order for every trained row):
  * SmolLM2-135M base, no adapter (prompted with the same template);
  * LoRA on a float base, one process (gradient accumulation 2 = the 2 workers' batches);
  * LoRA on the int8 base, ZeRO-3 over 2 workers: the product's path, the main job's settings;
  * full fine-tuning, same steps and batches (one process, accumulation 2).

    python bench/e2e_quality.py [--steps N] [--limit N] [--beams 10]

The held-out MRs are written to a temporary csv for `evaluate_e2e`; nothing is copied into the repo.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
JOB = REPO / "jobs" / "smollm2-e2e.yaml"


def held_out_csv(out: Path, data_spec) -> Path:
    """The validation side of the trained rows' split (``data.split``: by default whole
    restaurants the adapters never saw) as an E2E csv."""
    from lora_dist.data import read_e2e, split_examples

    _, val = split_examples(read_e2e(DATA), data_spec)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        for e in val:
            w.writerow([e.mr, e.completion.strip()])
    return out


def score(model, tokenizer, csv_path: Path, args) -> dict:
    from lora_dist.data import adds_bos
    from lora_dist.evaluate import evaluate_e2e

    t0 = time.time()
    _, m, _ = evaluate_e2e(model, tokenizer, csv_path, limit=args.limit, num_beams=args.beams,
                           bos=adds_bos(tokenizer))
    m["eval_s"] = round(time.time() - t0, 1)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="default: the main job's train.max_steps")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out MRs only")
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override the main job's settings for every trained row (as lora-dist --set)")
    ap.add_argument("--rows", default="base,float,ours,full",
                    help="comma-separated rows to run (base: no adapter, float: LoRA on a float base in one "
                         "process, ours: int8 ZeRO-3 x2, full: full fine-tuning); default all")
    args = ap.parse_args()
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(wanted) - {"base", "float", "ours", "full"})
    if unknown or not wanted:
        ap.error(f"--rows: unknown row(s) {unknown or wanted}; expected a comma-separated subset of "
                 "base,float,ours,full")

    import ray

    from lora_dist.adapter import load_adapted
    from lora_dist.launch import run_job
    from lora_dist.model import load_model
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    base_spec = load_spec(JOB, [f"data.path={DATA}", *args.set])
    steps = args.steps or base_spec.train.max_steps
    common = [f"data.path={DATA}", f"train.max_steps={steps}", *args.set]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LORA_DIST_OUTPUT_ROOT"] = str(tmp)
        heldout = held_out_csv(tmp / "heldout.csv", base_spec.data)

        if "base" in wanted:
            lm = load_model("smollm2-135m", None, "none")
            rows["SmolLM2-135M, no adapter"] = {"trainable": 0, "train_s": 0,
                                                **score(lm.model, lm.tokenizer, heldout, args)}
            del lm

        ga = str(2 * base_spec.train.grad_accum)
        runs = {
            "LoRA, float base, 1 process": ("float", "local", ["model.quantization=none", f"train.grad_accum={ga}"]),
            "LoRA, int8 base, ZeRO-3 x2 (ours)": ("ours", "ray", ["cluster.workers=2"]),
            "full fine-tuning, 1 process": ("full", "local", ["model.quantization=none", "train.method=full",
                                                              f"train.grad_accum={ga}", "train.lr=2e-5"]),
        }
        runs = {name: run[1:] for name, run in runs.items() if run[0] in wanted}
        ray.init(num_cpus=2, runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                       "TOKENIZERS_PARALLELISM": "false"}})
        for name, (where, extra) in runs.items():
            spec = load_spec(JOB, [*common, f"output.dir={tmp / name[:8].replace(' ', '_')}", *extra])
            t0 = time.time()
            artifact = train_local(spec) if where == "local" else run_job(spec)
            train_s = time.time() - t0
            loaded, manifest = load_adapted(Path(artifact))
            rows[name] = {"trainable": manifest["trainable_params"], "train_s": round(train_s),
                          "val_loss": manifest.get("val_loss_after"),
                          **score(loaded.model, loaded.tokenizer, heldout, args)}
            del loaded
        ray.shutdown()

    n_mrs = args.limit or "all"
    print(f"\nE2E held-out MRs ({n_mrs}) of devset.csv, data.split {base_spec.data.split}, {steps} steps, beam "
          f"{args.beams}, length penalty 0.9, no-repeat 4-gram")
    print(f"  {'row':<36} {'trainable':>12} {'BLEU':>6} {'NIST':>6} {'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>6} "
          f"{'SER':>6} {'train s':>8}")
    for name, r in rows.items():
        met = "-" if r["METEOR"] is None else f"{r['METEOR']:.1f}"
        print(f"  {name:<36} {r['trainable']:>12,} {r['BLEU']:>6.1f} {r['NIST']:>6.2f} {met:>7} {r['ROUGE_L']:>8.1f} "
              f"{r['CIDEr']:>6.2f} {r['SER']:>5.1f}% {r['train_s']:>8}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
