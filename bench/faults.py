"""The fault table: each scenario done for real to the main job (SmolLM2-135M, int8, 2 ZeRO-3
workers on the embedded Ray, shrunk to a few steps), and what became of the job, its artifact and
its checkpoints.

    python bench/faults.py                 # every scenario (about 25 minutes on 2 cores)
    python bench/faults.py --only kill,tear
    python bench/faults.py --only load     # 6 jobs at once to a 2-CPU head, 3 embedded, 8 fetches

The embedded jobs get a registry of the run's own (``LORA_DIST_CACHE``, the model and the
tokenization cache linked in from the usual one).

Each row: what was done, the outcome, the state of the artifact and checkpoints, pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "smollm2-e2e.yaml"
DATA = REPO / "jobs" / "data" / "e2e" / "devset.csv"
NAME = "smollm2-e2e"
SMALL = ["cluster.workers=2", "train.max_steps=6", "train.micro_batch_size=4", "data.max_length=64",
         "train.eval_batches=1", "train.lr=2e-3", "train.warmup_steps=1", "train.checkpoint_every=2",
         "train.log_every=1", f"data.path={DATA}"]


# --- helpers: the CLI as a user runs it -----------------------------------------------------------

def cli(*args: str, env: dict | None = None, timeout: float = 1800) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lora_dist.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def submit_args(out: Path, job_id: str, *extra: str) -> list[str]:
    return ["submit", str(JOB), "--job-id", job_id, f"--set=output.dir={out}",
            *[f"--set={o}" for o in SMALL + list(extra)]]


def start(out: Path, job_id: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen([sys.executable, "-m", "lora_dist.cli", *submit_args(out, job_id, *extra)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def work(out: Path, job_id: str) -> Path:
    return out / f".{NAME}-{job_id}.work"


def artifact(out: Path, job_id: str) -> Path:
    return out / f"{NAME}-{job_id}"


def checkpoints(out: Path, job_id: str) -> Path:
    return out / ".checkpoints" / f"{NAME}-{job_id}"


def steps_done(out: Path, job_id: str) -> int:
    f = work(out, job_id) / "metrics.jsonl"
    if not f.is_file():
        return 0
    done = [json.loads(x)["step"] for x in f.read_text().splitlines() if '"loss"' in x]
    return max(done, default=0)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen | None, timeout: float = 1200) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.5)
    return False


def state_of(out: Path, job_id: str) -> str:
    """The artifact and checkpoints as a user finds them."""
    from lora_dist.errors import ArtifactError
    from lora_dist.store import verify_artifact

    a = artifact(out, job_id)
    if a.exists():
        try:
            m = verify_artifact(a)
            history = [json.loads(x)["step"] for x in (a / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            once = history == sorted(set(history)) == list(range(1, m.steps + 1))
            art = (f"artifact verifies (resumed from step {m.resumed_from_step}, world {m.world_size}, "
                   f"each step once: {once})")
        except ArtifactError as e:
            art = f"artifact FAILS verify: {str(e)[:80]}"
    else:
        art = "no artifact"
    c = checkpoints(out, job_id)
    steps = sorted(p.name for p in c.iterdir() if p.name.startswith("step-")) if c.is_dir() else []
    return f"{art}; checkpoints: {', '.join(s.replace('step-0000000', 'step ') for s in steps) or 'none'}"


def last_line(text: str, *needles: str) -> str:
    """The last line holding one of ``needles`` (else the last), without Ray's colours and
    "(RayTrainWorker pid=N)" prefix."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [re.sub(r"^\(\w+ pid=\d+\)\s*", "", ln.strip()) for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(n in ln for n in needles):
            return ln[:160]
    return (lines[-1] if lines else "")[:160]


# --- scenarios: each returns (what was done, outcome, state, passed) ---------------------------

def kill_worker(out: Path) -> tuple[str, str, str, bool]:
    jid = "kill"
    p = start(out, jid, "cluster.max_failures=1")
    reached = wait_until(lambda: steps_done(out, jid) >= 3, p)
    if reached:
        os.kill(int((work(out, jid) / "rank1.pid").read_text()), signal.SIGKILL)
    text, _ = p.communicate(timeout=1800)
    ok = reached and p.returncode == 0 and "resumed from the checkpoint of step 2" in text
    return ("SIGKILL rank 1 at step 3 (max_failures=1)", f"exit {p.returncode}: {last_line(text, 'resumed')}",
            state_of(out, jid), ok and not checkpoints(out, jid).exists())


