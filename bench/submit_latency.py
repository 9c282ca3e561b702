"""Seconds from `lora-dist submit` to the first training step and to a verified artifact, on the
embedded default and on a `ray start --head` cluster through the Jobs API (issue 4); and the
artifact's size against the base model's weights file.

    python bench/submit_latency.py [--steps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
RAY = str(Path(sys.executable).parent / "ray")


def timed_submit(args: list[str], cwd: Path) -> tuple[float | None, float, list[str]]:
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-u", "-m", "lora_dist.cli", "submit", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if first is None and "step 1/" in line:
            first = time.time() - t0
    if proc.wait() != 0:
        raise SystemExit("submit failed:\n" + "\n".join(lines[-40:]))
    return first, t0, lines


def verified(artifact: Path, t0: float) -> float:
    from lora_dist.store import verify_artifact

    verify_artifact(artifact)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    common = ["jobs/smollm2-e2e.yaml", f"--set=data.path={DATA}", f"--set=train.max_steps={a.steps}",
              "--set=train.log_every=1", "--set=train.micro_batch_size=4", "--set=data.max_length=64",
              "--set=train.eval_batches=1"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["LORA_DIST_OUTPUT_ROOT"] = str(tmp)  # the artifacts of this run go to a temporary root
        os.environ["LORA_DIST_DATA_ROOT"] = str(REPO / "jobs" / "data")  # the cluster reads the data there
        env_root = os.environ.copy()
        first, t0, lines = timed_submit([*common, f"--set=output.dir={tmp / 'emb'}"], REPO)
        artifact = Path(lines[-1])
        rows.append(("embedded default", first, verified(artifact, t0)))

        ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))
        subprocess.run([RAY, "start", "--head", "--num-cpus=2", "--port=6391", "--dashboard-port=8277",
                        "--dashboard-host=127.0.0.1", f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
                       check=True, capture_output=True, env=env_root)
        try:
            first, t0, lines = timed_submit([*common, f"--set=output.dir={tmp / 'clu'}", "--address",
                                             "http://127.0.0.1:8277", "--wait"], REPO)
            sid = next(ln.split()[1] for ln in lines if ln.startswith("submitted "))
            out = tmp / "fetched"
            subprocess.run([sys.executable, "-m", "lora_dist.cli", "fetch", sid, "--address", "http://127.0.0.1:8277",
                            "--out", str(out)], check=True, capture_output=True)
            rows.append(("ray start cluster, --address", first, verified(out, t0)))
        finally:
            subprocess.run([RAY, "stop", "--force"], capture_output=True)
            shutil.rmtree(ray_tmp, ignore_errors=True)

        from lora_dist.store import read_manifest
        from lora_dist.base import resolve_base

        m = read_manifest(artifact)
        base_bytes = sum(f.stat().st_size for f in resolve_base("smollm2-135m").glob("*.safetensors"))
        print(f"\nseconds from submit ({a.steps} steps, SmolLM2-135M int8, 1 worker):")
        print(f"  {'where':<30} {'first training step':>20} {'verified artifact':>18}")
        for name, f, v in rows:
            print(f"  {name:<30} {f:>20.1f} {v:>18.1f}")
        print(f"\nadapter_model.safetensors {m.adapter_bytes:,} bytes; whole artifact "
              f"{sum(p.stat().st_size for p in artifact.iterdir()):,} bytes; base model weights (fp32 safetensors) "
              f"{base_bytes:,} bytes: ratio 1:{base_bytes / m.adapter_bytes:.0f}")


if __name__ == "__main__":
    main()
