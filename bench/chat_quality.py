"""Does the model's own chat template help an Instruct model? The main job (jobs/smollm2-e2e.yaml:
the E2E prompt template on devset.csv) against the chat job (jobs/smollm2-chat.yaml: the same
rows as conversations in SmolLM2's ChatML), same steps, batch, lr and LoRA, both scored on the
same held-out restaurants (data.split name) with the paper's decoding: BLEU, NIST, METEOR,
ROUGE-L, CIDEr and the slot error rate. The chat adapter is prompted through its chat template
(the E2E user turn, chat.E2E_CHAT_PROMPT; generation stops at its end-of-turn token).

    python bench/chat_quality.py [--steps N] [--limit N] [--beams 10] [--set KEY=VALUE ...] [--local] [--rerank]

Both jobs run as `lora-dist submit` runs them (launch.run_job on a local Ray: one worker,
ZeRO-3), or with ``--local`` as `lora-dist train` does (one process). ``--set`` applies to both.
The held-out side is bench/e2e_quality.py's; the benchmark refuses to run if the two jobs' splits
would hold out different restaurants.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_quality import DATA, JOB, REPO, common_args, held_out_csv, print_rows, score  # noqa: E402

CHAT_JOB = REPO / "jobs" / "smollm2-chat.yaml"
CHAT_DATA = REPO / "jobs" / "data" / "e2e" / "devset-chat.jsonl"


def held_out_names(spec) -> set[str | None]:
    """The restaurants a job's split holds out."""
    from lora_dist.sources import data_location, read_examples, split_examples

    return {e.name for e in split_examples(read_examples(data_location(spec.data), spec.data), spec.data)[1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    common_args(ap, "override both jobs' settings (as lora-dist --set)")
    ap.add_argument("--local", action="store_true", help="train in this process (lora-dist train), not on Ray")
    args = ap.parse_args()

    from lora_dist.adapter import load_adapted
    from lora_dist.generate import e2e_template, stop_ids, uses_bos
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    main_spec = load_spec(JOB, [f"data.path={DATA}", *args.set])
    steps = args.steps or main_spec.train.max_steps
    jobs = {"E2E template (main job)": (JOB, DATA), "chat template (chat job)": (CHAT_JOB, CHAT_DATA)}
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LORA_DIST_OUTPUT_ROOT"] = str(tmp)
        specs = {name: load_spec(job, [f"data.path={data}", f"train.max_steps={steps}", *args.set,
                                       f"output.dir={tmp / str(i)}"])
                 for i, (name, (job, data)) in enumerate(jobs.items())}
        names = {name: held_out_names(spec) for name, spec in specs.items()}
        if len({frozenset(n) for n in names.values()}) != 1:
            raise SystemExit(f"error: the jobs hold out different restaurants: {names}")
        heldout = held_out_csv(tmp / "heldout.csv", main_spec.data)
        if not args.local:
            import ray

            from lora_dist.launch import run_job

            ray.init(num_cpus=2, runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                           "TOKENIZERS_PARALLELISM": "false"}})
        for name, spec in specs.items():
            t0 = time.time()
            artifact = train_local(spec) if args.local else run_job(spec)
            train_s = round(time.time() - t0)
            loaded, manifest = load_adapted(Path(artifact))
            tok = loaded.tokenizer
            scores = score(loaded.model, tok, heldout, args, template=e2e_template(manifest, tok),
                           bos=uses_bos(manifest), stop=stop_ids(manifest, tok))
            for r, m in scores.items():
                rows[name + (" + rerank ser" if r == "ser" else "")] = {
                    "trainable": manifest.trainable_params, "steps": manifest.steps,
                    "val_loss": manifest.val_loss_after, "train_s": train_s, **m}
            del loaded
        if not args.local:
            ray.shutdown()

    held = sorted(next(iter(names.values())), key=str)
    print(f"\nE2E held-out MRs ({args.limit or 'all'}) of {len(held)} held-out restaurants ({', '.join(map(str, held))}), "
          f"{steps} steps; beam {args.beams}, length penalty 0.9, no-repeat 4-gram")
    print_rows(rows)


if __name__ == "__main__":
    main()