def remove_node(out: Path) -> tuple[str, str, str, bool]:
    """A second Ray node (its own raylet) taken away mid-run: Ray Train restarts the group on the
    node that is left, which resumes from the shared checkpoint."""
    import ray
    from ray.cluster_utils import Cluster

    from lora_dist.launch import run_job
    from lora_dist.spec import load_spec

    jid = "node"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    removed = []

    def remove_when_past_checkpoint() -> None:
        if wait_until(lambda: steps_done(out, jid) >= 3, None, timeout=1200):
            cluster.remove_node(second)
            removed.append(steps_done(out, jid))

    watcher = threading.Thread(target=remove_when_past_checkpoint, daemon=True)
    watcher.start()
    try:
        spec = load_spec(JOB, SMALL + [f"output.dir={out}", "output.shared=true", "cluster.placement=spread",
                                       "cluster.max_failures=1"])
        try:
            run_job(spec, job_id=jid, address=cluster.address)
            outcome = "SUCCEEDED"
        except Exception as e:  # noqa: BLE001 - the table reports whatever happened
            outcome = f"FAILED: {str(e)[:120]}"
    finally:
        ray.shutdown()
        cluster.shutdown()
    from lora_dist.store import read_manifest

    nodes = len(set(read_manifest(artifact(out, jid)).nodes)) if artifact(out, jid).exists() else 0
    return (f"node with rank 1 removed at step {removed[0] if removed else '?'} (2 nodes, spread)",
            f"{outcome}; final run on {nodes} node(s)", state_of(out, jid), outcome == "SUCCEEDED" and bool(removed))


def _fail_after_checkpoint(out: Path, jid: str, step: int) -> bool:
    """Run job ``jid`` with no retries and kill a worker once the step-``step`` checkpoint exists."""
    p = start(out, jid, "cluster.max_failures=0")
    target = checkpoints(out, jid) / f"step-{step:08d}"
    reached = wait_until(lambda: (target / "manifest.json").is_file(), p)
    if reached:
        os.kill(int((work(out, jid) / "rank1.pid").read_text()), signal.SIGKILL)
    p.communicate(timeout=1800)
    return reached and p.returncode != 0


def tear_checkpoint(out: Path) -> tuple[str, str, str, bool]:
    jid = "tear"
    failed = _fail_after_checkpoint(out, jid, 4)
    (checkpoints(out, jid) / "step-00000004" / "manifest.json").unlink()  # as a writer dying before its last file
    r = cli(*submit_args(out, jid))
    ok = failed and r.returncode == 0 and "checkpoint of step 4 skipped" in r.stdout + r.stderr
    return ("job failed after step-4 checkpoint; its manifest removed; resubmitted",
            f"exit {r.returncode}: {last_line(r.stdout + r.stderr, 'skipped')}", state_of(out, jid), ok)


def planted_pickle(out: Path) -> tuple[str, str, str, bool]:
    import torch

    from lora_dist.errors import ArtifactError
    from lora_dist.store import verify_artifact

    jid = "pickle"
    failed = _fail_after_checkpoint(out, jid, 4)
    marker = out / "pickle-ran"
    # A pickle that would create `marker` if anything unpickled it.
    payload = type("Evil", (), {"__reduce__": lambda self: (Path.touch, (marker,))})()
    torch.save({"x": payload}, checkpoints(out, jid) / "step-00000004" / "mp_rank_00_model_states.pt")
    r = cli(*submit_args(out, jid))
    resumed = "checkpoint of step 4 skipped" in r.stdout + r.stderr
    torch.save({"x": payload}, artifact(out, jid) / "adapter_model.bin")
    try:
        verify_artifact(artifact(out, jid))
        refused = False
    except ArtifactError:
        refused = True
    (artifact(out, jid) / "adapter_model.bin").unlink()
    ok = failed and r.returncode == 0 and resumed and refused and not marker.exists()
    return ("pickle planted in the newest checkpoint, then in the artifact",
            f"exit {r.returncode}: checkpoint skipped: {resumed}; artifact verify refuses it: {refused}; "
            f"unpickled: {marker.exists()}", state_of(out, jid), ok)


