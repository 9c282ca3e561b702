"""Thin commands: parse, call one function, print, exit non-zero on failure.

Exit codes: 0 success; 1 the job or check failed (job FAILED/STOPPED, verification failed);
2 bad input (spec, model, data, arguments); 3 the job or cluster cannot be found or reached.

The job commands (submit, status, logs, stop, list, fetch) are the Python SDK's
(:class:`lora_dist.client.Client`) on one backend, picked once from ``--address`` / ``$RAY_ADDRESS``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def _client(args: argparse.Namespace):
    """The SDK on the backend these arguments name: a cluster's Jobs API, or the embedded default."""
    from lora_dist.client import Client

    return Client(getattr(args, "address", None), attached=True)


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from lora_dist.counting import count_activations, count_model
    from lora_dist.hub import hub_ref, pin
    from lora_dist.plan import Setup, make_plan, parse_bytes
    from lora_dist.spec import load_spec

    spec = load_spec(args.job, args.set)
    try:
        memory = parse_bytes(args.gpu_memory)
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus: must be at least 1, got {args.gpus}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    device = args.device or ("cuda" if args.gpus or spec.cluster.gpus_per_worker else "cpu")
    setup = Setup(workers=args.gpus or spec.cluster.workers, micro_batch=spec.train.micro_batch_size,
                  seq_len=spec.data.max_length, device=device, dtype=spec.train.dtype,
                  activation_checkpointing=args.activation_checkpointing or spec.train.activation_checkpointing,
                  adapter_bytes_per_param=4 if spec.output.adapter_dtype == "float32" else 2)
    base = pin(hub_ref(spec.model))  # a hub id at one commit: its config.json alone, never its weights
    counts = count_model(base, spec.lora, spec.model.quantization)
    acts = {method: count_activations(base, spec.injected_lora, spec.model.quantization, setup.micro_batch,
                                      setup.seq_len, setup.dtype_name, method=method, device=device)
            for method in ("lora", "full")}
    plan = make_plan(counts, setup, memory, acts)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table(spec.model.base, spec.lora.r,
                                                                            spec.lora.targets))
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from lora_dist.spec import load_spec
    from lora_dist.train import train_local

    spec = load_spec(args.job, args.set)  # no torch yet: a bad spec is refused in a moment
    print(train_local(spec))  # validate_job(spec, "train") before the model is built
    return EXIT_OK


def cmd_data(args: argparse.Namespace) -> int:
    from lora_dist.datareport import data_report
    from lora_dist.spec import load_spec

    spec = load_spec(args.job, args.set)
    print(data_report(spec, show=args.show, say=lambda text: print(text, file=sys.stderr, flush=True)))
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.submit(args.job, args.set, job_id=args.job_id)
    if client.address:
        print(f"submitted {job.id} to {client.address}", flush=True)
        if not args.wait:
            print(job.id)
            return EXIT_OK
    st = job.wait()  # the embedded default: in the foreground, its output here; Ctrl-C stops it
    if st.state == "SUCCEEDED" and st.artifact:
        print(st.artifact)
        return EXIT_OK
    if client.address:  # an embedded job has said why itself
        print(f"error: job {job.id} ended {st.state}: {st.message or ''}", file=sys.stderr)
    return EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    st = _client(args).job(args.job_id).status()
    print(st.line())
    return EXIT_OK if st.state in ("SUCCEEDED", "RUNNING", "PENDING") else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    for line in _client(args).job(args.job_id).logs(args.follow):
        sys.stdout.write(line)
        sys.stdout.flush()
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    state = _client(args).job(args.job_id).stop()
    print(f"{args.job_id}  {state}")
    return EXIT_OK if state == "STOPPED" else EXIT_FAILED


