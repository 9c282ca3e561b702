"""E2E quality like the paper's Table 3 (issue 6): train on the main job's split of
jobs/data/e2e/devset.csv (``data.split``: by default whole restaurants held out), evaluate on the
held-out MRs with the paper's decoding: BLEU, NIST, METEOR, ROUGE-L, CIDEr and the slot error
rate (SER: missing, wrong and added attributes over all of the MRs' attributes, lora_dist/slots.py).

Rows (same examples in the same order for every trained row):
  * SmolLM2-135M base, no adapter (prompted with the same template);
  * LoRA on a float base, one process (gradient accumulation 2 = the 2 workers' batches);
  * LoRA on the int8 base, ZeRO-3 over 2 workers: the product's path, the main job's settings;
  * full fine-tuning, same steps and batches (one process, accumulation 2).

    python bench/e2e_quality.py [--steps N] [--limit N] [--beams 10] [--job JOB.yaml] [--rows ...]
                                [--artifact DIR ...] [--rerank]

``--job`` names the job whose settings (and split) the trained rows use: the main job by default,
``jobs/smollm2-e2e-quality.yaml`` for the quality job. ``--artifact DIR`` scores an adapter that
is already trained (a row of its own; refused unless it was trained on the same split).
``--rerank`` scores every row twice from one beam search: its top candidate, and the candidate
with the fewest slot errors (``lora-dist eval --rerank ser``).

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
    from lora_dist.sources import read_e2e, split_examples

    _, val = split_examples(read_e2e(DATA), data_spec)
    with open(out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        for e in val:
            w.writerow([e.mr, e.completion.strip()])
    return out


def score(model, tokenizer, csv_path: Path, args, **decode) -> dict[str, dict]:
    """{rerank: metrics} for the reranks asked for (one beam search for all). ``decode``: the
    prompting of evaluate_e2e_reranks (template, bos, stop) where it is not the E2E template's."""
    from lora_dist.data import adds_bos
    from lora_dist.evaluate import evaluate_e2e_reranks

    t0 = time.time()
    reranks = ("none", "ser") if args.rerank else ("none",)
    scored = evaluate_e2e_reranks(model, tokenizer, csv_path, reranks, limit=args.limit, num_beams=args.beams,
                                  **{"bos": adds_bos(tokenizer), **decode})
    seconds = round(time.time() - t0, 1)  # of the one beam search both reranks share
    return {r: {**m, "eval_s": seconds} for r, (_, m, _) in scored.items()}


def float_row(spec) -> list[str]:
    """The overrides that make ``spec`` the float row: a float base in one process, accumulating
    the ours row's 2 workers' batches (the same examples in the same order)."""
    return ["model.quantization=none", f"train.grad_accum={2 * spec.train.grad_accum}"]


def same_split(manifest: dict, data_spec, artifact: Path) -> None:
    """Refuse an artifact trained on another split: it may have seen the held-out MRs."""
    theirs = manifest["spec"]["data"]
    for key in ("source", "split", "val_fraction"):
        ours = getattr(data_spec, key)
        if theirs.get(key) != ours:
            raise SystemExit(f"error: --artifact {artifact}: trained with data.{key} {theirs.get(key)!r}, the "
                             f"benchmark holds out data.{key} {ours!r}; it may have trained on the held-out MRs")
    from lora_dist.store import sha256_file

    trained_on = Path(theirs["path"] or "")
    if not trained_on.is_file() or sha256_file(trained_on) != sha256_file(DATA):
        raise SystemExit(f"error: --artifact {artifact}: trained on {theirs['path']}, which is not (or no longer) "
                         f"the contents of {DATA}: the held-out split would differ")


def never_saw(manifest: dict, heldout: Path, artifact: Path) -> None:
    """Refuse an artifact that trained or validated on an MR of ``heldout``."""
    from lora_dist.evaluate import e2e_items

    scored = set(e2e_items(heldout)[0])
    data = manifest["spec"]["data"]
    for key in ("path", "val_path"):
        if data.get(key) and Path(data[key]).is_file():
            seen = scored & set(e2e_items(data[key])[0])
            if seen:
                raise SystemExit(f"error: --artifact {artifact}: its data.{key} {data[key]} holds {len(seen)} of the "
                                 f"--heldout MRs")
        elif data.get(key):
            raise SystemExit(f"error: --artifact {artifact}: its data.{key} {data[key]} is not here to check "
                             f"against --heldout")
    if not data.get("val_path"):
        raise SystemExit(f"error: --artifact {artifact}: trained with data.path split, not on files that keep "
                         f"--heldout out; score it without --heldout")


