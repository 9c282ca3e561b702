"""The constant entrypoint of a job submitted through the Ray Jobs API.

    python -m lora_dist.jobrun job-spec.json

The spec arrives as a data file in the job's working_dir (never as shell text), is validated
again here, and runs through the same driver as the embedded default. The last line printed is
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
    from lora_dist.launch import JobFailed, run_job
    from lora_dist.spec import SpecError, spec_from_dict

    payload = json.loads(Path(argv[0]).read_text())
    try:
        spec = spec_from_dict(payload["spec"], source=argv[0])
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        artifact = run_job(spec, job_id=payload["job_id"], address="auto")
    except JobFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{ARTIFACT_PREFIX}{artifact}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
