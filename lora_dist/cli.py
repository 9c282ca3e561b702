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
from typing import Any

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
    _check_model(spec)
    return spec


def _check_model(spec) -> None:
    """The LoRA targets and rank against the model's architecture, built without weights."""
    from lora_dist.model import check_model

    check_model(spec.model.base, spec.injected_lora, spec.model.quantization)
    if spec.data.batching == "packed":
        from lora_dist.data import check_packing
        from lora_dist.base import model_type

        check_packing(model_type(spec.model.base))


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from lora_dist.counting import count_activations, count_model
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
    print(f"  cluster.zero_stage auto picks {plan.auto.stage}: {plan.auto.reason.removeprefix('auto: ')} (a job's "
          f"workers decide from the memory free when they start)")
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
    from lora_dist.spec import SpecError, load_spec, multi_node_storage_problem
    from lora_dist.store import check_job_id, new_job_id

    address = _address(args)
    spec = load_spec(args.job, args.set)  # no torch yet: a bad spec is refused in a moment
    job_id = check_job_id(args.job_id) if args.job_id else new_job_id()
    if not address:
        return _submit_embedded(spec, job_id)  # the model is checked under the job's lock
    problem = multi_node_storage_problem(spec)  # a cluster may have several nodes; one machine does not
    if problem:
        raise SpecError([f"{problem} (submitting to {address})"], source=str(args.job))
    _check_model(spec)
    sid = jobs.submit_remote(spec.with_absolute_paths(), job_id, address)
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


# --- the embedded default ------------------------------------------------------------------------
#
# `submit` without an address holds the job's lock, then forks: the child validates the model and
# runs the job (it starts the local Ray, whose raylet and GCS are its children); the parent waits
# for it. Ray's core worker ends a driver whose raylet died with _exit(1), past every Python
# handler, so only a process outside the job can still say what happened and record it.

RAY_CORE = ("raylet", "gcs_server")
# After the local Ray is known lost, the job's process gets this long to end by itself (a lost GCS
# leaves the driver waiting ~60 s for it to come back) before it and its processes are killed.
RAY_LOST_GRACE_S = 15.0


def _submit_embedded(spec, job_id: str) -> int:
    from lora_dist import jobs
    from lora_dist.store import run_name

    sid = run_name(spec.name, job_id)
    lock = jobs.lock_job(sid)  # before anything is written or started; held until the job has ended
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        started = time.time()
        child = os.fork()
        if child == 0:
            lock.close()  # the parent's copy keeps the lock
            _embedded_child(spec, job_id, sid)
        return _supervise(child, sid, job_id, started)
    finally:
        lock.close()


def _embedded_child(spec, job_id: str, sid: str) -> None:
    """The job's process: run it, then _exit with the command's exit code (never return into the
    caller's stack, which belongs to the parent)."""
    code = EXIT_FAILED
    try:
        os.setpgrp()  # a terminal's Ctrl-C reaches the parent, which passes one SIGINT on
        _die_with_parent()
        code = _run_embedded(spec, job_id, sid)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BaseException as e:  # noqa: BLE001 - the same mapping as main(), then _exit
        code = _error_exit(e)
        if code is None:
            import traceback

            traceback.print_exc()
            code = EXIT_FAILED
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the submitting one dies (`stop` kills that one when a job
    does not stop in time); Ray's own processes die with this one."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(EXIT_FAILED)


def _run_embedded(spec, job_id: str, sid: str) -> int:
    from lora_dist import jobs
    from lora_dist.launch import run_job
    from lora_dist.spec import SpecError
    from lora_dist.store import digest_at

    _check_model(spec)
    spec = spec.with_absolute_paths()
    log_path = jobs.registry_dir() / f"{sid}.log"
    previous = jobs.new_record(sid, state="RUNNING", pid=os.getppid(), driver_pid=os.getpid(), name=spec.name,
                               job=job_id, output_dir=spec.output.dir, max_steps=spec.train.max_steps,
                               log=str(log_path), started=time.time(), where="embedded")
    print(f"job {sid} on an embedded local Ray (lora-dist status {sid})", flush=True)
    # `lora-dist stop` records the request, then sends SIGINT. Ray installs signal handlers of its
    # own and may turn the interrupt into SystemExit or an error, so the registry says what it was.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    watch = _RayWatch(sid)
    watch.start()
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log_path), _Tee(err, log_path)
    try:
        artifact = run_job(spec, job_id=job_id)
    except BaseException as e:
        sys.stdout, sys.stderr = out, err
        if watch.lost:
            return _report_ray_lost(sid, job_id, watch.lost, log_path)
        if isinstance(e, SpecError):  # refused before anything ran (a resubmit with another spec)
            jobs.restore_record(sid, previous)
            raise
        if jobs.stop_requested(sid) or isinstance(e, KeyboardInterrupt):
            jobs.record(sid, state="STOPPED", message="stopped by the user")
            print(f"job {sid} stopped; no artifact was published", file=sys.stderr)
            return EXIT_FAILED
        text = str(e).strip()
        jobs.record(sid, state="FAILED", message=text.splitlines()[-1][:300] if text else type(e).__name__)
        raise
    finally:
        watch.stop()
        sys.stdout, sys.stderr = out, err
    digest = digest_at(str(artifact))  # right away: the digest vouches for the artifact as published
    jobs.record(sid, state="SUCCEEDED", artifact=str(artifact), manifest_digest=digest)
    print(artifact)
    return EXIT_OK


