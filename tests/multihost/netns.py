"""Hosts as Linux network namespaces on one bridge: the multi-host harness's network.

    net = Network({"store": 5, "kv1": 21})      # name -> last octet of 10.213.0.X
    net.create()
    proc = net["kv1"].popen([...], "kv1.log")   # runs inside the host's namespace
    net["kv1"].die()                            # every process of that host SIGKILLed
    net.teardown()

Each host is a namespace `hwmh-<name>` with one interface `eth0` (a veth whose other end is on
the bridge `hwmh-br`) and its own address; the root namespace is on the bridge too, at
10.213.0.1, and plays the client host. Nothing listens on, or connects to, loopback across
hosts: each namespace has its own `lo`. Names, bridge and subnet are private to this harness,
so `cleanup_stale()` can remove what a killed run left behind by prefix alone; two runs at
once would share those names (the second's cleanup kills the first's hosts, the first starts
Ray inside the second's head), so a run holds `exclusive()` for its whole session.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

PREFIX = "hwmh-"
BRIDGE = "hwmh-br"
SUBNET = "10.213.0"
CLIENT_ADDR = f"{SUBNET}.1"  # the root namespace's address on the bridge: the client host
LOCK_PATH = "/run/headwise-multihost.lock"


@contextmanager
def exclusive(timeout_s: float, path: str = LOCK_PATH) -> Iterator[float]:
    """Hold the machine-wide lock of this harness (waits for a run already going): the seconds waited.
    The kernel drops the lock when its holder dies, so a killed run never leaves it taken."""
    f = open(path, "a+")
    t0 = time.monotonic()
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - t0 > timeout_s:
                    raise TimeoutError(f"another multi-host run holds {path} (pid {_holder(path)}) "
                                       f"after {timeout_s:.0f} s") from None
                time.sleep(1)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield time.monotonic() - t0
    finally:
        f.close()  # releases the lock


def _holder(path: str) -> str:
    try:
        return Path(path).read_text().strip() or "?"
    except OSError:
        return "?"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (None = they can): probed by making and removing one."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return f"network namespaces need root; running as uid {os.geteuid()}"
    probe = f"{PREFIX}probe"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = _ip("link", "add", f"{PREFIX}pr0", "type", "veth", "peer", "name", f"{PREFIX}pr1", check=False)
        if r.returncode != 0:
            return f"`ip link add type veth` failed: {r.stderr.strip()}"
        _ip("link", "del", f"{PREFIX}pr0", check=False)
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def namespace_pids(ns: str) -> list[int]:
    r = _ip("netns", "pids", ns, check=False)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def kill_namespace(ns: str, sig: int = signal.SIGKILL) -> int:
    """Signal every process in namespace `ns` (only processes in it: none of anyone else's)."""
    pids = namespace_pids(ns)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return len(pids)


def cleanup_stale() -> list[str]:
    """Remove namespaces, links and the bridge that an earlier run of this harness left behind."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            _reap(ns)
            removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if name.startswith(PREFIX):
            _ip("link", "del", name, check=False)
            removed.append(name)
    return removed


def _reap(ns: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while kill_namespace(ns) and time.monotonic() < deadline:
        time.sleep(0.1)
    _ip("netns", "del", ns, check=False)


@dataclass
class Host:
    name: str
    addr: str
    logdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return f"{PREFIX}{self.name}"

    def popen(self, args: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """Start `args` inside this host's namespace, output to logdir/log."""
        out = open(self.logdir / log, "ab")
        p = subprocess.Popen(["ip", "netns", "exec", self.ns, *args], stdout=out, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
        out.close()
        self.procs.append(p)
        return p

    def run(self, args: list[str], timeout_s: float, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *args], capture_output=True, text=True, env=env,
                              timeout=timeout_s)

    def die(self) -> int:
        """The host's processes all die at once (SIGKILL): their sockets close, the kernel stays."""
        n = kill_namespace(self.ns)
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        return n

    def cpu_seconds(self, cmdline_part: str) -> float:
        """CPU time (user + system) of this host's processes whose command line contains the text."""
        total = 0.0
        for pid in namespace_pids(self.ns):
            try:
                if cmdline_part not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    continue
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def cut(self) -> None:
        """The host drops off the network: no FIN, no RST, packets to it vanish."""
        _ip("-n", self.ns, "link", "set", "eth0", "down")

    def uncut(self) -> None:
        _ip("-n", self.ns, "link", "set", "eth0", "up")


class Network:
    def __init__(self, hosts: dict[str, int], logdir: Path):
        self.logdir = logdir
        self.hosts = {n: Host(n, f"{SUBNET}.{octet}", logdir) for n, octet in hosts.items()}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def create(self) -> "Network":
        self.logdir.mkdir(parents=True, exist_ok=True)
        _ip("link", "add", BRIDGE, "type", "bridge")
        _ip("addr", "add", f"{CLIENT_ADDR}/24", "dev", BRIDGE)
        _ip("link", "set", BRIDGE, "up")
        for h in self.hosts.values():
            outer, inner = f"{PREFIX}{h.name}"[:15], f"{PREFIX}{h.name}p"[:15]
            _ip("netns", "add", h.ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", h.ns)
            _ip("-n", h.ns, "link", "set", inner, "name", "eth0")
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            _ip("link", "set", outer, "master", BRIDGE)
            _ip("link", "set", outer, "up")
        return self

    def teardown(self) -> None:
        for h in self.hosts.values():
            _reap(h.ns)
            for p in h.procs:
                if p.poll() is None:
                    p.kill()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        cleanup_stale()
