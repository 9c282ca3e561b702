"""What a job may set in ``cluster.runtime_env``, and how a spec is shown without its secrets.

A spec may configure the job, not the interpreter, the loader or the cluster: ``env_vars`` with
names that change none of those, and ``pip`` with plain requirements. Env var values are often
secrets: :func:`redacted` is the form of a spec that manifests, checkpoints, logs and status carry.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

RUNTIME_ENV_KEYS = ("env_vars", "pip")
# runtime_env.env_vars: upper-case names, none that changes what a process loads or how Ray and
# lora-dist behave (a spec may configure the job, not the interpreter, the loader or the cluster).
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")
ENV_REFUSED_PREFIXES = ("LD_", "DYLD_", "PYTHON", "RAY_", "LORA_DIST_", "MALLOC_", "GLIBC_", "BASH_", "PERL",
                        "RUBY", "NODE_", "JAVA_", "_JAVA_", "PIP_", "UV_", "CONDA_", "VIRTUAL_ENV", "OMP_PLACES")
ENV_REFUSED_NAMES = ("PATH", "HOME", "SHELL", "ENV", "IFS", "TMPDIR", "USER", "LOGNAME", "CUDA_VISIBLE_DEVICES",
                     "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                     "TORCH_EXTENSIONS_DIR")
# Tokens: Ray stores a job's runtime_env and shows it on its dashboard. A cluster's processes read
# them from their own environment or login (`hf auth login`), never from a job.
ENV_SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# runtime_env.pip: a plain requirement (name, optional extras, optional version clauses); no URL,
# path, option or VCS reference.
PIP_REQUIREMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*\])?"
                                r"((==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+)?(,(==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+)*$")


def runtime_env_problems(env: Mapping[str, Any]) -> list[str]:
    """What is wrong with a ``cluster.runtime_env``, one message per problem (empty: allowed).

    Keys: ``env_vars`` and ``pip`` only. Env var names must match ``[A-Z][A-Z0-9_]*`` and not
    start with ``LD_``, ``PYTHON``, ``RAY_``, ``LORA_DIST_`` (and the like) nor be ``PATH``,
    ``HOME`` and the like, nor a token (``HF_TOKEN``); values are strings. ``HF_HOME``,
    ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are how a job points its workers at a hub cache or mirror.
    pip entries are plain requirement strings (``name[extra]==version``).
    """
    if not isinstance(env, Mapping):
        return [f"must be a mapping with keys {', '.join(RUNTIME_ENV_KEYS)}"]
    problems = []
    bad = sorted(str(k) for k in set(env) - set(RUNTIME_ENV_KEYS))
    if bad:
        problems.append(f"keys {bad} are not allowed (allowed: {', '.join(RUNTIME_ENV_KEYS)})")
    env_vars = env.get("env_vars", {})
    if not isinstance(env_vars, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in env_vars.items()):
        problems.append("env_vars must map names to string values")
    else:
        for name in sorted(env_vars):
            if not ENV_NAME_RE.match(name):
                problems.append(f"env_vars: {name[:64]!r} is not an allowed name (upper-case letters, digits, '_')")
            elif name in ENV_SECRET_NAMES:
                problems.append(f"env_vars: {name} is refused: Ray stores a job's runtime_env and shows it on its "
                                f"dashboard; set {name} in the environment of the cluster's nodes, or log them in "
                                f"(`hf auth login`)")
            elif name in ENV_REFUSED_NAMES or name.startswith(ENV_REFUSED_PREFIXES):
                problems.append(f"env_vars: {name} is refused: it changes what the worker processes load or how "
                                f"Ray and lora-dist run (refused: {', '.join(p + '*' for p in ENV_REFUSED_PREFIXES[:5])}, "
                                f"PATH, HOME, ...)")
    pip = env.get("pip", [])
    if not isinstance(pip, list) or not all(isinstance(x, str) for x in pip):
        problems.append("pip must be a list of requirement strings")
    else:
        for req in pip:
            if not PIP_REQUIREMENT_RE.match(req.replace(" ", "")):
                problems.append(f"pip: {req[:80]!r} is not a plain requirement (name[extra]==version; no URL, "
                                f"path, option or VCS reference)")
    return problems


def redacted(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """A spec mapping with runtime_env's env var values removed (names kept): values are often
    secrets, and never reach manifests, logs or status."""
    cluster = dict(spec_dict.get("cluster") or {})
    env = dict(cluster.get("runtime_env") or {})
    if isinstance(env.get("env_vars"), Mapping):
        env["env_vars"] = {k: "<redacted>" for k in env["env_vars"]}
        cluster["runtime_env"] = env
        return {**spec_dict, "cluster": cluster}
    return spec_dict
