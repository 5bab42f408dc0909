"""The kvstore process stops on SIGTERM (Kubernetes, systemd, kill) as on Ctrl-C: it closes its port,
logs that it stopped, exits 0, and prints no stack."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"kvstore did not listen on {port}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_kvstore_stops_cleanly_on_a_signal(sig, redis_url):
    port, metrics = free_port(), free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), HEADWISE_SERVICE_TOKEN="t")
    proc = subprocess.Popen([sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", str(port),
                             "--redis-url", redis_url, "--metrics-port", str(metrics)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        wait_listening(port, proc)
        wait_listening(metrics, proc)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=90)  # a loaded 2-core machine: a generous bound, never the measure
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out
    assert f"kvstore stopping ({sig.name})" in out and "kvstore stopped" in out
    assert "Traceback" not in out and "received" not in out.lower()
    for p in (port, metrics):  # nothing it opened is left listening
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", p)) != 0