class _RayWatch:
    """Watches the raylet and GCS that the job's ray.init started (children of this process).

    One that exits while Ray is still initialized died under the job (killed, out of memory); a
    normal ray.shutdown() disconnects first, then ends them. The loss is written to the registry at
    once, since Ray may end this process moments later without running any more Python."""

    def __init__(self, sid: str) -> None:
        import threading

        self.sid, self.lost = sid, None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-dist-ray-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        import psutil

        me, tracked = psutil.Process(), {}
        while not self._done.wait(0.2):
            try:
                if self._check(me, tracked):
                    return
            except Exception:  # noqa: BLE001 - ray half-imported, a process gone between calls: look again
                continue

    def _check(self, me, tracked: dict) -> bool:
        """One look; True when there is nothing more to watch."""
        up = getattr(sys.modules.get("ray"), "is_initialized", lambda: False)
        if not up():
            return bool(tracked)  # after Ray was up: shut down normally
        for p in _core_children(me):
            if p.pid not in tracked:
                tracked[p.pid] = (p, p.name())
        for pid, (p, name) in tracked.items():
            if not _running(p) and up():
                self._lost(f"its {name} (pid {pid}) exited: killed, or out of memory")
                return True
        return False

    def _lost(self, what: str) -> None:
        from lora_dist import jobs

        jobs.record(self.sid, ray_lost=what)  # first: the parent reads it if this process dies now
        self.lost = what