def common_args(ap: argparse.ArgumentParser, set_help: str) -> None:
    """The options every E2E quality benchmark takes (this one and bench/chat_quality.py)."""
    ap.add_argument("--steps", type=int, default=None, help="default: the main job's train.max_steps")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N held-out MRs only")
    ap.add_argument("--beams", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    ap.add_argument("--rerank", action="store_true",
                    help="score each row also with the beam candidate of fewest slot errors (--rerank ser)")


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap, "override the main job's settings for every trained row (as lora-dist --set)")
    ap.add_argument("--rows", default="base,float,ours,full",
                    help="comma-separated rows to run (base: no adapter, float: LoRA on a float base in one "
                         "process, ours: int8 ZeRO-3 x2, full: full fine-tuning); default all; 'none' for "
                         "--artifact rows only")
    ap.add_argument("--job", type=Path, default=JOB, help="the job whose settings and split the trained rows use")
    ap.add_argument("--artifact", type=Path, action="append", default=[],
                    help="also score this trained artifact (same split as --job); repeatable")
    ap.add_argument("--heldout", type=Path, default=None,
                    help="score on this E2E csv instead of the job's validation side (the quality job: "
                         "jobs/data/e2e/devset-report.csv, restaurants it neither trained nor validated on)")
    args = ap.parse_args()
    wanted = [r.strip() for r in args.rows.split(",") if r.strip() and r.strip() != "none"]
    unknown = sorted(set(wanted) - {"base", "float", "ours", "full"})
    if unknown or not (wanted or args.artifact):
        ap.error(f"--rows: unknown row(s) {unknown or wanted}; expected a comma-separated subset of "
                 "base,float,ours,full")
    for a in args.artifact:
        if not (a / "manifest.json").is_file():
            ap.error(f"--artifact: {a} is not an artifact directory (no manifest.json)")

    import ray

    from lora_dist.adapter import load_adapted
    from lora_dist.launch import run_job
    from lora_dist.model import load_model
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    job = args.job.resolve()
    base_spec = load_spec(job, [f"data.path={DATA}", *args.set])
    steps = args.steps or base_spec.train.max_steps
    common = [f"data.path={DATA}", f"train.max_steps={steps}", *args.set]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LORA_DIST_OUTPUT_ROOT"] = str(tmp)
        heldout = args.heldout.resolve() if args.heldout else held_out_csv(tmp / "heldout.csv", base_spec.data)

        def add(name: str, fields: dict, scores: dict[str, dict]) -> None:
            for r, m in scores.items():
                rows[name + (" + rerank ser" if r == "ser" else "")] = {**fields, **m}

        if "base" in wanted:
            lm = load_model("smollm2-135m", None, "none")
            add("SmolLM2-135M, no adapter", {"trainable": 0, "train_s": 0},
                score(lm.model, lm.tokenizer, heldout, args))
            del lm
        for a in args.artifact:
            manifest = json.loads((a / "manifest.json").read_text())
            if args.heldout:
                never_saw(manifest, heldout, a)
            else:
                same_split(manifest, base_spec.data, a)
            loaded, manifest = load_adapted(a)
            seed, steps_run = manifest.spec["train"]["seed"], manifest.steps  # a row per artifact directory
            add(f"{a.name} (seed {seed})", {"trainable": manifest.trainable_params, "train_s": None,
                                                    "steps": steps_run, "best_step": manifest.best_step,
                                                    "val_loss": manifest.val_loss_after},
                score(loaded.model, loaded.tokenizer, heldout, args))
            del loaded

        runs = {
            "LoRA, float base, 1 process": ("float", "local", float_row(base_spec)),
            "LoRA, int8 base, ZeRO-3 x2 (ours)": ("ours", "ray", ["cluster.workers=2"]),
            "full fine-tuning, 1 process": ("full", "local", [*float_row(base_spec), "train.method=full",
                                                              "train.lr=2e-5",
                                                              # a job's early stop keeps LoRA copies only
                                                              "train.early_stop_patience=0"]),
        }
        runs = {name: run[1:] for name, run in runs.items() if run[0] in wanted}
        if runs:
            ray.init(num_cpus=2, runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                           "TOKENIZERS_PARALLELISM": "false"}})
        for name, (where, extra) in runs.items():
            spec = load_spec(job, [*common, f"output.dir={tmp / name[:8].replace(' ', '_')}", *extra])
            t0 = time.time()
            artifact = train_local(spec) if where == "local" else run_job(spec)
            train_s = time.time() - t0
            loaded, manifest = load_adapted(Path(artifact))
            add(name, {"trainable": manifest.trainable_params, "train_s": round(train_s),
                       "steps": manifest.steps, "best_step": manifest.best_step,
                       "val_loss": manifest.val_loss_after},
                score(loaded.model, loaded.tokenizer, heldout, args))
            del loaded
        if runs:
            ray.shutdown()

    n_mrs = args.limit or "all"
    where = f"{args.heldout}" if args.heldout else f"devset.csv, data.split {base_spec.data.split}"
    print(f"\nE2E held-out MRs ({n_mrs}) of {where}, trained rows: "
          f"{job.name}, {steps} steps; beam {args.beams}, length penalty 0.9, no-repeat 4-gram")
    print_rows(rows)


def print_rows(rows: dict[str, dict]) -> None:
    """The table of scored rows (trainable, the metrics, train seconds), then all of it as JSON."""
    width = max([36, *map(len, rows)])
    print(f"  {'row':<{width}} {'trainable':>12} {'BLEU':>6} {'NIST':>6} {'METEOR':>7} {'ROUGE-L':>8} {'CIDEr':>6} "
          f"{'SER':>6} {'BLEU@7':>7} {'SER@7':>6} {'train s':>8}")
    for name, r in rows.items():
        met = "-" if r["METEOR"] is None else f"{r['METEOR']:.1f}"
        train_s = "-" if r["train_s"] is None else r["train_s"]
        again = r.get("reweighted")
        at7 = f"{again['BLEU']:>7.1f} {again['SER']:>5.1f}%" if again else f"{'-':>7} {'-':>6}"
        print(f"  {name:<{width}} {r['trainable']:>12,} {r['BLEU']:>6.1f} {r['NIST']:>6.2f} {met:>7} "
              f"{r['ROUGE_L']:>8.1f} {r['CIDEr']:>6.2f} {r['SER']:>5.1f}% {at7} {train_s:>8}")
    print("  @7: re-weighted to 7 attributes per MR, E2E's test set mean (lora_dist/byattrs.py)")
    for name, r in rows.items():
        parts = [f"{b['attributes']}: {b['mrs']} MRs BLEU {b['BLEU']:.1f} SER {b['SER']:.1f}%"
                 for b in r.get("by_attributes", [])]
        if parts:
            print(f"  {name}, by attributes per MR: " + "; ".join(parts))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
