"""Experiment tracking: a job's records sent to MLflow and TensorBoard from its main process. No
torch at import; mlflow and tensorboard are imported when a job that names them starts.

    tracking.mlflow       sqlite:///PATH, http(s)://HOST[:PORT] or file:PATH: one MLflow run per job
    tracking.experiment   the MLflow experiment (default: the job's name)
    tracking.tensorboard  a directory or storage URI: event files of the same scalars

What a run holds (the main process logs; every other rank holds a Tracker that does nothing):

    params    the spec, flattened to dotted keys (``train.lr``); runtime_env env var values redacted
    metrics   every record of metrics.jsonl, under its own name at its step (``loss``, ``lr``,
              ``real_tokens_per_s``, ``pad_tokens``, ``val_loss``, ...); a per-rank list
              (``peak_memory_bytes``) as its largest value; sent asynchronously, one record behind
    tags      ``lora_dist.job_id``; at the end ``artifact`` (its location) and ``manifest_digest``
    status    FINISHED; FAILED when the job raised; KILLED when it was interrupted

Tracking never costs the training: the first error of a backend (a server that cannot be reached,
a full disk) is said once, that backend is dropped for the rest of the job, and training and
metrics.jsonl go on. MLflow's HTTP retries are bounded here (MLFLOW_HTTP_REQUEST_MAX_RETRIES 2,
MLFLOW_HTTP_REQUEST_TIMEOUT 20 s unless set), so that an unreachable server costs seconds, not
its default of minutes. A resumed job (the same job id) continues its run, found by its tag: the
steps that the interrupted attempt logged after its last checkpoint are trained and logged again,
so that a step's history may hold two values there (metrics.jsonl keeps the second). A worker
killed outright cannot end its run, which stays RUNNING until the job resumes.

MLflow's ``file:`` store raises unless MLFLOW_ALLOW_FILE_STORE=true: a spec that names a ``file:``
store has chosen it, so that variable defaults to true for the job's process (MLflow keeps that
store in maintenance mode and recommends ``sqlite:///``).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Mapping
from urllib.parse import urlsplit

from pydantic import AfterValidator

from lora_dist.runtime_env import redacted
from lora_dist.store import is_uri, run_name

JOB_TAG = "lora_dist.job_id"
MLFLOW_SCHEMES = ("sqlite", "http", "https", "file")
PARAMS_PER_CALL = 100  # MLflow's log_batch limit
PARAM_CHARS = 6000  # MLflow's longest parameter value
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
INSTALL = "pip install 'lora-dist[tracking]'"


# --- the spec's targets ---------------------------------------------------------------------------

def mlflow_uri_problem(uri: str) -> str | None:
    """What is wrong with a ``tracking.mlflow`` URI; None when it is one lora-dist sends to."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    if scheme not in MLFLOW_SCHEMES:
        return f"expected sqlite:///PATH, http(s)://HOST[:PORT] or file:PATH, got {uri[:200]!r}"
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        return f"a sqlite store is sqlite:///PATH (three slashes, then the path), got {uri[:200]!r}"
    if scheme in ("http", "https") and (urlsplit(uri).password is not None or not urlsplit(uri).hostname):
        return ("a server is http(s)://HOST[:PORT] with no credentials in it (they would be written to the "
                "manifest): set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in "
                "the environment of the machine or the cluster's nodes (never in cluster.runtime_env)")
    return None


def _check_mlflow_uri(uri: str) -> str:
    problem = mlflow_uri_problem(uri)
    if problem:
        raise ValueError(problem)
    return uri


MlflowUri = Annotated[str, AfterValidator(_check_mlflow_uri)]  # spec.TrackingSpec.mlflow


def absolute_target(target: str | None) -> str | None:
    """A tracking target with its local path made absolute against the current directory (workers
    run elsewhere): ``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``, ``file:rel`` ->
    ``file:///abs/rel``, a plain directory -> its absolute path; servers and URIs unchanged."""
    if target is None:
        return None
    if target.startswith("sqlite:///"):
        path = target[len("sqlite:///"):]
        return target if path.startswith("/") else "sqlite:///" + str(Path(path).expanduser().resolve())
    if target.startswith("file:"):
        path = target[len("file:"):]
        path = path[2:] if path.startswith("//") else path
        return "file://" + str(Path(path).expanduser().resolve())
    if is_uri(target):
        return target
    return str(Path(target).expanduser().resolve())


def missing_packages(tracking) -> list[str]:
    """One problem per tracking target whose package is not installed here (validate.validate_job)."""
    wanted = [("tracking.mlflow", tracking.mlflow, "mlflow"), ("tracking.tensorboard", tracking.tensorboard,
                                                                 "tensorboard")]
    return [f"{field}: needs the {package} package, which is not installed: {INSTALL}"
            for field, target, package in wanted if target is not None and not _installed(package)]


def _installed(package: str) -> bool:
    import importlib.util
    import sys

    if package in sys.modules:
        return sys.modules[package] is not None
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


# --- what is logged -------------------------------------------------------------------------------

def spec_params(spec_dict: Mapping[str, Any]) -> dict[str, str]:
    """The spec as MLflow parameters: dotted keys, values as JSON text, env var values redacted."""
    out: dict[str, str] = {}
    stack: list[tuple[str, Any]] = [("", redacted(dict(spec_dict)))]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, Mapping) and value and prefix != "cluster.runtime_env.":
            stack += [(f"{prefix}{k}.", v) for k, v in value.items()]
        else:
            out[prefix[:-1]] = (value if isinstance(value, str) else json.dumps(value))[:PARAM_CHARS]
    return dict(sorted(out.items()))


