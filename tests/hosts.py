"""Separate "hosts" on this one machine, for multi-node tests that need what one process tree
with one filesystem cannot give: a node that lacks a directory, a node that really disappears.

A :class:`Lab` owns two network namespaces (``ldA-<pid>``, ``ldB-<pid>``) joined by a veth pair,
10.213.7.1/24 and 10.213.7.2/24, with no route anywhere else: every packet stays in namespaces the
lab made. A :class:`Host` runs in one of them, in its own mount and UTS namespaces:

* its hostname (``ldA``, ``ldB``) resolves to its veth address through its own /etc/hosts, as on
  a real host (torch's gloo binds the address the hostname resolves to; this machine's hostname
  resolves to 127.0.0.1, which the other host cannot reach);
* its /tmp is a private directory of the lab (Ray's --temp-dir, sockets and the workers' scratch
  live there and no other host sees them), and its /dev/shm a private tmpfs (Ray's object store);
* the lab's shared storage is bind-mounted at :attr:`Lab.mount` when the host mounts it, and an
  empty private tmpfs sits there when it does not.

The repo, the venv and ~/.cache/lora-dist (the converted model) are the machine's own, visible to
every host. Everything runs inside a host through ``nsenter`` into its anchor process (a ``sleep``
that holds the namespaces). Running processes of a host are found by network namespace
(``ip netns pids``), so ending a host ends exactly what ran there. :meth:`Lab.close` kills every
process of both namespaces, deletes the namespaces, and removes the lab's directories; the hosts'
mounts live only in their own mount namespaces and go with their last process. A lab whose test
process died without closing it (names carry that pid) is swept by the next one.

Processes are not in a PID namespace of their own: ``ip netns pids`` and the workers' pid files
use the machine's pids.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
SUBNET = "10.213.7"
GCS_PORT = 6379  # each host has its own network namespace: no clash with any other Ray here
DASHBOARD_PORT = 8265
LAB_NETNS_RE = re.compile(r"^ld[AB]-(\d+)$")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


def netns_pids(netns: str) -> list[int]:
    """Every process whose network namespace is ``netns`` (empty when it no longer exists)."""
    proc = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=30)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def kill_netns(netns: str, timeout: float = 30) -> None:
    """SIGKILL every process of ``netns`` until none is left (Ray daemons fork while dying)."""
    deadline = time.time() + timeout
    while True:
        pids = netns_pids(netns)
        if not pids:
            return
        if time.time() > deadline:
            raise RuntimeError(f"processes {pids} of {netns} survived SIGKILL for {timeout:.0f} s")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class Host:
    """One host of a :class:`Lab`: a network namespace and, while started, an anchor process
    holding its mount and UTS namespaces."""

    def __init__(self, lab: "Lab", name: str, netns: str, ip: str) -> None:
        self.lab, self.name, self.netns, self.ip = lab, name, netns, ip
        self.anchor: subprocess.Popen | None = None
        self.scratch: Path | None = None  # this start's /tmp, as the test sees it
        self._starts = 0

    def start(self, mount_shared: bool) -> None:
        """Boot the host: new mount and UTS namespaces inside its network namespace, a fresh /tmp,
        its hostname, and the shared storage (or an empty private directory) at ``lab.mount``."""
        assert self.anchor is None, f"{self.name} is already running"
        self._starts += 1
        self.scratch = self.lab.base / f"{self.name}-{self._starts}"
        self.scratch.mkdir(mode=0o1777)
        at = self.lab.mount
        storage = f"mount --bind {self.lab.shared} {at}" if mount_shared else f"mount -t tmpfs -o size=8m ld-none {at}"
        # Order matters: the sources under the machine's /tmp are bound before /tmp is replaced.
        script = "; ".join([
            "set -e",
            f"mount --bind {self.lab.hosts_file} /etc/hosts",
            storage,
            f"mount --bind {self.scratch} /tmp",
            "mount -t tmpfs -o size=1g ld-shm /dev/shm",
            f"hostname {self.name}",
            "echo ready",
            "exec sleep infinity",
        ])
        self.anchor = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--propagation", "private",
             "sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.anchor.stdout.readline().strip()
        if line != "ready":
            self.anchor.kill()
            err = self.anchor.communicate(timeout=30)[1]
            self.anchor = None
            raise RuntimeError(f"host {self.name} did not start: {line} {err}")
        # ip netns exec, unshare and sh exec in place: the Popen's pid is the anchor in the namespaces
        if os.readlink(f"/proc/{self.anchor.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            raise RuntimeError(f"host {self.name}: the anchor {self.anchor.pid} is not in {self.netns}")

    def cmd(self, *args: str) -> list[str]:
        """``args`` as a command line that runs inside this host, in the repo directory."""
        assert self.anchor is not None, f"{self.name} is not running"
        return ["nsenter", f"--target={self.anchor.pid}", "--net", "--mount", "--uts", f"--wd={REPO}", "--",
                *args]

    def run(self, *args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(*args), capture_output=True, text=True, env=env, timeout=timeout)

    def pids(self) -> list[int]:
        return netns_pids(self.netns)

    def stop(self) -> None:
        """End the host for real: SIGKILL every process in its network namespace (its Ray node,
        its workers, its anchor). Its mount and UTS namespaces go with them."""
        kill_netns(self.netns)
        if self.anchor is not None:
            self.anchor.wait(timeout=30)  # reap it: the Popen is this test's child
        self.anchor = None

    def to_outside(self, path: str | Path) -> Path:
        """Where a path this host sees under ``lab.mount`` lies for the test (the shared storage)."""
        rel = Path(path).relative_to(self.lab.mount)
        return self.lab.shared / rel


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def sweep_stale_labs() -> list[str]:
    """Remove what labs of dead test processes left (a killed pytest never ran its teardown):
    their namespaces' processes and the namespaces, their mount points and directories."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    swept = []
    for netns in {line.split()[0] for line in listed.splitlines() if line.strip()}:
        m = LAB_NETNS_RE.match(netns)
        if m and not _alive(int(m.group(1))):
            kill_netns(netns)
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
            swept.append(netns)
    for path in [*Path("/mnt").glob("ld-shared-*"), *Path("/tmp").glob("ldh*-*")]:
        m = re.match(r"^(?:ld-shared-|ldh)(\d+)", path.name)
        if m and not _alive(int(m.group(1))):
            if path.parent == Path("/mnt"):
                try:
                    path.rmdir()  # an empty mount point: the hosts' mounts went with them
                except OSError:
                    continue
            else:
                shutil.rmtree(path, ignore_errors=True)
            swept.append(str(path))
    return swept


