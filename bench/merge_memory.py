"""Peak memory of `lora-dist merge` against the size of the model it writes: the merge streams.

    python bench/merge_memory.py [--artifact DIR] [--shard-sizes 5GB 100MB] [--dtypes fp32 bf16] [--peft]

The main job's adapter (SmolLM2-135M, int8 base, LoRA r=8 on every linear) is merged in a fresh
process for each --max-shard-size and --dtype. Without ``--artifact`` one is trained first:
``lora-dist train jobs/smollm2-e2e.yaml --set train.max_steps=2 --set output.dir=TMP`` (what the
adapter learned does not change what merging costs). Per merge it prints:

* ``model``: the merged weights' bytes in that dtype (the index's total_size, or the file's data);
* ``baseline``: the merge process's resident set after its imports (torch, transformers and its
  Llama model code, lora_dist), before the command runs;
* ``peak``: its peak resident set during the merge (VmHWM, reset to the baseline first through
  /proc/self/clear_refs; where that is refused, ru_maxrss over the whole process);
* ``added``: peak - baseline, and that as a fraction of the model.

``--peft`` adds the whole-model way for comparison: ``from_pretrained`` + PEFT's
``merge_and_unload`` + ``save_pretrained`` in one process, in fp32.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAIN_JOB = REPO / "jobs" / "smollm2-e2e.yaml"

# Run in the child: imports, then the baseline, then the measured work, then one JSON line.
CHILD = r"""
import json, resource, sys, time

def status(field):
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(field + ":")).split()[1]) * 1024

import torch, transformers
from transformers import AutoModelForCausalLM
import transformers.models.llama.modeling_llama  # SmolLM2's class, which the merge's skeleton imports
WORK
baseline = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set starts again from here
    reset = True
except OSError:
    reset = False
t0 = time.time()
run()
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": baseline, "peak": peak, "reset": reset, "seconds": time.time() - t0}))
"""

MERGE = """
import lora_dist.merge, lora_dist.cli
def run():
    code = lora_dist.cli.main(sys.argv[1:])
    assert code == 0, code
"""

PEFT = """
from peft import PeftModel
def run():
    _, base, artifact, out, shard = sys.argv
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, artifact).merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)
"""


def child(work: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD.replace("WORK", work), *args], capture_output=True,
                          text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_bytes(d: Path) -> tuple[int, int]:
    """(bytes of tensor data, number of safetensors files) of a model directory."""
    index = d / "model.safetensors.index.json"
    files = sorted(d.glob("*.safetensors"))
    if index.is_file():
        return json.loads(index.read_text())["metadata"]["total_size"], len(files)
    f = files[0]
    return f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little"), 1


def train_adapter(work: Path) -> Path:
    proc = subprocess.run([sys.executable, "-m", "lora_dist.cli", "train", str(MAIN_JOB), "--set=train.max_steps=2",
                           f"--set=output.dir={work / 'runs'}"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", type=Path, default=None, help="the main job's adapter (default: train one, 2 steps)")
    ap.add_argument("--shard-sizes", nargs="+", default=["5GB", "100MB"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--peft", action="store_true", help="also the whole-model merge (from_pretrained + PEFT)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="merge-memory-"))
    try:
        artifact = args.artifact or train_adapter(work)
        print(f"adapter: {artifact}")
        print("| merge | dtype | --max-shard-size | files | model GiB | baseline GiB | peak GiB | added GiB "
              "| added / model | s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for dtype in args.dtypes:
            for shard in args.shard_sizes:
                out = work / f"merged-{dtype}-{shard}"
                r = child(MERGE, "merge", str(artifact), "--out", str(out), "--dtype", dtype, "--max-shard-size", shard)
                size, files = model_bytes(out)
                added = r["peak"] - r["baseline"]
                print(f"| lora-dist merge | {dtype} | {shard} | {files} | {gib(size)} | {gib(r['baseline'])} | "
                      f"{gib(r['peak'])} | {gib(added)} | {added / size:.2f} | {r['seconds']:.1f} |", flush=True)
                shutil.rmtree(out)
        if args.peft:
            from lora_dist.base import resolve_base

            out = work / "peft"
            r = child(PEFT, str(resolve_base("smollm2-135m")), str(artifact), str(out), "100MB")
            size, files = model_bytes(out)
            added = r["peak"] - r["baseline"]
            print(f"| from_pretrained + PEFT merge_and_unload + save_pretrained | fp32 | 100MB | {files} | "
                  f"{gib(size)} | {gib(r['baseline'])} | {gib(r['peak'])} | {gib(added)} | {added / size:.2f} | "
                  f"{r['seconds']:.1f} |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