def cmd_list(args: argparse.Namespace) -> int:
    for st in _client(args).jobs():
        print(st.line())
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    print(_client(args).job(args.job_id).fetch(args.out))
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_dist.generate import generate_from_artifact

    text = generate_from_artifact(Path(args.artifact), args.chat if args.prompt is None else args.prompt, raw=args.raw,
                                  chat=args.prompt is None, system=args.system, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size)
    print(text)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lora_dist.adapter import load_adapted
    from lora_dist.evaluate import evaluate_e2e
    from lora_dist.generate import e2e_template, stop_ids, uses_bos

    data = Path(args.data)
    if not data.is_file():
        print(f"error: --data: file not found: {data}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.batch_size < 1:
        print(f"error: --batch-size: must be at least 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for flag, path in (("--out", args.out), ("--slots", args.slots)):
        if path and Path(path).exists():
            print(f"error: {flag}: {path} exists; choose a new file", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.out and args.slots and Path(args.out).resolve() == Path(args.slots).resolve():
        print("error: --slots: the same file as --out; choose another", file=sys.stderr)
        return EXIT_BAD_INPUT
    from lora_dist.evaldata import evaluate_file, is_e2e_csv, table, write_result

    if not is_e2e_csv(data):  # another source's file: loss per token and perplexity, base and adapter
        result = evaluate_file(Path(args.artifact), data, batch_size=args.batch_size)
        print(table(result), file=sys.stderr)
        print(write_result(result, args.out))
        return EXIT_OK
    if args.rerank is None:  # the default: fewer slot errors on unseen restaurants (docs/results.md)
        args.rerank = "ser" if args.num_beams >= 2 else "none"
    if args.rerank == "ser" and args.num_beams < 2:
        print("error: --rerank ser chooses among the beam's candidates; it needs --num-beams of at least 2",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    loaded, manifest = load_adapted(Path(args.artifact))
    t0 = time.time()

    def progress(i: int, n: int) -> None:
        print(f"generated {i}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    tok = loaded.tokenizer  # a chat artifact's MRs go in the E2E user turn through its chat template
    preds, metrics, slots = evaluate_e2e(loaded.model, tok, data, template=e2e_template(manifest, tok),
                                         limit=args.limit, num_beams=args.num_beams,
                                         length_penalty=args.length_penalty,
                                         no_repeat_ngram_size=args.no_repeat_ngram_size,
                                         max_new_tokens=args.max_new_tokens, progress=progress,
                                         batch_size=args.batch_size, bos=uses_bos(manifest), rerank=args.rerank,
                                         stop=stop_ids(manifest, tok), reweight_mean=args.reweight_mean)
    if args.out:
        Path(args.out).write_text("\n".join(preds) + "\n")
    if args.slots:
        Path(args.slots).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in slots))
    rows, again = metrics["by_attributes"], metrics["reweighted"]
    for r in rows:
        print(f"{r['attributes']} attributes: {r['mrs']} MRs, BLEU {r['BLEU']:.1f}, SER {r['SER']:.1f}% "
              f"({r['missing']} missing, {r['wrong']} wrong, {r['added']} added)", file=sys.stderr)
    if again:
        print(f"re-weighted to {args.reweight_mean:g} attributes per MR: BLEU {again['BLEU']:.1f}, SER "
              f"{again['SER']:.1f}% ({again['effective_mrs']:.0f} MRs' worth of weight)", file=sys.stderr)
    else:
        print(f"not re-weighted: these MRs have {rows[0]['attributes']} to {rows[-1]['attributes']} attributes, "
              f"a mean of {args.reweight_mean:g} is outside them", file=sys.stderr)
    print(json.dumps({**metrics, "mrs": len(preds), "rerank": args.rerank}))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from lora_dist.store import SIGNING_KEY_ENV, signing_key, verify_with_digest

    manifest, digest = verify_with_digest(Path(args.artifact), digest=args.digest)  # the manifest read once
    signed = ("signature checked" if signing_key() is not None
              else "signed; set " + SIGNING_KEY_ENV + " to check" if manifest.signature is not None else "unsigned")
    print(f"ok: {len(manifest.files)} files verified in {args.artifact}, nothing unlisted; manifest "
          f"{digest} ({signed})")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-dist", description="LoRA fine-tuning over a frozen int8 base, "
                                "sharded by DeepSpeed ZeRO-3 across Ray workers.")
    sub = p.add_subparsers(dest="command", required=True)

    def job_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("job", help="job spec (YAML)")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set train.max_steps=5 (repeatable)")

    def address_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--address", default=None,
                        help="Ray Jobs API address, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS, "
                             "else the embedded default)")

    t = sub.add_parser("train", help="train in this process (no Ray) and write the artifact")
    job_args(t)
    t.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="memory and checkpoint plan: exact counts, bytes per worker, minimum GPUs")
    job_args(pl)
    pl.add_argument("--gpus", type=int, default=None, help="workers (GPUs) to plan for (default: cluster.workers)")
    pl.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB, 80GB (default 80GiB)")
    pl.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="worker kind (default: cuda with --gpus or cluster.gpus_per_worker, else cpu)")
    pl.add_argument("--activation-checkpointing", action="store_true", help="plan with activation checkpointing")
    pl.add_argument("--json", action="store_true", help="the same numbers as JSON with stable keys")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("data", help="read and tokenize the job's data as the job will, and report on it")
    job_args(d)
    d.add_argument("--show", type=int, default=2, metavar="N", help="render N examples, trained spans marked")
    d.set_defaults(func=cmd_data)

    s = sub.add_parser("submit", help="run a job on Ray: embedded local Ray, or a cluster with --address")
    job_args(s)
    address_arg(s)
    s.add_argument("--wait", action="store_true", help="with --address: follow the job to the end")
    s.add_argument("--job-id", default=None, help="reuse a job id to resume that job's checkpoints")
    s.set_defaults(func=cmd_submit)

    for name, func, helptext in (("status", cmd_status, "state, step / total, last loss, artifact when done"),
                                 ("stop", cmd_stop, "stop a job; it publishes no artifact")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("job_id")
        address_arg(sp)
        sp.set_defaults(func=func)

    lg = sub.add_parser("logs", help="a job's output")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    address_arg(lg)
    lg.set_defaults(func=cmd_logs)

    ls = sub.add_parser("list", help="lora-dist jobs")
    address_arg(ls)
    ls.set_defaults(func=cmd_list)

    f = sub.add_parser("fetch", help="copy a finished job's artifact here and verify every sha256")
    f.add_argument("job_id")
    f.add_argument("--out", default=None, help="destination directory (must not exist)")
    address_arg(f)
    f.set_defaults(func=cmd_fetch)

    v = sub.add_parser("verify", help="check every file of an artifact directory against its manifest sha256")
    v.add_argument("artifact")
    v.add_argument("--digest", default=None, metavar="SHA256",
                   help="also require the manifest's own sha256 to be this (as `verify` printed it at the time)")
    v.set_defaults(func=cmd_verify)

    e = sub.add_parser("eval", help="E2E metrics and slot error rate: one output per distinct MR, scored against "
                                    "all its references and its MR; other sources: loss and perplexity on --data")
    e.add_argument("artifact", help="artifact directory")
    e.add_argument("--data", required=True, help="E2E csv (mr, ref); any other file is read as the adapter's "
                                                 "source and scored: loss per token and perplexity, base and adapter")
    e.add_argument("--out", default=None, help="write the predictions here, one per line, in MR order (other "
                                               "sources: the JSON)")
    e.add_argument("--slots", default=None, metavar="FILE",
                   help="write each prediction's slot errors here as JSON lines (mr, prediction, slots, missing, "
                        "wrong, added, ser), in MR order")
    e.add_argument("--rerank", choices=("none", "ser"), default=None,
                   help="ser: output the beam candidate with the fewest slot errors (ties: the higher beam score); "
                        "none: the top beam. Default: ser with a beam (--num-beams >= 2), none without")
    e.add_argument("--limit", type=int, default=None, help="only the first N distinct MRs")
    e.add_argument("--reweight-mean", type=float, default=7.0, metavar="K",
                   help="also report BLEU and SER re-weighted to K attributes per MR (default 7.0, the mean of "
                        "E2E's test set; docs/commands.md)")
    e.add_argument("--num-beams", type=int, default=10)
    e.add_argument("--length-penalty", type=float, default=0.9)
    e.add_argument("--no-repeat-ngram-size", type=int, default=4)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8,
                   help="MRs decoded together (left-padded); memory grows with batch size x beams")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate with a base model plus an adapter artifact")
    g.add_argument("artifact", help="artifact directory")
    given = g.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", help="input text (for E2E adapters: the meaning representation)")
    given.add_argument("--chat", metavar="MESSAGE", help="a chat adapter: a user message, rendered with the "
                       "artifact's chat template; the reply ends at the end-of-turn token")
    g.add_argument("--system", default=None, metavar="TEXT", help="with --chat: a system message before it")
    g.add_argument("--raw", action="store_true", help="do not apply the training run's prompt template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    from lora_dist.usecmds import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from lora_dist.jobs import quiet_libraries

    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code = _error_exit(e)
        if code is None:
            raise
        return code


def _error_exit(e: BaseException) -> int | None:
    """Print ``e`` as the user's error and return its exit code; None for an error that is a bug."""
    from lora_dist.sources import DataError
    from lora_dist.errors import ArtifactError, JobError, JobFailed, ModelError, SettingError
    from lora_dist.spec import SpecError

    for kinds, code in (((SpecError, ModelError, DataError, SettingError), EXIT_BAD_INPUT), ((ArtifactError, JobFailed), EXIT_FAILED),
                        ((JobError,), EXIT_UNREACHABLE)):
        if isinstance(e, kinds):
            print(f"error: {e}", file=sys.stderr)
            return code
    return None


if __name__ == "__main__":
    sys.exit(main())