def scalars(rec: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers under their own names (a per-rank list: its largest), the
    step aside."""
    out = {}
    for key, value in rec.items():
        if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            value = max(value)
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value)
    return out


# --- the tracker ----------------------------------------------------------------------------------

class Tracker:
    """One job's tracking on its main process. Every method may be called whatever is tracked:
    with nothing (another rank, no tracking section, a backend dropped) it does nothing."""

    def __init__(self, spec, job_id: str, say: Callable[[str], None]) -> None:
        self.spec, self.job_id, self.say = spec, job_id, say
        self.client = self.run_id = self.writer = self.pending = None

    def start(self) -> None:
        """Open (or continue) the MLflow run and log the spec; open the TensorBoard writer."""
        t = self.spec.tracking
        if t.mlflow:
            self._guard("mlflow", self._start_mlflow)
        if t.tensorboard:
            self._guard("tensorboard", self._start_tensorboard)

    def _start_mlflow(self) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = self.spec.tracking.mlflow
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        name = self.spec.tracking.experiment or self.spec.name
        experiment = client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{JOB_TAG}` = '{self.job_id}'",
                                   max_results=1)
        if found:
            run_id, known = found[0].info.run_id, found[0].data.params
            client.update_run(run_id, status="RUNNING")
            self.say(f"tracking: mlflow run {run_id} of job {self.job_id} continues ({uri}, experiment {name})")
        else:
            run_id, known = client.create_run(experiment_id, tags={JOB_TAG: self.job_id},
                                              run_name=run_name(self.spec.name, self.job_id)).info.run_id, {}
            self.say(f"tracking: mlflow run {run_id} ({uri}, experiment {name})")
        # parameters are immutable: a resumed run (perhaps at another worker count) keeps its first values
        params = [Param(k, v) for k, v in spec_params(self.spec.to_dict()).items() if k not in known]
        for at in range(0, len(params), PARAMS_PER_CALL):
            client.log_batch(run_id, params=params[at:at + PARAMS_PER_CALL])
        self.client, self.run_id = client, run_id

    def _start_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(self.spec.tracking.tensorboard)
        self.say(f"tracking: tensorboard events in {self.spec.tracking.tensorboard}")

    def log(self, rec: Mapping[str, Any]) -> None:
        """One metrics.jsonl record, at its step."""
        values, step = scalars(rec), int(rec.get("step", 0))
        if not values:
            return
        if self.run_id is not None:
            self._guard("mlflow", lambda: self._log_mlflow(values, step))
        if self.writer is not None:
            self._guard("tensorboard", lambda: [self.writer.add_scalar(k, v, step) for k, v in values.items()])

    def _log_mlflow(self, values: dict[str, float], step: int) -> None:
        """Log asynchronously, one record behind: the previous record's call is awaited first (and
        raises its failure), so that a step waits on tracking only when a record takes longer to
        log than a step takes to train (a local sqlite store: ~10-50 ms a record)."""
        from mlflow.entities import Metric

        self._wait()
        now = int(time.time() * 1000)
        self.pending = self.client.log_batch(self.run_id, synchronous=False,
                                             metrics=[Metric(k, v, now, step) for k, v in values.items()
                                                      if math.isfinite(v)])

    def _wait(self) -> None:
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.wait()

    def artifact(self, location: str, digest: str | None) -> None:
        """The published artifact: where it is and its manifest's digest."""
        if self.run_id is not None:
            self._guard("mlflow", self._wait)
        if self.run_id is not None:
            self._guard("mlflow", lambda: [self.client.set_tag(self.run_id, k, v) for k, v in
                                           (("artifact", location), ("manifest_digest", digest or "")) if v])

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; the event files flushed."""
        if self.run_id is not None:
            self._guard("mlflow", self._wait)
        if self.run_id is not None:
            self._guard("mlflow", lambda: self.client.set_terminated(self.run_id, status))
        if self.writer is not None:
            self._guard("tensorboard", self.writer.close)
        self.client = self.run_id = self.writer = self.pending = None

    def _guard(self, backend: str, action: Callable[[], Any]) -> None:
        """Run ``action``; on any error say so once and drop ``backend`` (the job goes on)."""
        try:
            action()
        except Exception as e:  # a tracking backend must never end the training
            target = getattr(self.spec.tracking, backend)
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            self.say(f"tracking: {backend} at {target} failed ({type(e).__name__}: {text}); the job goes on "
                     f"without it")
            if backend == "mlflow":
                self.client = self.run_id = self.pending = None
            else:
                self.writer = None


@contextmanager
def tracked(spec, job_id: str, main: bool, say: Callable[[str], None]) -> Iterator[Tracker]:
    """A started :class:`Tracker` (a silent one off the main process), ended FINISHED when the
    block completes, FAILED when it raises, KILLED when it is interrupted."""
    tracker = Tracker(spec, job_id, say)
    if main:
        tracker.start()
    try:
        yield tracker
    except Exception:
        tracker.end("FAILED")
        raise
    except BaseException:
        tracker.end("KILLED")
        raise
    tracker.end("FINISHED")