def other_world_size(out: Path) -> tuple[str, str, str, bool]:
    jid = "elastic"
    failed = _fail_after_checkpoint(out, jid, 2)
    r = cli(*submit_args(out, jid, "cluster.workers=1"))
    ok = failed and r.returncode == 0 and "written by 2 workers, now 1" in r.stdout + r.stderr
    return ("2-worker job failed after step 2; resubmitted with cluster.workers=1",
            f"exit {r.returncode}: {last_line(r.stdout + r.stderr, 'resumed')}", state_of(out, jid), ok)


def stop_resubmit(out: Path) -> tuple[str, str, str, bool]:
    jid = "stop"
    p = start(out, jid)
    reached = wait_until(lambda: (checkpoints(out, jid) / "step-00000002" / "manifest.json").is_file(), p)
    s = cli("stop", f"{NAME}-{jid}")
    p.communicate(timeout=600)
    r = cli(*submit_args(out, jid))
    st = cli("status", f"{NAME}-{jid}")
    ok = reached and "STOPPED" in s.stdout and r.returncode == 0 and "SUCCEEDED" in st.stdout and \
        "resumes from its checkpoint" in r.stdout
    return ("stopped after the step-2 checkpoint, then resubmitted", f"stop: {s.stdout.strip()[:60]}; resubmit exit "
            f"{r.returncode}; status: {st.stdout.strip()[:90]}", state_of(out, jid), ok)


def duplicate_submit(out: Path) -> tuple[str, str, str, bool]:
    jid = "dup"
    p = start(out, jid)
    wait_until(lambda: work(out, jid).is_dir(), p, timeout=300)
    second = cli(*submit_args(out, jid), timeout=300)
    text, _ = p.communicate(timeout=1800)
    ok = second.returncode != 0 and p.returncode == 0
    return ("the same --job-id submitted again while it runs", f"second: exit {second.returncode}: "
            f"{last_line(second.stderr, 'error')}; first: exit {p.returncode}", state_of(out, jid), ok)


def run_name_collision(out: Path) -> tuple[str, str, str, bool]:
    """After `kill`: the same job id again (same spec, then a changed one)."""
    jid = "kill"
    a = artifact(out, jid)
    if not a.exists():
        return ("the same job id, same then changed spec", "skipped: needs the kill scenario's artifact", "", False)
    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    same = cli(*submit_args(out, jid), timeout=300)
    changed = cli(*submit_args(out, jid, "train.lr=1e-2"), timeout=300)
    after = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    ok = same.returncode == 0 and same.stdout.strip().endswith(str(a)) and changed.returncode == 2 and \
        "train.lr" in changed.stderr and before == after
    return ("resubmit of a finished job id: same spec, then train.lr changed",
            f"same: exit {same.returncode} (its artifact); changed: exit {changed.returncode}: "
            f"{last_line(changed.stderr, 'train.lr')[:110]}", state_of(out, jid) + f"; untouched: {before == after}", ok)


def hostile_spec(out: Path) -> tuple[str, str, str, bool]:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))
    f = out / "bomb.yaml"
    f.write_text(f"name: x\n{bomb}lora: {{targets: *i}}\n")
    r = cli("submit", str(f), timeout=300)
    ok = r.returncode == 2 and len(r.stderr) < 2000
    return (f"YAML alias bomb ({len(f.read_bytes())} bytes)", f"exit {r.returncode}, {len(r.stderr)} chars: "
            f"{last_line(r.stderr, 'alias', 'nodes')[:100]}", "nothing started", ok)


def runtime_env_injection(out: Path) -> tuple[str, str, str, bool]:
    r = cli(*submit_args(out, "inject", "cluster.runtime_env={env_vars: {LD_PRELOAD: /tmp/evil.so}}"), timeout=300)
    r2 = cli(*submit_args(out, "inject", "cluster.runtime_env={pip: ['git+https://evil/x']}"), timeout=300)
    ok = r.returncode == 2 and "LD_PRELOAD" in r.stderr and r2.returncode == 2 and "pip" in r2.stderr
    return ("runtime_env: LD_PRELOAD env var; a git+ pip entry", f"exit {r.returncode}, {r2.returncode}: "
            f"{last_line(r.stderr, 'LD_PRELOAD')[:110]}", "nothing started", ok)


