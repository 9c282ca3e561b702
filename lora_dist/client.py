"""The Python SDK: submit a job, follow it, fetch its verified artifact.

    from lora_dist import Client

    client = Client()                      # the embedded default; Client("http://head:8265"): a cluster
    job = client.submit("jobs/smollm2-e2e.yaml", overrides={"train.max_steps": 2})
    status = job.wait()                    # JobStatus: state, step, loss, artifact, manifest digest
    artifact = job.fetch("adapter")        # every sha256 checked, and the digest the job recorded

One interface, two backends chosen once by the address: the embedded default (``embedded.py``:
each job on a local Ray of its own, under this process) and a Ray cluster's Jobs API
(``jobs.py``). The ``lora-dist`` commands are a thin layer over this module.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from lora_dist.embedded import EmbeddedJobs
from lora_dist.errors import NoArtifact
from lora_dist.jobs import JobStatus, enable_token_auth, list_remote, logs_remote, status_remote, stop_remote, \
    submit_remote, wait_remote
from lora_dist.spec import JobSpec, apply_overrides, load_spec, spec_from_dict
from lora_dist.store import check_job_id, fetch, new_job_id


class Client:
    """Jobs on the embedded default or on a Ray cluster.

    Args:
        address: a Ray Jobs API address (``http://host:8265``); None: ``$RAY_ADDRESS``, else the
            embedded default (a local Ray of its own for each job, under this process: a job
            submitted here ends when this process does).
        attached: run jobs as the ``lora-dist`` command does: their progress on this process's
            stdout and stderr, and, on the embedded default, Ctrl-C or SIGTERM while
            :meth:`Job.wait` runs stops the job. Default: quiet (read the output with
            :meth:`Job.logs`).
    """

    def __init__(self, address: str | None = None, *, attached: bool = False) -> None:
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        if self.address:
            enable_token_auth()  # before anything imports ray: it reads RAY_AUTH_MODE once
            self._backend: EmbeddedJobs | RayJobsAPI = RayJobsAPI(self.address, attached)
        else:
            self._backend = EmbeddedJobs(attached)

    def submit(self, spec_or_path: str | os.PathLike | JobSpec | Mapping[str, Any],
               overrides: Mapping[str, Any] | Sequence[str] | None = None, job_id: str | None = None) -> "Job":
        """Validate a job and start it.

        Args:
            spec_or_path: a YAML job spec's path, a :class:`JobSpec`, or a mapping of its sections.
            overrides: fields to change, ``{"train.max_steps": 2}`` (or ``["train.max_steps=2"]``,
                as ``--set`` takes them).
            job_id: reuse a job id to resume that job from its checkpoints (default: a new id).

        Returns:
            The job, running. On the embedded default it runs under this process.

        Raises:
            SpecError: the spec is invalid (every problem at once, each naming its field).
            ModelError, DataError: the model or data does not fit the spec (checked here for a
                cluster; on the embedded default, by the job before it runs: :meth:`Job.wait`).
            JobError: a bad job id; the job id runs already; the cluster refused or is unreachable.
        """
        spec = job_spec(spec_or_path, overrides)
        job_id = check_job_id(job_id) if job_id else new_job_id()
        source = str(spec_or_path) if isinstance(spec_or_path, (str, os.PathLike)) else None
        return Job(self._backend, self._backend.submit(spec, job_id, source))

    def job(self, job_id: str) -> "Job":
        """A job by its id (as ``submit`` or ``lora-dist list`` gave it); nothing is checked yet."""
        return Job(self._backend, job_id)

    def jobs(self) -> list[JobStatus]:
        """Every lora-dist job of this backend, oldest first.

        Raises:
            JobError: the cluster cannot be reached.
        """
        return self._backend.list()


class Job:
    """One job; each method asks its backend afresh."""

    def __init__(self, backend: EmbeddedJobs | "RayJobsAPI", job_id: str) -> None:
        self._backend, self.id = backend, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """Its state, step / total, last loss, and once it has succeeded its artifact and digest.

        Raises:
            JobError: no such job, or the cluster cannot be reached.
        """
        return self._backend.status(self.id)

    def logs(self, follow: bool = False) -> Iterator[str]:
        """Its output, line by line (each line with its newline, as iterating a file gives them).

        Args:
            follow: keep reading until the job ends.

        Raises:
            JobError: no such job, or the cluster cannot be reached.
        """
        rest = ""
        for chunk in self._backend.logs(self.id, follow):
            *lines, rest = (rest + chunk).split("\n")
            yield from (line + "\n" for line in lines)
        if rest:
            yield rest

    def wait(self, timeout: float | None = None) -> JobStatus:
        """Wait for the job to end.

        Args:
            timeout: seconds; None waits as long as it runs.

        Returns:
            Its final status (SUCCEEDED, FAILED or STOPPED; see ``.message``), or its status as
            it stands when ``timeout`` ran out. An interrupt (KeyboardInterrupt) leaves the job
            running, except for an attached client's embedded job, which it stops.

        Raises:
            SpecError, ModelError, DataError: a job submitted by this client was refused before it
                ran (its job id had been trained from another spec; the model does not fit) or
                met bad data.
            JobError: no such job, or the cluster cannot be reached.
        """
        return self._backend.wait(self.id, timeout)

    def stop(self) -> str:
        """Stop the job; it publishes no artifact.

        Returns:
            The state it ended in: STOPPED, or the end it had already reached.

        Raises:
            JobError: no such job, the cluster cannot be reached, or the job did not stop in time.
        """
        return self._backend.stop(self.id)

    def fetch(self, out: str | os.PathLike | None = None) -> Path:
        """Copy the job's artifact to ``out`` and verify it: every file's sha256, nothing
        unlisted, and the manifest's digest as the job recorded it when it published.

        Args:
            out: a directory that does not exist yet (default: the artifact's name, here).

        Returns:
            ``out``.

        Raises:
            NoArtifact: the job has not succeeded.
            ArtifactError: the artifact fails verification; nothing is left at ``out``.
            JobError: no such job, ``out`` exists, or the artifact cannot be read.
        """
        st = self.status()
        if st.state != "SUCCEEDED" or not st.artifact:
            raise NoArtifact(f"job {self.id} is {st.state}: it has no artifact to fetch")
        target = Path(out) if out else Path.cwd() / Path(st.artifact.rstrip("/")).name
        fetch(st.artifact, target, digest=st.manifest)  # the digest recorded apart from the artifact's storage
        return target


class RayJobsAPI:
    """Jobs on a Ray cluster, through its Jobs API (the backend with an address)."""

    def __init__(self, address: str, attached: bool = False) -> None:
        self.address, self.attached = address, attached

    def submit(self, spec: JobSpec, job_id: str, source: str | None = None) -> str:
        from lora_dist.validate import validate_job

        from lora_dist.launch import recorded_spec

        validate_job(spec, "remote", source, self.address)  # a cluster may have several nodes; one machine does not
        spec = spec.with_absolute_paths()
        return submit_remote(spec, job_id, self.address, lambda: recorded_spec(spec, job_id))

    def status(self, job_id: str) -> JobStatus:
        return status_remote(self.address, job_id)

    def logs(self, job_id: str, follow: bool) -> Iterable[str]:
        return logs_remote(self.address, job_id, follow)

    def stop(self, job_id: str) -> str:
        return stop_remote(self.address, job_id)

    def list(self) -> list[JobStatus]:
        return list_remote(self.address)

    def wait(self, job_id: str, timeout: float | None = None) -> JobStatus:
        follow = self.attached and timeout is None
        return wait_remote(self.address, job_id, sys.stdout if follow else None, timeout)


def job_spec(spec_or_path: str | os.PathLike | JobSpec | Mapping[str, Any],
             overrides: Mapping[str, Any] | Sequence[str] | None = None) -> JobSpec:
    """The validated spec that :meth:`Client.submit` runs for these arguments.

    Raises:
        SpecError: every problem at once, each naming its field.
    """
    if isinstance(overrides, Mapping):
        import yaml

        overrides = [f"{key}={yaml.safe_dump(value, default_flow_style=True)}" for key, value in overrides.items()]
    overrides = list(overrides or [])
    if isinstance(spec_or_path, (str, os.PathLike)):
        return load_spec(spec_or_path, overrides)
    raw = spec_or_path.to_dict() if isinstance(spec_or_path, JobSpec) else dict(spec_or_path)
    return spec_from_dict(apply_overrides(raw, overrides))