class Lab:
    """Two hosts on an isolated veth link, shared storage, and their cleanup (see the module)."""

    def __init__(self) -> None:
        sweep_stale_labs()
        tag = str(os.getpid())
        self.base = Path(tempfile.mkdtemp(prefix=f"ldh{tag}-", dir="/tmp"))
        self.shared = self.base / "shared"  # the shared storage's contents, as the test sees them
        self.shared.mkdir()
        self.mount = Path(f"/mnt/ld-shared-{tag}")  # where hosts mount it (an empty dir outside them)
        self.hosts_file = self.base / "hosts"
        self.a = Host(self, "ldA", f"ldA-{tag}", f"{SUBNET}.1")
        self.b = Host(self, "ldB", f"ldB-{tag}", f"{SUBNET}.2")
        self.hosts_file.write_text(f"127.0.0.1 localhost\n{self.a.ip} {self.a.name}\n{self.b.ip} {self.b.name}\n")
        self._made_mount = False
        self._netns: list[str] = []
        try:
            self.mount.mkdir(parents=True)
            self._made_mount = True
            for h in (self.a, self.b):
                _ip("netns", "add", h.netns)
                self._netns.append(h.netns)
            _ip("link", "add", "ldA0", "netns", self.a.netns, "type", "veth", "peer", "name", "ldB0",
                "netns", self.b.netns)
            for h, dev in ((self.a, "ldA0"), (self.b, "ldB0")):
                _ip("-n", h.netns, "addr", "add", f"{h.ip}/24", "dev", dev)
                _ip("-n", h.netns, "link", "set", dev, "up")
                _ip("-n", h.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def close(self) -> list[str]:
        """Kill every process of both namespaces, delete them, remove the lab's directories.

        Returns:
            What is left over (namespaces still listed, directories still there): empty when clean.
        """
        left = []
        for h in (self.a, self.b):
            try:
                h.stop()
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                left.append(f"{h.name}: {e}")
        for netns in self._netns:
            subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        self._keep_logs()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
        left += [n for n in self._netns if n in listed.split()]
        # the hosts' mounts were in their own namespaces; `ip netns add` mounted /run/netns/<name>
        left += [f"mount: {line.strip()}" for line in Path("/proc/self/mountinfo").read_text().splitlines()
                 if str(self.base) in line or any(f"/run/netns/{n} " in line for n in self._netns)]
        if self._made_mount:
            try:
                self.mount.rmdir()
            except OSError as e:
                left.append(f"{self.mount}: {e}")
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():
            left.append(str(self.base))
        return left

    def _keep_logs(self) -> None:
        """Copy every host's Ray logs to $LORA_DIST_LAB_LOGS, when set (the lab's own go)."""
        keep = os.environ.get("LORA_DIST_LAB_LOGS")
        if not keep:
            return
        for logs in self.base.glob("ld*-*/ray/session_*/logs"):
            if not logs.parent.is_symlink():
                shutil.copytree(logs, Path(keep) / logs.parents[2].name / logs.parent.name, dirs_exist_ok=True)

    # --- Ray on the hosts --------------------------------------------------------------------

    def ray_env(self, **extra: str) -> dict[str, str]:
        """The environment of Ray and lora-dist processes on the hosts: token auth on (the
        machine's ~/.ray/auth_token, which every host sees), no stray RAY_ADDRESS."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        env.update({"RAY_AUTH_MODE": "token", **extra})
        return env

    @property
    def gcs(self) -> str:
        return f"{self.a.ip}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        return f"http://{self.a.ip}:{DASHBOARD_PORT}"

    def start_head(self, cpus: int) -> None:
        """Host A: a Ray head with the Jobs API, whose output root is the shared mount. A dead
        node is noticed within ~5 s (1 s health checks, 5 misses) instead of Ray's default ~15 s."""
        env = self.ray_env(LORA_DIST_OUTPUT_ROOT=str(self.mount), LORA_DIST_DATA_ROOT=str(REPO / "jobs" / "data"),
                           RAY_health_check_period_ms="1000",
                           RAY_health_check_failure_threshold="5")
        proc = self.a.run(RAY, "start", "--head", f"--node-ip-address={self.a.ip}", f"--port={GCS_PORT}",
                          f"--num-cpus={cpus}", "--include-dashboard=true", f"--dashboard-host={self.a.ip}",
                          f"--dashboard-port={DASHBOARD_PORT}", "--temp-dir=/tmp/ray", "--disable-usage-stats",
                          "--object-store-memory=200000000", env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --head on {self.a.name} failed:\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-3000:]}")
        self._wait_for_jobs_api()

    def _wait_for_jobs_api(self, timeout: float = 60) -> None:
        """`ray start --head` returns before the dashboard serves: wait until it answers (401
        without a token is an answer)."""
        code = ("import sys, urllib.request, urllib.error\n"
                "try:\n    urllib.request.urlopen(%r, timeout=2)\n"
                "except urllib.error.HTTPError:\n    pass\n"
                "except OSError:\n    sys.exit(1)\n" % f"{self.dashboard}/api/version")
        deadline = time.time() + timeout
        while self.a.run(sys.executable, "-c", code, env=self.ray_env(), timeout=30).returncode != 0:
            if time.time() > deadline:
                raise RuntimeError(f"the Jobs API at {self.dashboard} did not answer within {timeout:.0f} s")
            time.sleep(0.5)

    def join(self, host: Host, cpus: int) -> None:
        """``host`` joins the head as a worker node (see :meth:`wait_for_nodes` for when it counts)."""
        proc = host.run(RAY, "start", f"--address={self.gcs}", f"--node-ip-address={host.ip}", f"--num-cpus={cpus}",
                        "--temp-dir=/tmp/ray", "--disable-usage-stats", "--object-store-memory=200000000",
                        env=self.ray_env(LORA_DIST_OUTPUT_ROOT=str(self.mount),
                                         LORA_DIST_DATA_ROOT=str(REPO / "jobs" / "data")))
        if proc.returncode != 0:
            raise RuntimeError(f"ray start on {host.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")

    def alive_nodes(self) -> dict[str, str]:
        """{node ip: node id} of the cluster's alive nodes, asked from host A."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print('NODES', json.dumps({n['NodeManagerAddress']: n['NodeID'] for n in ray.nodes() if n['Alive']}))"
                % self.gcs)
        proc = self.a.run(sys.executable, "-c", code, env=self.ray_env(), timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"listing the cluster's nodes failed:\n{proc.stderr[-3000:]}")
        # Ray may print warnings to stdout too ("raylet has lagging heartbeats")
        line = next(x for x in proc.stdout.splitlines() if x.startswith("NODES "))
        return json.loads(line.removeprefix("NODES "))

    def wait_for_nodes(self, ips: set[str], timeout: float = 120) -> dict[str, str]:
        """Wait until exactly the nodes at ``ips`` are alive (a killed node is gone, a new one has
        registered); return {ip: node id}."""
        deadline = time.time() + timeout
        while True:
            nodes = self.alive_nodes()
            if set(nodes) == ips:
                return nodes
            if time.time() > deadline:
                raise RuntimeError(f"alive nodes {nodes}, expected {sorted(ips)}")
            time.sleep(1)
