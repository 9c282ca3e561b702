"""Thin commands: parse, call one function, print, exit non-zero on failure.

Exit codes: 0 success; 1 the job or check failed (job FAILED/STOPPED, verification failed);
2 bad input (spec, model, data, arguments); 3 the job or cluster cannot be found or reached.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_UNREACHABLE = 0, 1, 2, 3


def _quiet_libraries() -> None:
    # DeepSpeed and bitsandbytes print accelerator notices at import; they are not the user's business.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("transformers", "bitsandbytes", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _address(args: argparse.Namespace) -> str | None:
    return getattr(args, "address", None) or os.environ.get("RAY_ADDRESS") or None


def _validated_spec(args: argparse.Namespace):
    """Every check that can run before anything starts: the spec and the model (targets and rank
    on the architecture built without weights). A cluster checks its own output root (jobrun)."""
    from lora_dist.spec import load_spec

    spec = load_spec(args.job, args.set)  # no torch yet: a bad spec is refused in a moment
    from lora_dist.model import check_model

    check_model(spec.model.base, spec.injected_lora, spec.model.quantization)
    return spec


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from lora_dist.model import count_activations, count_model
    from lora_dist.plan import METHODS, Setup, fmt_bytes, make_plan, parse_bytes
    from lora_dist.spec import load_spec

    spec = load_spec(args.job, args.set)
    try:
        memory = parse_bytes(args.gpu_memory)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    workers = args.gpus or spec.cluster.workers
    device = args.device or ("cuda" if args.gpus or spec.cluster.gpus_per_worker else "cpu")
    setup = Setup(workers=workers, micro_batch=spec.train.micro_batch_size, seq_len=spec.data.max_length,
                  device=device, dtype=spec.train.dtype,
                  activation_checkpointing=args.activation_checkpointing or spec.train.activation_checkpointing,
                  adapter_bytes_per_param=4 if spec.output.adapter_dtype == "float32" else 2)
    counts = count_model(spec.model.base, spec.lora, spec.model.quantization)
    acts = {method: count_activations(spec.model.base, spec.injected_lora, spec.model.quantization, setup.micro_batch,
                                      setup.seq_len, setup.dtype_name, method=method, device=device)
            for method in ("lora", "full")}
    plan = make_plan(counts, setup, memory, acts)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    c = counts
    print(f"{spec.model.base} ({c.architecture}): {c.total_params:,} parameters; {c.quantized_linear_params:,} in "
          f"decoder-block linears (int8), {c.float_params:,} float; LoRA r={spec.lora.r} on "
          f"{', '.join(spec.lora.targets)}: {c.lora_params:,} trainable")
    print(f"base weights: fp16 {fmt_bytes(c.total_params * 2)}, ours (int8 linears + fp32 row scales + "
          f"{setup.dtype_name} rest) {fmt_bytes(plan.to_dict()['base_bytes'])}")
    print(f"per worker on {workers} x {fmt_bytes(memory)} ({device}, {setup.dtype_name} compute), micro-batch "
          f"{setup.micro_batch} x {setup.seq_len} tokens, activation checkpointing "
          f"{'on' if setup.activation_checkpointing else 'off'}:")
    names = {"full": "full fine-tuning, ZeRO-3", "lora_fp16": "LoRA, replicated fp16 base (paper)",
             "lora_int8_zero3": "LoRA, int8 base, ZeRO-3 (ours)"}
    print(f"  {'method':<36} {'trainable':>16} {'per worker':>11} {'fits':>5} {'min GPUs':>9} {'checkpoint':>11}")
    for m in METHODS:
        r = plan.methods[m]
        print(f"  {names[m]:<36} {r['trainable_params']:>16,} {fmt_bytes(r['per_worker_bytes']):>11} "
              f"{'yes' if r['fits'] else 'no':>5} {str(r['min_gpus'] or 'never'):>9} "
              f"{fmt_bytes(r['checkpoint_bytes']['deliverable']):>11}")
    ours = plan.methods["lora_int8_zero3"]
    print("  ours, term by term: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in ours["terms"].items()))
    a = acts["lora"]
    print(f"  activations counted on meta: {fmt_bytes(a.per_block)} per block ({fmt_bytes(a.per_block_checkpointed)} "
          f"checkpointed), {fmt_bytes(a.head)} outside the blocks, logits gradient {fmt_bytes(a.logits)}")
    print("  ZeRO-3 settings: " + ", ".join(f"{k} {v:,}" for k, v in plan.to_dict()["zero_settings"].items()))
    exported = ours["checkpoint_bytes"]["deliverable"]
    print(f"  adapter {c.lora_params * setup.adapter_bytes_per_param:,} bytes of trained LoRA tensors"
          + (f" ({exported:,} bytes in the PEFT-format file: B of a fused projection's q/v slices is stored "
             f"full width)" if exported != c.lora_params * setup.adapter_bytes_per_param else "")
          + "; resumable LoRA checkpoint "
          f"{fmt_bytes(ours['checkpoint_bytes']['resumable'])}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    spec = _validated_spec(args)
    from lora_dist.train import train_local

    print(train_local(spec))
    return EXIT_OK


class _Tee:
    """Write to the terminal and to the job's log file (Ray's worker logs arrive via print)."""

    def __init__(self, stream, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, s: str) -> int:
        self.file.write(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()
        self.file.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def cmd_submit(args: argparse.Namespace) -> int:
    from lora_dist import jobs
    from lora_dist.store import check_job_id, new_job_id

    spec = _validated_spec(args).with_absolute_paths()
    job_id = check_job_id(args.job_id) if args.job_id else new_job_id()
    address = _address(args)
    if address:
        sid = jobs.submit_remote(spec, job_id, address)
        print(f"submitted {sid} to {address}", flush=True)
        if not args.wait:
            print(sid)
            return EXIT_OK
        st = jobs.wait_remote(address, sid, sys.stdout)
        if st.state != "SUCCEEDED" or not st.artifact:
            print(f"error: job {sid} ended {st.state}: {st.message or ''}", file=sys.stderr)
            return EXIT_FAILED
        print(st.artifact)
        return EXIT_OK
    return _submit_embedded(spec, job_id)


def _submit_embedded(spec, job_id: str) -> int:
    from lora_dist import jobs
    from lora_dist.launch import run_job
    from lora_dist.store import run_name

    sid = run_name(spec.name, job_id)
    log_path = jobs.registry_dir() / f"{sid}.log"
    jobs.record(sid, state="RUNNING", pid=os.getpid(), name=spec.name, job=job_id, output_dir=spec.output.dir,
                max_steps=spec.train.max_steps, log=str(log_path), started=time.time(), where="embedded")
    print(f"job {sid} on an embedded local Ray (lora-dist status {sid})", flush=True)
    # `lora-dist stop` records the request, then sends SIGINT. Ray installs signal handlers of its
    # own and may turn the interrupt into SystemExit or an error, so the registry says what it was.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log_path), _Tee(err, log_path)
    try:
        artifact = run_job(spec, job_id=job_id)
    except BaseException as e:
        if jobs.stop_requested(sid) or isinstance(e, KeyboardInterrupt):
            jobs.record(sid, state="STOPPED", message="stopped by the user")
            sys.stdout, sys.stderr = out, err
            print(f"job {sid} stopped; no artifact was published", file=sys.stderr)
            return EXIT_FAILED
        text = str(e).strip()
        jobs.record(sid, state="FAILED", message=text.splitlines()[-1][:300] if text else type(e).__name__)
        raise
    finally:
        sys.stdout, sys.stderr = out, err
    jobs.record(sid, state="SUCCEEDED", artifact=str(artifact))
    print(artifact)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from lora_dist import jobs

    address = _address(args)
    st = jobs.status_remote(address, args.job_id) if address else jobs.status_local(args.job_id)
    print(st.line())
    return EXIT_OK if st.state in ("SUCCEEDED", "RUNNING", "PENDING") else EXIT_FAILED


def cmd_logs(args: argparse.Namespace) -> int:
    from lora_dist import jobs

    address = _address(args)
    chunks = jobs.logs_remote(address, args.job_id, args.follow) if address else jobs.logs_local(args.job_id, args.follow)
    for chunk in chunks:
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    from lora_dist import jobs

    address = _address(args)
    state = jobs.stop_remote(address, args.job_id) if address else jobs.stop_local(args.job_id)
    print(f"{args.job_id}  {state}")
    return EXIT_OK if state == "STOPPED" else EXIT_FAILED


def cmd_list(args: argparse.Namespace) -> int:
    from lora_dist import jobs

    address = _address(args)
    for st in (jobs.list_remote(address) if address else jobs.list_local()):
        print(st.line())
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    from lora_dist import jobs
    from lora_dist.store import fetch

    address = _address(args)
    st = jobs.status_remote(address, args.job_id) if address else jobs.status_local(args.job_id)
    if st.state != "SUCCEEDED" or not st.artifact:
        print(f"error: job {args.job_id} is {st.state}: it has no artifact to fetch", file=sys.stderr)
        return EXIT_FAILED
    out = Path(args.out) if args.out else Path.cwd() / Path(st.artifact.rstrip("/")).name
    fetch(st.artifact, out)
    print(out)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from lora_dist.generate import generate_from_artifact

    text = generate_from_artifact(Path(args.artifact), args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                                  num_beams=args.num_beams, length_penalty=args.length_penalty,
                                  no_repeat_ngram_size=args.no_repeat_ngram_size)
    print(text)
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from lora_dist.adapter import load_adapted
    from lora_dist.evaluate import evaluate_e2e
    from lora_dist.generate import prompt_template, uses_bos

    data = Path(args.data)
    if not data.is_file():
        print(f"error: --data: file not found: {data}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.batch_size < 1:
        print(f"error: --batch-size: must be at least 1, got {args.batch_size}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.out and Path(args.out).exists():
        print(f"error: --out: {args.out} exists; choose a new file", file=sys.stderr)
        return EXIT_BAD_INPUT
    loaded, manifest = load_adapted(Path(args.artifact))
    t0 = time.time()

    def progress(i: int, n: int) -> None:
        print(f"generated {i}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    preds, metrics = evaluate_e2e(loaded.model, loaded.tokenizer, data, template=prompt_template(manifest),
                                  limit=args.limit, num_beams=args.num_beams,
                                  length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                                  max_new_tokens=args.max_new_tokens, progress=progress,
                                  batch_size=args.batch_size, bos=uses_bos(manifest))
    if args.out:
        Path(args.out).write_text("\n".join(preds) + "\n")
    print(json.dumps({**metrics, "mrs": len(preds)}))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from lora_dist.store import verify_artifact

    from lora_dist.store import SIGNING_KEY_ENV, manifest_digest, signing_key

    manifest = verify_artifact(Path(args.artifact), digest=args.digest)
    signed = ("signature checked" if signing_key() is not None
              else "signed; set " + SIGNING_KEY_ENV + " to check" if "signature" in manifest else "unsigned")
    print(f"ok: {len(manifest['files'])} files verified in {args.artifact}, nothing unlisted; manifest "
          f"{manifest_digest(Path(args.artifact))} ({signed})")
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

    e = sub.add_parser("eval", help="E2E metrics: one output per distinct MR, scored against all its references")
    e.add_argument("artifact", help="artifact directory")
    e.add_argument("--data", required=True, help="E2E csv (mr, ref)")
    e.add_argument("--out", default=None, help="write the predictions here, one per line, in MR order")
    e.add_argument("--limit", type=int, default=None, help="only the first N distinct MRs")
    e.add_argument("--num-beams", type=int, default=10)
    e.add_argument("--length-penalty", type=float, default=0.9)
    e.add_argument("--no-repeat-ngram-size", type=int, default=4)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=8,
                   help="MRs decoded together (left-padded); memory grows with batch size x beams")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate with a base model plus an adapter artifact")
    g.add_argument("artifact", help="artifact directory")
    g.add_argument("--prompt", required=True, help="input text (for E2E adapters: the meaning representation)")
    g.add_argument("--raw", action="store_true", help="do not apply the training run's prompt template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--no-repeat-ngram-size", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if _address(args):
        # Before anything imports ray: it reads RAY_AUTH_MODE once, at import.
        from lora_dist.jobs import _enable_token_auth

        _enable_token_auth()
    _quiet_libraries()
    from lora_dist.data import DataError
    from lora_dist.errors import ArtifactError, JobError, JobFailed, ModelError
    from lora_dist.spec import SpecError

    try:
        return args.func(args)
    except (SpecError, ModelError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (ArtifactError, JobFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except JobError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
