"""Thin commands: parse, call one function, print, exit non-zero on failure."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _quiet_libraries() -> None:
    # DeepSpeed and bitsandbytes print accelerator notices at import; they are not the user's business.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("transformers", "bitsandbytes", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_train(args: argparse.Namespace) -> int:
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    spec = load_spec(args.job, args.set)
    out = train_local(spec)
    print(out)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from lora_dist.launch import run_job
    from lora_dist.spec import load_spec

    spec = load_spec(args.job, args.set)
    address = args.address or os.environ.get("RAY_ADDRESS") or None
    out = run_job(spec, job_id=args.job_id, address=address)
    print(out)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_dist.generate import generate_from_artifact

    text = generate_from_artifact(Path(args.artifact), args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size)
    print(text)
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from lora_dist.adapter import verify_artifact

    manifest = verify_artifact(Path(args.artifact))
    print(f"ok: {len(manifest['files'])} files verified in {args.artifact}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-dist", description="LoRA fine-tuning over a frozen int8 base.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train in this process and write the adapter artifact")
    t.add_argument("job", help="job spec (YAML)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set train.max_steps=5 (repeatable)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("submit", help="run a job on Ray (embedded local Ray unless --address / RAY_ADDRESS)")
    s.add_argument("job", help="job spec (YAML)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set cluster.workers=2 (repeatable)")
    s.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else embedded)")
    s.add_argument("--job-id", default=None, help="reuse a job id to resume its checkpoints")
    s.set_defaults(func=cmd_submit)

    g = sub.add_parser("generate", help="generate with a base model plus an adapter artifact")
    g.add_argument("artifact", help="artifact directory")
    g.add_argument("--prompt", required=True, help="input text (for E2E adapters: the meaning representation)")
    g.add_argument("--raw", action="store_true", help="do not apply the training run's prompt template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    v = sub.add_parser("verify", help="check every file of an artifact against its manifest sha256")
    v.add_argument("artifact")
    v.set_defaults(func=cmd_verify)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    from lora_dist.adapter import ArtifactError
    from lora_dist.data import DataError
    from lora_dist.launch import JobFailed
    from lora_dist.model import ModelError
    from lora_dist.spec import SpecError

    try:
        return args.func(args)
    except (SpecError, ModelError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ArtifactError, JobFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