def no_token(out: Path) -> tuple[str, str, str, bool]:
    """A real `ray start --head` (token auth on); the Jobs API without the token."""
    import urllib.error
    import urllib.request

    tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))
    ray = str(Path(sys.executable).parent / "ray")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    started = subprocess.run([ray, "start", "--head", "--num-cpus=1", "--port=6399", "--dashboard-port=8299",
                              "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={tmp / 'ray'}",
                              "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)
    try:
        if started.returncode != 0:
            return ("Jobs API request without the token", f"ray start failed: {started.stderr[-100:]}", "", False)
        code = None
        for _ in range(60):
            try:
                urllib.request.urlopen("http://127.0.0.1:8299/api/jobs/", timeout=2)
                code = 200
                break
            except urllib.error.HTTPError as e:
                code = e.code
                break
            except OSError:
                time.sleep(1)
        tokenless = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp / "none"), "HOME": str(tmp)}
        r = cli("list", "--address", "http://127.0.0.1:8299", env=tokenless, timeout=300)
        ok = code == 401 and r.returncode == 3
        return ("Jobs API request without the token", f"HTTP {code}; lora-dist list exit {r.returncode}: "
                f"{last_line(r.stderr, 'error')[:100]}", "nothing submitted", ok)
    finally:
        _stop_head(tmp)


def _stop_head(tmp: Path) -> None:
    """End only the processes of the head started under ``tmp`` (never `ray stop`)."""
    import psutil

    mine = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(tmp) in part for part in (p.info["cmdline"] or [])):
                mine.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for p in mine:
        for q in [p, *p.children(recursive=True)]:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
    shutil.rmtree(tmp, ignore_errors=True)


def tampered_artifact(out: Path) -> tuple[str, str, str, bool]:
    """After `kill`: its adapter replaced and the manifest's sha256 rewritten to match; then an
    extra file planted. `verify --digest` (the digest the job recorded) and `fetch` of the job
    must refuse both; the original is put back afterwards."""
    import hashlib

    from lora_dist.store import manifest_digest

    a = artifact(out, "kill")
    if not a.exists():
        return ("tampered / extra file", "skipped: needs the kill scenario's artifact", "", False)
    digest = manifest_digest(a)
    backup = out / "kill-backup"
    shutil.copytree(a, backup)
    try:
        adapter = a / "adapter_model.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
        m = json.loads((a / "manifest.json").read_text())
        m["files"][adapter.name] = hashlib.sha256(adapter.read_bytes()).hexdigest()
        (a / "manifest.json").write_text(json.dumps(m))
        v1 = cli("verify", str(a), "--digest", digest)
        f1 = cli("fetch", f"{NAME}-kill", "--out", str(out / "fetched1"))
        shutil.rmtree(a)
        shutil.copytree(backup, a)
        (a / "adapter_model.bin").write_bytes(b"planted")
        v2 = cli("verify", str(a))
        f2 = cli("fetch", f"{NAME}-kill", "--out", str(out / "fetched2"))
    finally:
        shutil.rmtree(a, ignore_errors=True)
        shutil.copytree(backup, a)
        shutil.rmtree(backup)
    nothing = not (out / "fetched1").exists() and not (out / "fetched2").exists()
    ok = v1.returncode != 0 and f1.returncode != 0 and v2.returncode != 0 and f2.returncode != 0 and nothing
    return ("adapter replaced + manifest sha rewritten; then an extra adapter_model.bin",
            f"verify --digest exit {v1.returncode}, fetch exit {f1.returncode}; extra file: verify exit "
            f"{v2.returncode}, fetch exit {f2.returncode}: {last_line(v2.stderr, 'not listed')[:80]}",
            f"nothing fetched: {nothing}; original restored, verifies: {cli('verify', str(a)).returncode == 0}", ok)


def same_seed_twice(out: Path) -> tuple[str, str, str, bool]:
    r1 = cli(*submit_args(out, "seed-a"))
    r2 = cli(*submit_args(out, "seed-b"))
    if r1.returncode or r2.returncode:
        return ("two runs, same spec and seed", f"exit {r1.returncode}, {r2.returncode}", "", False)
    a = (artifact(out, "seed-a") / "adapter_model.safetensors").read_bytes()
    b = (artifact(out, "seed-b") / "adapter_model.safetensors").read_bytes()
    return ("two 2-worker runs, same spec and seed", f"adapter_model.safetensors byte-identical: {a == b} "
            f"({len(a):,} bytes)", "two artifacts verify", a == b)


# --- load: many jobs at once (issue 31 item 12) -----------------------------------------------------

