"""The main job's throughput and MFU on two commits, side by side in one session (this machine
drifts by 10-20% between runs, so a before/after pair of separate runs can mislead):

    python bench/throughput_ab.py --before 4eee545 [--after HEAD] [--rounds 1] [--steps 10]
    python bench/throughput.py --before 4eee545 ...   (the same table)

Each commit is checked out into a temporary git worktree; each round runs every row once per
commit, alternating, in fresh processes that import that commit's code, as a user runs them:

  * ``one process``: ``lora-dist train jobs/smollm2-e2e.yaml`` (no Ray, no DeepSpeed);
  * ``submit, embedded``: the README's first command, ``lora-dist submit jobs/smollm2-e2e.yaml
    --wait`` on the embedded default with the job's own worker count (1) and its defaults;
  * ``submit, N=2``: the same with ``cluster.workers=2``;

all with the main job's batches (micro-batch 8 x <=96 tokens), ``--steps`` steps, step 1 left
out. Then PEFT + bitsandbytes 8-bit in one process with this machine's cores as threads, once
(it does not depend on the commit). Real tokens/s counts real (non-padding) tokens of all
workers; MFU is model FLOPs (``lora_dist.mfu.flop_count`` of this commit: the dense part, the
same for every row, attention left out: about 1.5% here) per second over this machine's best
measured GEMM peak in the row's compute dtype (``mfu.gemm_peak`` at every core, the job's shapes
and 2048^3); ``job MFU`` is what the job itself recorded (its manifest's ``mfu``), where it does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB = "jobs/smollm2-e2e.yaml"
SHAPE = ["train.micro_batch_size=8", "data.max_length=96"]  # the main job's own (spelled out for old commits)
ROWS = {"one process": ("train",), "submit, embedded": ("submit", "--wait"),
        "submit, N=2": ("submit", "--wait", "--set", "cluster.workers=2")}
CLI = "import sys; from lora_dist.cli import main; sys.exit(main(sys.argv[1:]))"


def run_row(checkout: Path, row: str, steps: int, out: Path, extra: list[str]) -> dict:
    """One row on ``checkout``'s code: the CLI in a fresh process, then the artifact's records."""
    sets = [f"train.max_steps={steps}", "train.log_every=1", "train.eval_batches=1", f"output.dir={out}", *SHAPE,
            *extra]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(checkout), TOKENIZERS_PARALLELISM="false")
    args = [sys.executable, "-c", CLI, *ROWS[row], JOB, *[f"--set={s}" for s in sets]]
    proc = subprocess.run(args, cwd=checkout, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{row} on {checkout.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    artifact = Path(proc.stdout.strip().splitlines()[-1])
    recs = [json.loads(x) for x in (artifact / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][1:]
    manifest = json.loads((artifact / "manifest.json").read_text())
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in recs),
            "peak_gib": max(max(r["peak_memory_bytes"]) for r in recs) / 2**30,
            "dtype": manifest.get("precision", {}).get("compute_dtype", "fp32"),
            "job_mfu": manifest.get("mfu"), "threads": manifest.get("torch_threads"),
            "cpus_per_worker": manifest.get("cpus_per_worker")}


def machine_peaks() -> dict[str, float]:
    """This machine's best GEMM FLOP/s per dtype at every core: the job's shapes and 2048^3."""
    import torch

    from lora_dist.counting import count_model
    from lora_dist.launch import usable_cores
    from lora_dist.mfu import gemm_peak, probe_shapes
    from lora_dist.spec import load_spec

    torch.set_num_threads(usable_cores())
    spec = load_spec(REPO / JOB, SHAPE)
    shapes = probe_shapes(count_model(spec.model.base, spec.injected_lora), 8, 96) + [(2048, 2048, 2048)]
    return {name: gemm_peak(torch.device("cpu"), dtype, shapes)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def flops_per_token() -> float:
    from lora_dist.counting import count_model
    from lora_dist.mfu import flop_count
    from lora_dist.spec import load_spec

    spec = load_spec(REPO / JOB, SHAPE)
    return flop_count(count_model(spec.model.base, spec.injected_lora), spec.full, False).per_token


def compare(before: str, after: str, rounds: int, steps: int, extra: list[str], peft: dict | None = None) -> None:
    """Every row on both commits, alternated; one table with real tokens/s, MFU and peak memory."""
    peaks, per_token = machine_peaks(), flops_per_token()
    print(f"GEMM peak at every core: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; "
          f"{per_token / 1e6:.1f} MFLOP per real token (dense)", flush=True)
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("before", before), ("after", after)):
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(trees[name]), rev],
                           check=True)
        try:
            for r in range(1, rounds + 1):
                for row in ROWS:
                    for name, tree in trees.items():
                        res = run_row(tree, row, steps, Path(tmp) / f"{name}-{r}-{len(results)}", extra)
                        results.setdefault((row, name), []).append(res)
                        print(f"round {r}  {row:<17} {name:<6} real tokens/s {res['tokens_per_s']:6.1f}  "
                              f"peak {res['peak_gib']:.2f} GiB", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
    print(f"\nSmolLM2-135M int8 + LoRA r=8, micro-batch 8 x <=96 tokens per worker, {steps} steps (step 1 left out), "
          f"mean of {rounds} round(s)")
    print(f"  {'row':<17} {'commit':<14} {'dtype':>5} {'threads':>7} {'real tok/s':>10} {'MFU':>6} {'job MFU':>8} "
          f"{'peak mem':>9}")
    table = dict(results)
    for (row, name), runs in table.items():
        rev = before if name == "before" else after
        tps = statistics.mean(x["tokens_per_s"] for x in runs)
        dtype = runs[0]["dtype"]
        mfu = per_token * tps / peaks[dtype]
        job = runs[0]["job_mfu"]
        print(f"  {row:<17} {name + ' ' + rev[:7]:<14} {dtype:>5} {str(runs[0]['threads'] or '-'):>7} {tps:>10.1f} "
              f"{100 * mfu:>5.1f}% {'-' if job is None else f'{100 * job:.1f}%':>8} "
              f"{max(x['peak_gib'] for x in runs):>6.2f} GiB")
    for row in ROWS:
        a = statistics.mean(x["tokens_per_s"] for x in table[(row, "after")])
        b = statistics.mean(x["tokens_per_s"] for x in table[(row, "before")])
        print(f"  {row}: after / before real tokens/s x{a / b:.2f} (goal >= 2)")
    one = statistics.mean(x["tokens_per_s"] for x in table[("one process", "after")])
    sub = statistics.mean(x["tokens_per_s"] for x in table[("submit, embedded", "after")])
    print(f"  submit, embedded / one process (after): x{sub / one:.2f} (goal >= 1)")
    best = max(peaks.values())
    print(f"  best MFU against the machine's best peak ({best / 1e9:.0f} GFLOP/s): "
          f"{100 * max(per_token * statistics.mean(x['tokens_per_s'] for x in v) for v in table.values()) / best:.1f}% "
          f"(goal >= 50%)")
    if peft is not None:
        n2 = statistics.mean(x["tokens_per_s"] for x in table[("submit, N=2", "after")])
        print(f"  PEFT + bnb 8-bit, 1 process, {peft['threads']} threads: {peft['tokens_per_s']:.1f} real tok/s; "
              f"ours one process x{one / peft['tokens_per_s']:.2f}, submit x{sub / peft['tokens_per_s']:.2f}, "
              f"N=2 x{n2 / peft['tokens_per_s']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True, help="a commit (the baseline)")
    ap.add_argument("--after", default="HEAD", help="a commit (default HEAD)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every row of both commits")
    args = ap.parse_args()
    compare(args.before, args.after, args.rounds, args.steps, args.set)


if __name__ == "__main__":
    main()
