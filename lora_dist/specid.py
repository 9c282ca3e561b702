"""What a job id is bound to: the spec's fields that decide what is trained (all but
:data:`RESUMABLE_CHANGES`), their digest, and how two specs differ in them. Works on spec
mappings (``JobSpec.to_dict()``, a checkpoint's recorded spec), so it needs no schema.
"""

from __future__ import annotations

import reprlib
from typing import Any, Mapping

# Fields a resumed job may change: where and how wide it runs (a job resumes at another worker
# count or ZeRO stage, its state being gathered whole), and how often it reports. Every other field decides what is
# trained, and a job id is bound to it (spec_digest).
RESUMABLE_CHANGES = ("cluster.workers", "cluster.zero_stage", "cluster.placement", "cluster.max_failures",
                     "cluster.cpus_per_worker", "cluster.runtime_env", "train.log_every", "train.checkpoint_every",
                     "train.parity_check", "train.parity_steps", "train.parity_tolerance", "tracking.mlflow",
                     "tracking.experiment", "tracking.tensorboard")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and key != "cluster.runtime_env":
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def bound_fields(spec_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The dotted fields of a spec mapping that a job id is bound to (all but RESUMABLE_CHANGES)."""
    return {k: v for k, v in _flat(spec_dict).items() if k not in RESUMABLE_CHANGES}


def spec_digest(spec_dict: Mapping[str, Any]) -> str:
    """sha256 over :func:`bound_fields` in canonical JSON: equal digests, the same training."""
    import hashlib
    import json

    body = json.dumps(bound_fields(spec_dict), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def spec_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``field: old -> new`` for every bound field that differs between two spec mappings."""
    a, b = bound_fields(old), bound_fields(new)
    return [f"{k}: {Short(a.get(k))!r} -> {Short(b.get(k))!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


class Short:
    """A value shown in an error message: its repr, cut to a length a terminal can show."""

    def __init__(self, value: Any, limit: int = 200) -> None:
        r = reprlib.Repr()
        r.maxstring = r.maxother = r.maxlong = limit
        r.maxlist = r.maxtuple = r.maxdict = r.maxset = 8
        r.maxlevel = 3
        self.text = r.repr(value)

    def __repr__(self) -> str:
        return self.text
