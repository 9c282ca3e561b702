"""Starting ``lora-dist serve``: resolve and verify every adapter, group them by base, check the
token and the address, then run the application on an embedded Ray (in the foreground, until
Ctrl-C) or deploy it to a cluster's Serve (``--address``).

An adapter that fails verification, is not an adapter, or does not belong to its base's weights
is refused with its reason, and the others are served.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lora_dist.adapter import base_of
from lora_dist.errors import ArtifactError, JobError, JobFailed
from lora_dist.generate import chat_template_of
from lora_dist.records import Manifest
from lora_dist.served import local_copy
from lora_dist.store import JOB_ID_RE, is_uri, manifest_digest, run_name, verify_artifact

TOKEN_ENV = "LORA_DIST_SERVE_TOKEN"
ALIAS_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,127})=(.+)$")
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class ServeError(ValueError):
    """Bad ``serve`` arguments (exit 2)."""


@dataclass
class Adapter:
    """One verified adapter: its served name, where replicas read it, and its manifest."""
    name: str
    location: str
    digest: str
    manifest: Manifest


@dataclass
class Table:
    adapters: list[Adapter] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def split_alias(arg: str) -> tuple[str | None, str]:
    """``ALIAS=ADAPTER`` -> (alias, adapter); a plain ADAPTER (or a path that exists) -> (None, it)."""
    m = ALIAS_RE.match(arg)
    if m is None or Path(arg).exists() or is_uri(arg):
        return None, arg
    return m.group(1), m.group(2)


def resolve(arg: str, address: str | None) -> Adapter:
    """An artifact directory, a storage URI or a job id (resolved as ``fetch`` resolves it),
    verified: every sha256, nothing unlisted, the signature when a key is set.

    Raises:
        ArtifactError: it fails verification, or is a full model, not an adapter.
        JobError: no such directory or job, or the job has no artifact.
    """
    alias, where = split_alias(arg)
    digest = None
    if not Path(where).exists() and not is_uri(where):
        if not JOB_ID_RE.match(where):
            raise JobError(f"{where}: not an artifact directory, a storage URI or a job id")
        from lora_dist.client import Client

        status = Client(address).job(where).status()
        if status.state != "SUCCEEDED" or not status.artifact:
            raise JobError(f"job {where} is {status.state}: it has no artifact to serve")
        where, digest = str(status.artifact), status.manifest
    if is_uri(where):
        path = local_copy(where, digest)
    else:
        path = Path(where).resolve()
        if not (path / "manifest.json").is_file():
            raise JobError(f"{path}: no manifest.json: not an artifact directory")
    manifest = verify_artifact(path, digest=digest)
    if manifest.kind == "full":
        raise ArtifactError(f"{where}: a fully fine-tuned model, not an adapter; serve adapters over their base")
    name = alias or (run_name(manifest.name, manifest.job_id) if manifest.name and manifest.job_id else path.name)
    return Adapter(name, where if is_uri(where) else str(path), digest or manifest_digest(path), manifest)


def gather(args: list[str], address: str | None, say: Callable[[str], None]) -> Table:
    """Every adapter resolved and verified; refusals with their reasons, names unique."""
    table = Table()
    for arg in args:
        try:
            adapter = resolve(arg, address)
        except (ArtifactError, JobError) as e:
            table.refused[split_alias(arg)[0] or arg] = str(e)
            say(f"refused {arg}: {e}")
            continue
        if any(a.name == adapter.name for a in table.adapters):
            raise ServeError(f"{arg}: the name {adapter.name} is taken by another adapter; name it ALIAS={arg}")
        table.adapters.append(adapter)
    return table


def base_name(ref: str, quantization: str, taken: set[str]) -> str:
    """The name a base is requested by: its built-in or hub id, a directory's last component."""
    name = Path(ref).name if "/" in ref and Path(ref).exists() else ref
    return f"{name}-{quantization}" if name in taken else name


def config_for(table: Table, check_fingerprints: bool, say: Callable[[str], None], **limits: Any) -> dict[str, Any]:
    """The application's config (``serving.build_app``): one base per (base, quantization), with
    its adapters; on the embedded default each adapter's base fingerprint is checked here."""
    from lora_dist.base import fingerprint, resolve_base

    bases: dict[tuple[str, str], dict[str, Any]] = {}
    models: dict[str, dict[str, Any]] = {}
    created = int(time.time())
    for a in table.adapters:
        ref, quantization = base_of(a.manifest.base_model), a.manifest.quantization or "int8"
        key = (ref, quantization)
        if key not in bases:
            if check_fingerprints:
                say(f"checking base {ref}")
            bases[key] = {"base": ref, "quantization": quantization, "adapters": {},
                          "name": base_name(ref, quantization, {b["name"] for b in bases.values()}),
                          "fingerprint": fingerprint(resolve_base(ref)) if check_fingerprints else None}
        b = bases[key]
        if b["fingerprint"] is not None and b["fingerprint"] != a.manifest.base_model.fingerprint:
            table.refused[a.name] = (f"trained on {ref} with fingerprint {a.manifest.base_model.fingerprint}, but "
                                     f"that base now has fingerprint {b['fingerprint']}")
            say(f"refused {a.name}: {table.refused[a.name]}")
            continue
        b["adapters"][a.name] = {"location": a.location, "digest": a.digest}
        models.setdefault(b["name"], {"base": b["name"], "adapter": None, "chat": False, "created": created})
        models[a.name] = {"base": b["name"], "adapter": a.name, "chat": chat_template_of(a.manifest) is not None,
                          "created": created}
    served = {b["name"]: {k: b[k] for k in ("base", "quantization", "adapters")} for b in bases.values() if b["adapters"]}
    return {"bases": served, "models": models, "refused": dict(table.refused), **limits}