def _core_children(proc) -> list:
    """The raylet and GCS server among ``proc``'s children."""
    import psutil

    found = []
    for p in proc.children():
        try:
            if p.name() in RAY_CORE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _running(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _supervise(child: int, sid: str, job_id: str, started: float) -> int:
    """Wait for the job's process; pass stop requests on to it; when it ended without recording
    an outcome (or its local Ray was lost and it hangs), record and say what happened."""
    import psutil

    from lora_dist import jobs

    def forward(signum, frame) -> None:
        try:
            os.kill(child, signal.SIGINT)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    proc = psutil.Process(child)
    seen: dict[int, tuple[Any, str]] = {}  # raylet / GCS of the job, as this process saw them
    gone, lost_at, tree = None, None, []
    try:
        while True:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                break
            try:
                tree = proc.children(recursive=True) or tree
                for p in _core_children(proc):
                    seen.setdefault(p.pid, (p, p.name()))
            except psutil.Error:
                pass
            for p_pid, (p, name) in seen.items():
                if gone is None and not _running(p):
                    gone = f"its {name} (pid {p_pid}) exited: killed, or out of memory"
            r = _own_record(sid, started)
            if lost_at is None and r is not None and r.get("ray_lost"):
                lost_at = time.monotonic()
            if lost_at is not None and time.monotonic() - lost_at > RAY_LOST_GRACE_S:
                os.kill(child, signal.SIGKILL)
                _, status = os.waitpid(child, 0)
                break
            time.sleep(0.25)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    code = os.waitstatus_to_exitcode(status)
    r = _own_record(sid, started)
    if r is None or r.get("state") != "RUNNING":
        return code if code >= 0 else EXIT_FAILED  # the job recorded its outcome (or never started)
    lost = r.get("ray_lost") or gone
    if lost:
        _kill_all(tree)  # what is left of the job's own Ray (its process tree only)
        return _report_ray_lost(sid, job_id, lost, Path(r.get("log", "")))
    how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    jobs.record(sid, state="FAILED", message=f"the job's process ended without a result ({how})")
    print(f"error: job {sid}: the job's process ended without a result ({how}); rerun the same command with "
          f"--job-id {job_id} to resume from its last checkpoint", file=sys.stderr)
    return EXIT_FAILED


def _own_record(sid: str, started: float) -> dict | None:
    """The job's record if this submit wrote it (not one left by an earlier run of the job id)."""
    from lora_dist import jobs

    try:
        r = jobs.read_record(sid)
    except ValueError:  # being replaced right now
        return None
    if r is None or r.get("pid") != os.getpid() or float(r.get("started") or 0) < started:
        return None
    return r


def _kill_all(procs: list) -> None:
    """SIGKILL these processes (none of them this process's child: psutil would reap it)."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def _report_ray_lost(sid: str, job_id: str, lost: str, log_path: Path) -> int:
    """Record and say that the job's local Ray went away, and how to resume."""
    from lora_dist import jobs

    jobs.record(sid, state="FAILED", message=f"the local Ray started for this job stopped under it ({lost})")
    text = (f"error: the local Ray started for job {sid} stopped under it ({lost}); rerun the same command with "
            f"--job-id {job_id} to resume from its last checkpoint")
    print(text, file=sys.stderr, flush=True)
    try:
        with open(log_path, "a") as f:
            f.write(text + "\n")
    except OSError:
        pass
    return EXIT_FAILED


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
    fetch(st.artifact, out, digest=st.manifest)  # the digest recorded apart from the artifact's storage
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
    for flag, path in (("--out", args.out), ("--slots", args.slots)):
        if path and Path(path).exists():
            print(f"error: {flag}: {path} exists; choose a new file", file=sys.stderr)
            return EXIT_BAD_INPUT
    if args.out and args.slots and Path(args.out).resolve() == Path(args.slots).resolve():
        print("error: --slots: the same file as --out; choose another", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.rerank is None:  # the default: on unseen restaurants it cut SER 13.3% -> 4.9% (README Results)
        args.rerank = "ser" if args.num_beams >= 2 else "none"
    if args.rerank == "ser" and args.num_beams < 2:
        print("error: --rerank ser chooses among the beam's candidates; it needs --num-beams of at least 2",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    loaded, manifest = load_adapted(Path(args.artifact))
    t0 = time.time()

    def progress(i: int, n: int) -> None:
        print(f"generated {i}/{n} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    preds, metrics, slots = evaluate_e2e(loaded.model, loaded.tokenizer, data, template=prompt_template(manifest),
                                         limit=args.limit, num_beams=args.num_beams,
                                         length_penalty=args.length_penalty,
                                         no_repeat_ngram_size=args.no_repeat_ngram_size,
                                         max_new_tokens=args.max_new_tokens, progress=progress,
                                         batch_size=args.batch_size, bos=uses_bos(manifest), rerank=args.rerank)
    if args.out:
        Path(args.out).write_text("\n".join(preds) + "\n")
    if args.slots:
        Path(args.slots).write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in slots))
    print(json.dumps({**metrics, "mrs": len(preds), "rerank": args.rerank}))
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

    e = sub.add_parser("eval", help="E2E metrics and slot error rate: one output per distinct MR, scored against "
                                    "all its references and its MR")
    e.add_argument("artifact", help="artifact directory")
    e.add_argument("--data", required=True, help="E2E csv (mr, ref)")
    e.add_argument("--out", default=None, help="write the predictions here, one per line, in MR order")
    e.add_argument("--slots", default=None, metavar="FILE",
                   help="write each prediction's slot errors here as JSON lines (mr, prediction, slots, missing, "
                        "wrong, added, ser), in MR order")
    e.add_argument("--rerank", choices=("none", "ser"), default=None,
                   help="ser: output the beam candidate with the fewest slot errors (ties: the higher beam score); "
                        "none: the top beam. Default: ser with a beam (--num-beams >= 2), none without")
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
    from lora_dist.data import DataError
    from lora_dist.errors import ArtifactError, JobError, JobFailed, ModelError
    from lora_dist.spec import SpecError

    for kinds, code in (((SpecError, ModelError, DataError), EXIT_BAD_INPUT), ((ArtifactError, JobFailed), EXIT_FAILED),
                        ((JobError,), EXIT_UNREACHABLE)):
        if isinstance(e, kinds):
            print(f"error: {e}", file=sys.stderr)
            return code
    return None


if __name__ == "__main__":
    sys.exit(main())
