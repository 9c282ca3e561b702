"""The commands that use what was trained: ``serve`` (many adapters over one base, OpenAI-compatible
HTTP on Ray Serve) and ``merge`` (W0 + s·BA written as a standard Hugging Face model directory).

Kept apart from ``cli.py`` so that each command's arguments sit beside the function that runs
it; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse


def add_commands(sub) -> None:
    """Register ``serve`` and ``merge`` on the ``lora-dist`` parser's subcommands."""
    add_merge(sub)
    add_serve(sub)


# --- merge ----------------------------------------------------------------------------------------

def add_merge(sub) -> None:
    m = sub.add_parser("merge", help="fold an adapter into its base: a standard Hugging Face model directory "
                                     "(W0 + s·BA, sharded safetensors), streamed a tensor at a time")
    m.add_argument("artifact", help="adapter artifact directory")
    m.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (must not exist)")
    m.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="dtype of the merged weights (default: the base's, as its config.json says)")
    m.add_argument("--from", dest="source", choices=("float", "int8"), default="float",
                   help="float: fold into the base's own float weights (as PEFT's merge_and_unload); int8: into "
                        "the dequantized int8 weights the adapter trained against (default: float)")
    m.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    m.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from lora_dist.plan import parse_bytes
    from lora_dist.store import MANIFEST_FILE

    artifact, out = Path(args.artifact), Path(args.out)
    problem = None
    if not (artifact / MANIFEST_FILE).is_file():
        problem = f"ARTIFACT: {artifact} is not an artifact directory (no {MANIFEST_FILE})"
    elif out.exists():
        problem = f"--out: {out} exists; a merged model is written to a new directory"
    else:
        try:
            size = parse_bytes(args.max_shard_size, "--max-shard-size")
        except ValueError as e:
            problem = str(e)
    if problem is not None:  # refused before torch is imported
        print(f"error: {problem}", file=sys.stderr)
        return 2  # cli.EXIT_BAD_INPUT
    from lora_dist.merge import merge_adapter

    print(merge_adapter(artifact, out, dtype=args.dtype, source=args.source, max_shard_size=size,
                        say=lambda line: print(line, file=sys.stderr, flush=True)))
    return 0


# --- serve ----------------------------------------------------------------------------------------

def add_serve(sub) -> None:
    import os

    sp = sub.add_parser("serve", help="serve adapters over their base: OpenAI-compatible HTTP on Ray Serve, many "
                                      "adapters per replica, batched together")
    sp.add_argument("adapters", nargs="+", metavar="ADAPTER",
                    help="an artifact directory, a storage URI or a job id; ALIAS=ADAPTER names it")
    sp.add_argument("--address", default=None, help="a Ray cluster's dashboard (Jobs API) address: deploy to its Serve "
                                                    "(default: $RAY_ADDRESS, else an embedded Ray, in the foreground)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--max-adapters", type=int, default=8, help="adapters held per replica (LRU; default 8)")
    sp.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together (default 16)")
    sp.add_argument("--cpus", type=int, default=os.cpu_count() or 1,
                    help="CPUs (torch threads) per base replica (default: this machine's)")
    sp.add_argument("--token-file", default=None, help="file holding the bearer token clients must send (default: "
                                                       "$LORA_DIST_SERVE_TOKEN)")
    sp.add_argument("--no-auth", action="store_true", help="serve without a token (only on 127.0.0.1)")
    sp.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import os
    import sys

    address = args.address or os.environ.get("RAY_ADDRESS") or None
    if address:
        from lora_dist.jobs import enable_token_auth

        enable_token_auth()  # before anything imports ray: it reads RAY_AUTH_MODE once
    from lora_dist.servestart import ServeError, read_token, run, say_stderr

    try:
        token = read_token(args.token_file, args.no_auth, args.host)
        return run(args.adapters, address=address, host=args.host,
                   port=args.port, max_adapters=args.max_adapters, token=token, max_batch_size=args.max_batch_size,
                   cpus=args.cpus, say=say_stderr, ready=lambda text: print(text, flush=True))
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