def read_token(token_file: str | None, no_auth: bool, host: str) -> str | None:
    """The bearer token: ``--token-file``, else $LORA_DIST_SERVE_TOKEN; None only with --no-auth on 127.0.0.1."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ServeError(f"--token-file: cannot read {token_file}: {e.strerror}") from None
        if not token:
            raise ServeError(f"--token-file: {token_file} is empty")
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if token and no_auth:
        raise ServeError("--no-auth: a token was given too (--token-file or $" + TOKEN_ENV + "); choose one")
    if token:
        if len(token) < 16:
            raise ServeError("the serve token must be at least 16 characters (e.g. `openssl rand -hex 32`)")
        return token
    if not no_auth:
        raise ServeError(f"serve needs a bearer token: --token-file FILE or ${TOKEN_ENV} (or --no-auth, on 127.0.0.1 only)")
    if host not in LOCAL_HOSTS:
        raise ServeError(f"--no-auth: only with --host 127.0.0.1, not {host}: anyone who reaches the port could use it")
    return None


def check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ServeError(f"--port: {port} is not a port number")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServeError(f"--port: cannot listen on {host}:{port}: {e.strerror}") from None


def run(adapters: list[str], *, address: str | None, host: str, port: int, max_adapters: int, token: str | None,
        max_batch_size: int, cpus: int, say: Callable[[str], None], ready: Callable[[str], None]) -> int:
    """Serve until interrupted (embedded) or deploy (``address``). Returns the exit code."""
    from lora_dist.serving import token_digest

    if max_adapters < 1 or max_batch_size < 1 or cpus < 1:
        raise ServeError("--max-adapters, --max-batch-size and --cpus must be at least 1")
    if address is None:
        check_port(host, port)
    table = gather(adapters, address, say)
    config = config_for(table, address is None, say, token_sha256=token_digest(token) if token else None,
                        max_adapters=max_adapters, max_batch_size=max_batch_size, cpus=cpus)
    if not config["bases"]:
        say("no adapter to serve: " + ("every one was refused" if adapters else "name at least one"))
        return 1
    names = ", ".join(config["models"])
    if address is not None:
        return _deploy(config, address, host, port, names, ready)
    return _embedded(config, host, port, names, say, ready)


def _embedded(config: dict[str, Any], host: str, port: int, names: str, say, ready) -> int:
    import ray
    from ray import serve

    from lora_dist.jobs import WORKER_ENV
    from lora_dist.serving import build_app

    def stop(_sig, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    ray.init(address="local", num_cpus=config["cpus"] * len(config["bases"]), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})
    try:
        try:
            serve.start(http_options={"host": host, "port": port})
            say(f"loading {len(config['bases'])} base(s) on their replicas")
            serve.run(build_app(config), name="lora-dist", route_prefix="/")
        except Exception as e:  # Ray Serve's own failure (its proxy has 60 s to start): one line, not a traceback
            raise JobFailed(f"Ray Serve did not start: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]} "
                            f"(a machine too loaded to start Serve's proxy in its 60 s: try again)") from None
        for sig in (signal.SIGINT, signal.SIGTERM):  # ours again: Ray may leave a deferring SIGINT handler
            signal.signal(sig, stop)
        ready(f"serving {names} at http://{host}:{port}/v1 (Ctrl-C stops)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping")
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _deploy(config: dict[str, Any], address: str, host: str, port: int, names: str, ready) -> int:
    from lora_dist.jobs import enable_token_auth

    enable_token_auth()
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    try:
        ServeSubmissionClient(address).deploy_applications({
            "http_options": {"host": host, "port": port},
            "applications": [{"name": "lora-dist", "route_prefix": "/", "import_path": "lora_dist.serving:remote_app",
                              "args": config}]})
    except Exception as e:  # the SDK raises RuntimeError / requests errors with the dashboard's reply
        raise JobError(f"{address}: the cluster's Serve refused the application: {e}") from None
    ready(f"deployed {names} to the Serve of {address} (port {port} on its nodes; `serve status` follows it)")
    return 0


def say_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
