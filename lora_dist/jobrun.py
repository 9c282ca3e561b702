"""The constant entrypoint of a job submitted through the Ray Jobs API.

    python -m lora_dist.jobrun job-spec.json      (what `lora-dist submit --address` sends)
    python -m lora_dist.jobrun /config/job.yaml   (a KubeRay RayJob mounting a job spec)

The spec arrives as a data file (never as shell text), is validated again here, and runs
through the same driver as the embedded default. A YAML spec takes its job id from
$LORA_DIST_JOB_ID (a retried RayJob then resumes its own checkpoints) or a new one. The last line printed is
``artifact: <location>``, which ``lora-dist status`` and ``fetch`` read from the job's logs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARTIFACT_PREFIX = "artifact: "
# Environment every Ray worker of a job gets (the spec itself travels as data, never here).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
              # Ray Train V2 re-emits print() through logging, so every progress line showed twice.
              "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lora_dist.jobrun job-spec.json", file=sys.stderr)
        return 2
    import os

    from lora_dist.adapter import new_job_id
    from lora_dist.launch import JobFailed, run_job
    from lora_dist.spec import SpecError, load_spec, spec_from_dict

    path = Path(argv[0])
    try:
        if path.suffix in (".yaml", ".yml"):
            spec = load_spec(path).with_absolute_paths()
            job_id = os.environ.get("LORA_DIST_JOB_ID") or new_job_id()
        else:
            payload = json.loads(path.read_text())
            spec, job_id = spec_from_dict(payload["spec"], source=str(path)), payload["job_id"]
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        artifact = run_job(spec, job_id=job_id, address="auto")
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{ARTIFACT_PREFIX}{artifact}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
