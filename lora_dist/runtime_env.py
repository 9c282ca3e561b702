"""What a job may set in ``cluster.runtime_env``, and how a spec is shown without its secrets.

A spec may configure the libraries a job uses, never what its processes load, where they connect
or which certificates they trust, and never carry a secret: Ray stores a job's runtime_env in its
job table, which every holder of the cluster's token reads (``list_jobs``, the dashboard).

- ``env_vars``: names on an allow-list (:data:`ENV_ALLOWED_NAMES`, and the prefixes
  :data:`ENV_ALLOWED_PREFIXES` without a name that points somewhere or loads code), plus what the
  cluster adds with ``$LORA_DIST_ALLOW_ENV`` (``NAME,PREFIX_*``). Never a name that carries a
  secret (:data:`SECRET_NAME_RE`), nor one of the loader's, Python's, Ray's or lora-dist's, whatever
  the cluster adds.
- ``pip``: plain requirements (``name[extra]==version``), unless the cluster turned pip off
  (``$LORA_DIST_ALLOW_PIP=0``).

Both are read from the environment of the process that checks: the spec is checked where it is
loaded (the submitting machine) and again on the cluster (``jobrun``), whose settings decide;
``jobrun`` also checks the runtime_env Ray actually gives the job (:func:`job_runtime_env_problems`),
for a client that skipped these checks. Env var values are often secrets: :func:`redacted` is
the form of a spec that manifests, checkpoints, logs and status carry.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

RUNTIME_ENV_KEYS = ("env_vars", "pip")
ALLOW_ENV = "LORA_DIST_ALLOW_ENV"
ALLOW_PIP = "LORA_DIST_ALLOW_PIP"
ENV_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,127}$")
# Secrets: Ray shows a job's runtime_env to every token holder. TOKENIZERS_* is no token.
SECRET_NAME_RE = re.compile(r"TOKEN(?!IZER)|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
# Names a job may set: each configures a library's threads, logging, tuning or caches, and loads no
# code, names no network destination, certificate or file to write.
ENV_ALLOWED_NAMES = (
    # thread pools
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "NUMEXPR_MAX_THREADS",
    "PYTHONHASHSEED",  # the only PYTHON* name: it seeds str hashing, nothing more
    "TRANSFORMERS_VERBOSITY", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TRANSFORMERS_OFFLINE",
    # NCCL tuning and debug output (not NCCL_NET_PLUGIN and the like, which load a library, nor
    # NCCL_*_FILE, which read or write a file)
    "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_SOCKET_IFNAME", "NCCL_SOCKET_NTHREADS", "NCCL_NSOCKS_PERTHREAD",
    "NCCL_IB_DISABLE", "NCCL_IB_HCA", "NCCL_IB_TIMEOUT", "NCCL_IB_RETRY_CNT", "NCCL_IB_GID_INDEX",
    "NCCL_P2P_DISABLE", "NCCL_P2P_LEVEL", "NCCL_SHM_DISABLE", "NCCL_NET_GDR_LEVEL", "NCCL_CROSS_NIC",
    "NCCL_ALGO", "NCCL_PROTO", "NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_BUFFSIZE", "NCCL_NTHREADS",
    "NCCL_CUMEM_ENABLE", "NCCL_NVLS_ENABLE", "NCCL_LAUNCH_MODE", "NCCL_ASYNC_ERROR_HANDLING", "NCCL_BLOCKING_WAIT",
    # torch's debug output and error handling
    "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT", "TORCH_DISTRIBUTED_DEBUG",
    "TORCH_SHOW_CPP_STACKTRACES", "TORCH_CPP_LOG_LEVEL", "CUDA_LAUNCH_BLOCKING", "CUDA_MODULE_LOADING",
    "PYTORCH_CUDA_ALLOC_CONF",
    # a run's names in Weights & Biases (not its endpoint or key)
    "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NOTES", "WANDB_MODE", "WANDB_SILENT",
)
# Prefixes a job may set (hub caches and offline mode, the tokenizers' threads, MLflow's
# experiment and timeouts), except a name with one of ENV_PREFIX_EXCEPTIONS: where a request and
# the cluster's credential go (HF_ENDPOINT, MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL), which
# certificates are trusted, an auth plugin, remote code, another run to write into.
ENV_ALLOWED_PREFIXES = ("HF_", "TOKENIZERS_", "MLFLOW_")
ENV_PREFIX_EXCEPTIONS = ("ENDPOINT", "URL", "URI", "PROXY", "CERT", "TLS", "SSL", "INSECURE", "AUTH", "PLUGIN",
                         "REMOTE_CODE", "MODULES", "USERNAME", "RUN_ID")
# Never, whatever the cluster adds: the loader's, interpreters', Ray's, lora-dist's and the process
# layout's own names.
ENV_REFUSED_PREFIXES = ("LD_", "DYLD_", "PYTHON", "RAY_", "LORA_DIST_", "MALLOC_", "GLIBC_", "BASH_", "PERL",
                        "RUBY", "NODE_", "JAVA_", "_JAVA_", "PIP_", "UV_", "CONDA_", "VIRTUAL_ENV", "OMP_PLACES")
ENV_REFUSED_NAMES = ("PATH", "HOME", "SHELL", "ENV", "IFS", "TMPDIR", "USER", "LOGNAME", "CUDA_VISIBLE_DEVICES",
                     "MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                     "TORCH_EXTENSIONS_DIR")
# runtime_env.pip: a plain requirement (name, optional extras, optional version clauses); no URL,
# path, option or VCS reference.
PIP_REQUIREMENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*\])?"
                                r"((==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+)?(,(==|!=|<=|>=|~=|<|>)[A-Za-z0-9.*+!_-]+)*$")
ALLOW_ENTRY_RE = re.compile(r"^[A-Z][A-Z0-9_]*\*?$")


def runtime_env_problems(env: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> list[str]:
    """What is wrong with a ``cluster.runtime_env``, one message per problem (empty: allowed).

    Args:
        env: the runtime_env: keys ``env_vars`` and ``pip`` only.
        environ: where ``$LORA_DIST_ALLOW_ENV`` and ``$LORA_DIST_ALLOW_PIP`` are read (default:
            this process's environment).
    """
    environ = os.environ if environ is None else environ
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
    elif env_vars:
        extra, malformed = _cluster_allows(environ.get(ALLOW_ENV, ""))
        problems += malformed
        problems += [p for name in sorted(env_vars) if (p := _env_name_problem(name, extra))]
    pip = env.get("pip", [])
    if not isinstance(pip, list) or not all(isinstance(x, str) for x in pip):
        problems.append("pip must be a list of requirement strings")
    elif pip:
        problems += _pip_problems(pip, environ.get(ALLOW_PIP))
    return problems


def _env_name_problem(name: str, extra: tuple[tuple[str, ...], tuple[str, ...]]) -> str | None:
    names, prefixes = extra
    if SECRET_NAME_RE.search(name):
        shown = name if ENV_NAME_RE.match(name) else repr(name[:64])
        return (f"env_vars: {shown} is refused: it names a secret, and Ray shows a job's runtime_env to every "
                f"holder of the cluster's token (its job table, the dashboard); set it in the cluster's own "
                f"environment (on its nodes, or from the cluster's secrets) instead")
    if not ENV_NAME_RE.match(name):
        return f"env_vars: {name[:64]!r} is not an allowed name (upper-case letters, digits, '_')"
    if name in ENV_ALLOWED_NAMES:
        return None
    if name in ENV_REFUSED_NAMES or name.startswith(ENV_REFUSED_PREFIXES):
        return (f"env_vars: {name} is refused: it changes what the worker processes load or how Ray and lora-dist "
                f"run (refused: {', '.join(p + '*' for p in ENV_REFUSED_PREFIXES[:5])}, PATH, HOME, ...)")
    if name in names or name.startswith(prefixes):
        return None
    if name.startswith(ENV_ALLOWED_PREFIXES) and not any(x in name for x in ENV_PREFIX_EXCEPTIONS):
        return None
    return (f"env_vars: {name} is not on the allow-list: a job's env vars configure its libraries, never what "
            f"a process loads, where it connects or which certificates it trusts (allowed: HF_*, MLFLOW_* and "
            f"TOKENIZERS_* without an endpoint, URL, certificate, auth or code setting; OMP_NUM_THREADS, "
            f"NCCL_DEBUG, ... (docs/how-it-works.md); and what the cluster adds in ${ALLOW_ENV})")


def _cluster_allows(setting: str) -> tuple[tuple[tuple[str, ...], tuple[str, ...]], list[str]]:
    """``$LORA_DIST_ALLOW_ENV`` (``NAME,PREFIX_*``): ((names, prefixes), problems)."""
    entries = [e.strip() for e in setting.split(",") if e.strip()]
    malformed = [e for e in entries if not ALLOW_ENTRY_RE.match(e)]
    problems = [f"${ALLOW_ENV}: {malformed[0][:64]!r} is not NAME or PREFIX_* (upper-case letters, digits, '_'); "
                f"this cluster's setting is wrong"] if malformed else []
    good = [e for e in entries if e not in malformed]
    return (tuple(e for e in good if not e.endswith("*")), tuple(e[:-1] for e in good if e.endswith("*"))), problems


def _pip_problems(pip: list[str], setting: str | None) -> list[str]:
    allowed = (setting or "1").strip().lower()
    if allowed in ("0", "false", "no", "off"):
        return [f"pip is turned off on this cluster (${ALLOW_PIP}={setting}): a job runs with the packages its "
                f"nodes have; ask the cluster's operators for {pip[0][:80]!r}"]
    if allowed not in ("1", "true", "yes", "on"):
        return [f"pip: ${ALLOW_PIP} is {setting[:20]!r} on this cluster, expected 0 or 1 (pip is refused until "
                f"it is one of them)"]
    return [f"pip: {req[:80]!r} is not a plain requirement (name[extra]==version; no URL, path, option or VCS "
            f"reference)" for req in pip if not PIP_REQUIREMENT_RE.match(req.replace(" ", ""))]


# What lora-dist's client and Ray add to a Jobs API job's runtime_env: the working_dir holding the
# spec file, Ray's own bookkeeping. (lora-dist's own env vars, jobs.WORKER_ENV, come in as ``ours``.)
RAY_ADDED_KEYS = ("working_dir", "config", "_ray_commit", "_ray_release")
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's: {"runtime_env": ..., "metadata": ...} of the job


def job_runtime_env_problems(env: Any, ours: Mapping[str, str], environ: Mapping[str, str] | None = None) -> list[str]:
    """What is wrong with the runtime_env a Jobs API job runs under, as Ray hands it to the job's
    entrypoint (``$RAY_JOB_CONFIG_JSON_ENV_VAR``): the spec's rules (:func:`runtime_env_problems`),
    after what lora-dist's client adds (a working_dir, ``ours`` with exactly its values) and Ray's
    own keys, with ``pip`` as Ray normalizes it (``{"packages": [...], "pip_check": false}``; any
    other pip option, such as an index URL, is refused)."""
    if not isinstance(env, Mapping):
        return [f"must be a mapping with keys {', '.join(RUNTIME_ENV_KEYS)}"]
    rest = {k: v for k, v in env.items() if k not in RAY_ADDED_KEYS and v is not None}
    problems = []
    if isinstance(rest.get("env_vars"), Mapping):
        rest["env_vars"] = {k: v for k, v in rest["env_vars"].items() if ours.get(k) != v}
    pip = rest.get("pip")
    if isinstance(pip, Mapping):
        options = sorted(set(pip) - {"packages", "pip_check"})
        if options:
            problems.append(f"pip: options {options} are not allowed (plain requirements only)")
        rest["pip"] = pip.get("packages", [])
    return problems + runtime_env_problems(rest, environ)


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