LOAD = ["cluster.workers=1", "cluster.zero_stage=auto", "train.max_steps=2", "train.micro_batch_size=2",
        "data.max_length=48", "train.eval_batches=1", "train.log_every=1", "train.checkpoint_every=1",
        f"data.path={DATA}"]


def _at_once(argvs: list[list[str]], env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """Each command line run by its own thread, all released by one barrier: the same moment."""
    results: list = [None] * len(argvs)
    barrier = threading.Barrier(len(argvs))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = cli(*argvs[i], env=env, timeout=3000)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _own_job(out: Path, jid: str, seed: int, submitted: subprocess.CompletedProcess,
             status: subprocess.CompletedProcess) -> str | None:
    """None when job ``jid`` SUCCEEDED with an artifact that verifies against the digest status
    reports, holds its own spec (its seed) and ran from step 1 (no other job's checkpoint); else what
    is wrong."""
    from lora_dist.errors import ArtifactError
    from lora_dist.store import manifest_digest, verify_artifact

    a = artifact(out, jid)
    if submitted.returncode != 0:
        return f"{jid}: submit exit {submitted.returncode}: {last_line(submitted.stderr, 'error')[:100]}"
    if "SUCCEEDED" not in status.stdout or f"artifact {a}" not in status.stdout:
        return f"{jid}: status says {status.stdout.strip()[:120]}"
    reported = status.stdout.split("manifest ")[-1].split()[0] if "manifest " in status.stdout else None
    try:
        m = verify_artifact(a, reported)  # against the digest the job recorded, apart from the artifact
    except ArtifactError as e:
        return f"{jid}: {str(e)[:100]}"
    if reported != manifest_digest(a):
        return f"{jid}: status reports digest {reported}"
    if (m.spec or {}).get("train", {}).get("seed") != seed or m.steps != 2 or m.resumed_from_step:
        return f"{jid}: artifact holds seed {(m.spec or {}).get('train', {}).get('seed')}, steps {m.steps}, " \
               f"resumed from {m.resumed_from_step}"
    return None


def _load_jobs(out: Path, prefix: str, n: int, address: list[str], env: dict | None) -> tuple[list[str], float]:
    """``n`` jobs (seeds 1..n) submitted at one moment; what is wrong with each, and the wall time."""
    jids = [f"{prefix}{i}" for i in range(n)]
    t0 = time.time()
    subs = _at_once([["submit", str(JOB), "--job-id", jid, f"--set=output.dir={out}", f"--set=train.seed={i + 1}",
                      *[f"--set={o}" for o in LOAD], *address, *(["--wait"] if address else [])]
                     for i, jid in enumerate(jids)], env)
    wall = time.time() - t0
    wrong = [_own_job(out, jid, i + 1, sub, cli("status", f"{NAME}-{jid}", *address, env=env))
             for i, (jid, sub) in enumerate(zip(jids, subs))]
    left = sorted(p.name for p in (out / ".checkpoints").iterdir()) if (out / ".checkpoints").is_dir() else []
    if left:
        wrong.append(f"checkpoints left behind: {left}")
    return [w for w in wrong if w], wall


def _start_load_head(tmp: Path, env: dict) -> str:
    """A 2-CPU `ray start --head` (token auth on) under ``tmp``, on ports of its own; its address."""
    import socket
    import urllib.error
    import urllib.request

    def port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    dash = port()
    ray = str(Path(sys.executable).parent / "ray")
    started = subprocess.run([ray, "start", "--head", "--num-cpus=2", f"--port={port()}", f"--temp-dir={tmp / 'ray'}",
                              "--disable-usage-stats", f"--ray-client-server-port={port()}",
                              f"--dashboard-agent-listen-port={port()}", f"--dashboard-agent-grpc-port={port()}",
                              f"--runtime-env-agent-port={port()}", f"--metrics-export-port={port()}",
                              f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"],
                             capture_output=True, text=True, env=env, timeout=300)
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed: {started.stderr[-200:]}")
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(1)
    return f"http://127.0.0.1:{dash}"


def many_at_once(out: Path) -> tuple[str, str, str, bool]:
    """6 jobs submitted at one moment to a 2-CPU head through the Jobs API (they queue), 3 at once on
    the embedded default, then 8 concurrent fetches of one artifact to 8 directories."""
    from lora_dist.store import verify_artifact

    tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # Ray's unix sockets need a short path
    api, emb = out / "load-api", out / "load-embedded"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["LORA_DIST_OUTPUT_ROOT"] = str(out)
    # the head runs each job's `python -m lora_dist.jobrun` from PATH: this interpreter's, even when
    # the bench was started as .venv/bin/python without the venv activated
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["LORA_DIST_DATA_ROOT"] = str(DATA.parent)  # the cluster reads local data only under its data root
    try:
        address = _start_load_head(tmp, env)
        wrong_api, wall_api = _load_jobs(api, "api", 6, ["--address", address], env)
        t0 = time.time()
        fetches = _at_once([["fetch", f"{NAME}-api0", "--address", address, "--out", str(out / f"fetched-{i}")]
                            for i in range(8)], env)
        wall_fetch = time.time() - t0
    finally:
        _stop_head(tmp)
    files = verify_artifact(artifact(api, "api0")).files
    bad_fetch = [f"fetch {i}: exit {r.returncode}: {last_line(r.stderr, 'error')[:100]}"
                 for i, r in enumerate(fetches) if r.returncode != 0]
    bad_fetch += [f"fetched-{i} differs" for i, r in enumerate(fetches)
                  if r.returncode == 0 and verify_artifact(out / f"fetched-{i}").files != files]
    wrong_emb, wall_emb = _load_jobs(emb, "emb", 3, [], None)
    wrong = wrong_api + bad_fetch + wrong_emb
    return ("6 jobs at once to a 2-CPU head (Jobs API), 3 at once embedded, 8 concurrent fetches of one artifact",
            f"Jobs API: {6 - len(wrong_api)}/6 own verified artifacts in {wall_api:.0f} s; fetches: "
            f"{8 - len(bad_fetch)}/8 in {wall_fetch:.0f} s; embedded: {3 - len(wrong_emb)}/3 in {wall_emb:.0f} s"
            + (f"; {'; '.join(wrong)[:400]}" if wrong else ""),
            "each job: SUCCEEDED, its artifact verifies against the digest status reports, holds its own seed, "
            "ran from step 1; no checkpoint left", not wrong)


SCENARIOS = {"kill": kill_worker, "node": remove_node, "tear": tear_checkpoint, "stop": stop_resubmit,
             "duplicate": duplicate_submit, "collision": run_name_collision, "hostile": hostile_spec,
             "inject": runtime_env_injection, "token": no_token, "tamper": tampered_artifact,
             "pickle": planted_pickle, "seed": same_seed_twice, "elastic": other_world_size, "load": many_at_once}


def _own_registry(cache: Path) -> None:
    """Run the embedded jobs with a registry of this run's own (the converted model and the
    tokenization cache linked in): a job id is bound to the output.dir of its first submission, and
    the scenarios' fixed job ids ("kill", "stop", ...) get a new output.dir each run."""
    from lora_dist.store import cache_root

    real = cache_root()
    cache.mkdir(parents=True)
    for name in ("models", "tokenized"):
        if (real / name).is_dir():
            (cache / name).symlink_to(real / name)
    os.environ["LORA_DIST_CACHE"] = str(cache)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="", help="comma-separated scenario names: " + ",".join(SCENARIOS))
    ap.add_argument("--keep", action="store_true", help="keep the output directory")
    args = ap.parse_args()
    chosen = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    out = Path(tempfile.mkdtemp(prefix="lora-dist-faults-")) / "runs"
    out.mkdir(parents=True)
    _own_registry(out.parent / "cache")
    rows = []
    for name in chosen:
        t0 = time.time()
        try:
            did, outcome, state, ok = SCENARIOS[name](out)
        except Exception as e:  # noqa: BLE001 - a scenario that breaks is a failed row
            did, outcome, state, ok = name, f"scenario raised {type(e).__name__}: {str(e)[:150]}", "", False
        rows.append((name, did, outcome, state, ok, time.time() - t0))
        print(f"[{name}] {'pass' if ok else 'FAIL'} in {time.time() - t0:.0f} s: {outcome}", file=sys.stderr, flush=True)
    print("| scenario | what was done | outcome | artifact and checkpoints | result |")
    print("|---|---|---|---|---|")
    for name, did, outcome, state, ok, secs in rows:
        print(f"| {name} | {did} | {outcome} | {state} | {'pass' if ok else 'FAIL'} ({secs:.0f} s) |")
    print(f"{sum(r[4] for r in rows)}/{len(rows)} passed")
    if not args.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
