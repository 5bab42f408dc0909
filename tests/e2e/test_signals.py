"""`headwise up` stops on SIGTERM (kill, systemd, Kubernetes) as on Ctrl-C: it stops Ray, the kvstore
and Redis it started, exits 0, and no fault handler prints a stack ("SIGTERM received ... ")."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live process under `pid` (read from /proc)."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ValueError, OSError):
            continue
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                out[c], todo = cmd[c], todo + [c]
    return out


def alive(pids) -> list[int]:
    """Those of `pids` still running (not gone, not a zombie)."""
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_headwise_up_stops_everything_on_sigterm(default_model_path, tmp_path):
    ports = {"HEADWISE_GRPC_PORT": free_port(), "HEADWISE_HTTP_PORT": free_port(), "HEADWISE_KVSTORE_PORT": free_port()}
    env = dict(os.environ, PYTHONPATH=str(ROOT), HEADWISE_DEFAULT_POLICY="streaming",
               **{k: str(v) for k, v in ports.items()})
    log = tmp_path / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while "ready" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(1)
        children = descendants(proc.pid)
        names = " ".join(children.values())
        assert "redis-server" in names and "services.kvstore" in names and "raylet" in names
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert rc == 0, text
    assert "SIGTERM received" not in text and "Traceback" not in text and "stopped" in text
    deadline = time.monotonic() + 30
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {p: children[p][:80] for p in alive(children)} == {}, "processes of `headwise up` outlived it"
    for port in ports.values():
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
