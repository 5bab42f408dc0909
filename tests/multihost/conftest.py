"""The multi-host harness: hosts as network namespaces, each service on its own host's address.

Topology (10.213.0.0/24 on the bridge hwmh-br; the root namespace is the client host):

    client 10.213.0.1   (root namespace: pytest, gRPC clients)
    store  10.213.0.5   redis-server :6379
    kv1    10.213.0.21  kvstore :50051, metrics :9100
    kv2    10.213.0.22  kvstore :50051, metrics :9100
    head   10.213.0.10  Ray head: GCS :6379, Serve controller, gRPC proxy :9000, HTTP proxy :8000
    w1     10.213.0.11  Ray worker, resource hw_w1: Prefill and Decode replicas
    w2     10.213.0.12  Ray worker, resource hw_w2: Prefill and Decode replicas

Everything is torn down at session end, after a failed test too (the session fixture's
finalizer), and whatever a killed earlier run left is removed first, by the hwmh- prefix.
When namespaces cannot be made the tests skip with the reason; HEADWISE_MULTIHOST_REQUIRED=1
(the make target, CI) turns that skip into a failure.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from services.kvstore.redis_proc import redis_server_binary
from tests.multihost import netns

TOKEN = "multihost-service-token"
KV_PORT, KV_METRICS_PORT, REDIS_PORT = 50051, 9100, 6379
HOSTS = {"store": 5, "kv1": 21, "kv2": 22, "head": 10, "w1": 11, "w2": 12}


def wait_listening(addr: str, port: int, timeout_s: float, proc=None) -> float:
    """Seconds until a TCP connect to addr:port succeeds; TimeoutError past timeout_s."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process for {addr}:{port} exited with {proc.returncode}")
        try:
            with socket.create_connection((addr, port), timeout=0.5):
                return time.monotonic() - t0
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {addr}:{port} after {timeout_s:.0f} s")


def host_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]), RAY_USAGE_STATS_ENABLED="0",
               HEADWISE_SERVICE_TOKEN=TOKEN)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def net():
    reason = netns.unavailable_reason()
    if reason:
        if os.environ.get("HEADWISE_MULTIHOST_REQUIRED"):
            pytest.fail(f"multi-host harness required but unavailable: {reason}")
        pytest.skip(f"multi-host harness unavailable: {reason}")
    netns.cleanup_stale()
    logdir = Path(tempfile.mkdtemp(prefix="headwise-multihost-"))
    network = netns.Network(HOSTS, logdir)
    try:
        network.create()
        yield network
    finally:
        network.teardown()
        print(f"\nmulti-host logs: {logdir}", file=sys.stderr)


def start_redis(host: netns.Host) -> object:
    p = host.popen([redis_server_binary(), "--bind", host.addr, "--port", str(REDIS_PORT), "--save", "",
                    "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"], "redis.log")
    wait_listening(host.addr, REDIS_PORT, 15, p)
    return p


def start_kvstore(host: netns.Host, redis_url: str) -> object:
    p = host.popen([sys.executable, "-m", "services.kvstore", "--host", host.addr, "--port", str(KV_PORT),
                    "--redis-url", redis_url, "--metrics-port", str(KV_METRICS_PORT)],
                   f"kvstore-{host.name}.log", env=host_env(HEADWISE_TENANT_TTL_S="0"))
    wait_listening(host.addr, KV_PORT, 60, p)
    return p


@pytest.fixture(scope="session")
def store(net) -> str:
    """Redis on the store host: its URL."""
    start_redis(net["store"])
    return f"redis://{net['store'].addr}:{REDIS_PORT}/0"


@pytest.fixture(scope="session")
def kvstores(net, store) -> str:
    """A kvstore on kv1 and one on kv2, both over the store host's Redis: the comma list of both."""
    for name in ("kv1", "kv2"):
        start_kvstore(net[name], store)
    return ",".join(f"{net[n].addr}:{KV_PORT}" for n in ("kv1", "kv2"))
