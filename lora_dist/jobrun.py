"""The constant entrypoint of a job submitted through the Ray Jobs API (the cluster side).

    python -m lora_dist.jobrun job-spec.json      (what `lora-dist submit --address` sends)
    python -m lora_dist.jobrun /config/job.yaml   (a KubeRay RayJob mounting a job spec)

The spec arrives as a data file (never as shell text), is validated again here, its local
output.dir is confined to this cluster's output root ($LORA_DIST_OUTPUT_ROOT), and it runs
through the same driver as the embedded default. Before anything, the runtime_env the job runs
under, as Ray hands it over, is checked against this cluster's rules (runtime_env.py): a client
that skipped lora-dist's own checks gets exit 2 and nothing runs. A YAML spec takes its job id from
$LORA_DIST_JOB_ID (a retried RayJob then resumes its own checkpoints) or a new one. The last
lines printed are ``artifact: <location>`` and ``manifest: sha256:<hex>`` (the digest of the
artifact's manifest as published), for whoever reads the job's logs: Ray keeps them on the head,
apart from the artifact's storage, and ``lora-dist status``/``fetch`` check the artifact against
that digest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lora_dist.errors import ArtifactError, JobError, JobFailed, SettingError
from lora_dist.jobs import ARTIFACT_PREFIX, MANIFEST_PREFIX, METADATA_TAG, WORKER_ENV, binding
from lora_dist.launch import run_job
from lora_dist.runtime_env import RAY_JOB_CONFIG_ENV, job_runtime_env_problems
from lora_dist.spec import SpecError, load_spec, spec_from_dict
from lora_dist.store import check_job_id, digest_at, new_job_id, output_root
from lora_dist.validate import validate_job


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m lora_dist.jobrun job-spec.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    problems = runtime_env_here()
    if problems:
        print(f"error: the runtime_env this job runs under breaks this cluster's rules (was it submitted "
              f"around lora-dist's checks?); nothing was run: {'; '.join(problems)}", file=sys.stderr)
        return 2
    try:
        if path.suffix in (".yaml", ".yml"):
            spec = load_spec(path).with_absolute_paths()
            job_id = check_job_id(os.environ.get("LORA_DIST_JOB_ID") or new_job_id())
        else:
            payload = json.loads(path.read_text())
            spec, job_id = spec_from_dict(payload["spec"], source=str(path)), check_job_id(payload["job_id"])
        validate_job(spec, "cluster")
        claimed = metadata_problem(spec, job_id)
        if claimed:
            raise SpecError([claimed])
    except (SpecError, JobError, SettingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        artifact = run_job(spec, job_id=job_id, address="auto", cluster_root=str(output_root()))
    except (JobFailed, JobError, ArtifactError) as e:  # ArtifactError: a checkpoint it must not resume from
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{ARTIFACT_PREFIX}{artifact}", flush=True)
    digest = digest_at(str(artifact))  # right away: it vouches for the artifact as published
    if digest:
        print(f"{MANIFEST_PREFIX}{digest}", flush=True)
    return 0


def job_config() -> dict | None:
    """The job's config as Ray's job supervisor hands it over ({"runtime_env", "metadata"}); None
    where the job was not started by the Jobs API.

    Raises:
        ValueError: the variable holds something Ray did not write.
    """
    raw = os.environ.get(RAY_JOB_CONFIG_ENV)
    if raw is None:
        return None
    config = json.loads(raw)
    if not isinstance(config, dict):
        raise ValueError("not an object")
    return config


def runtime_env_here() -> list[str]:
    """What is wrong with the runtime_env Ray started this job with (empty: nothing, or not
    started by the Jobs API)."""
    try:
        config = job_config()
    except ValueError:
        return [f"${RAY_JOB_CONFIG_ENV} is not a job config Ray wrote"]
    return [] if config is None else job_runtime_env_problems(config.get("runtime_env") or {}, WORKER_ENV)


def metadata_problem(spec, job_id: str) -> str | None:
    """What the submission's lora-dist metadata (which ``status`` and ``fetch`` go by: the job it
    belongs to, the output.dir and spec digest it is bound to) claims that the spec it runs is not.
    None: they agree, or the submission carries no lora-dist metadata (a RayJob's YAML spec).

    A submission made around ``lora-dist submit`` could copy another job's metadata, which every
    token holder can read, and run a spec of its own; it is refused here before anything runs."""
    try:
        meta = (job_config() or {}).get("metadata") or {}
    except ValueError:
        return f"${RAY_JOB_CONFIG_ENV} is not a job config Ray wrote"
    if not isinstance(meta, dict) or METADATA_TAG not in meta:
        return None
    actual = {"name": spec.name, "job_id": job_id, **binding(spec)}
    differ = [k for k, v in actual.items() if meta.get(k) is not None and meta.get(k) != v]
    if differ:
        return (f"this submission's metadata names another job than the spec it runs ({', '.join(differ)} "
                f"differ): was it submitted around lora-dist submit? Nothing was run")
    return None


if __name__ == "__main__":
    sys.exit(main())
