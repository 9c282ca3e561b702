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
    pass


def _unused(_: argparse.Namespace) -> None:  # placeholder until the commands land
    pass
