"""The multi-host harness: hosts as network namespaces, each service on its own host's address.

Topology (10.213.0.0/24 on the bridge hwmh-br; the root namespace is the client host):

    client 10.213.0.1   (root namespace: pytest, gRPC clients)
    store  10.213.0.5   a Redis Cluster of three masters :7000-7002 (bus :17000-17002)
    kv1    10.213.0.21  kvstore :50051, metrics :9100, over the Redis Cluster
    kv2    10.213.0.22  kvstore :50051, metrics :9100, over the Redis Cluster
    head   10.213.0.10  Ray head: GCS :6379, Serve controller, gRPC proxy :9000, HTTP proxy :8000
    w1     10.213.0.11  Ray worker, resource hw_w1: Prefill and Decode replicas
    w2     10.213.0.12  Ray worker, resource hw_w2: Prefill and Decode replicas

Everything is torn down at session end, after a failed test too (the session fixture's
finalizer), and whatever a killed earlier run left is removed first, by the hwmh- prefix.
When namespaces cannot be made the tests skip with the reason; HEADWISE_MULTIHOST_REQUIRED=1
(the make target, CI) turns that skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures.redis_cluster import RedisClusterProcs
from tests.multihost import netns

TOKEN = "multihost-service-token"
KV_PORT, KV_METRICS_PORT = 50051, 9100
REDIS_PORTS = [7000, 7001, 7002]
HOSTS = {"store": 5, "kv1": 21, "kv2": 22, "head": 10, "w1": 11, "w2": 12}
LOCK_WAIT_S = 200


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
    # one run at a time on a machine: a second run waits (inside the first test's timeout), then fails saying so
    with netns.exclusive(timeout_s=LOCK_WAIT_S) as waited:
        if waited > 1:
            print(f"\nwaited {waited:.0f} s for another multi-host run to finish", file=sys.stderr)
        netns.cleanup_stale()
        logdir = Path(tempfile.mkdtemp(prefix="headwise-multihost-"))
        network = netns.Network(HOSTS, logdir)
        try:
            network.create()
            yield network
        finally:
            network.teardown()
            for d in Path("/tmp").glob("hwmh-ray-*"):  # the Ray nodes' session dirs (sockets, logs)
                shutil.rmtree(d, ignore_errors=True)
            print(f"\nmulti-host logs: {logdir}", file=sys.stderr)


def start_kvstore(host: netns.Host, redis_url: str) -> object:
    p = launch_kvstore(host, redis_url)
    wait_listening(host.addr, KV_PORT, 60, p)
    return p


def launch_kvstore(host: netns.Host, redis_url: str) -> object:
    return host.popen([sys.executable, "-m", "services.kvstore", "--host", host.addr, "--port", str(KV_PORT),
                       "--redis-url", redis_url, "--metrics-port", str(KV_METRICS_PORT)],
                      f"kvstore-{host.name}.log", env=host_env(HEADWISE_TENANT_TTL_S="0"))


@pytest.fixture(scope="session")
def redis_cluster(net) -> RedisClusterProcs:
    """The store host's Redis Cluster (three masters, no replicas, no persistence)."""
    store = net["store"]
    c = RedisClusterProcs(host=store.addr, ports=list(REDIS_PORTS), popen=lambda args: store.popen(args, "redis.log"))
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def store(redis_cluster) -> str:
    """The store's URL: rediscluster://10.213.0.5:7000,..."""
    return redis_cluster.url


@pytest.fixture(scope="session")
def kvstores(net, store) -> str:
    """A kvstore on kv1 and one on kv2, both over the store host's Redis Cluster: the comma list of both."""
    procs = [(net[n], launch_kvstore(net[n], store)) for n in ("kv1", "kv2")]  # both start at once
    for host, p in procs:
        wait_listening(host.addr, KV_PORT, 60, p)
    return ",".join(f"{net[n].addr}:{KV_PORT}" for n in ("kv1", "kv2"))


# ---- the Ray cluster: head + two worker hosts -------------------------------------------------
RAY_PORT, GRPC_PORT, HTTP_PORT = 6379, 9000, 8000
TENANT, TENANT_KEY = "acme", "acme-key"
# nine more tenants, spread by their hash tags over the three masters (a dead master: 4 of them)
SHARD_TENANTS = {f"t{i}": f"key-{i}" for i in range(9)}
WORKERS = ("w1", "w2")
RAY = str(Path(sys.executable).parent / "ray")
# Ray started with --head on a real address turns token authentication on; every node and driver
# of this cluster presents this session's token (never the user's ~/.ray one)
RAY_TOKEN = secrets.token_hex(32)


def ray_env(**extra: str) -> dict[str, str]:
    # Serve's handles and replicas report ongoing requests to the controller every 0.5 s (10 s by
    # default), so the autoscaling test's short look-back window sees the load it makes
    return host_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_TOKEN, RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5",
                    RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S="0.5", **extra)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Llama with the default model's tokenizer: answers need not be trained here,
    only equal across clusters, and it loads in a second on each replica."""
    from headwise.models import install_default_model
    from tests.fixtures.models import tiny_llama

    src = Path(install_default_model().path)
    out = tmp_path_factory.mktemp("tiny-model")
    tiny_llama(vocab=49152, ctx=2048, seed=7).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return str(out)


def app_settings(tiny_model_dir: str, kvstore_addr: str):
    from services.settings import Settings

    return Settings(model_path=tiny_model_dir, kvstore_addr=kvstore_addr, service_token=TOKEN,
                    tenants=",".join(f"{t}:{k}:16" for t, k in {TENANT: TENANT_KEY, **SHARD_TENANTS}.items()), default_policy="streaming", default_kept=0.5,
                    max_prompt_tokens=1500, max_new_tokens=1500, store_timeout_s=2.0, recall=False, torch_threads=1)


def serve_config_for(settings, layout: dict[str, dict]) -> dict:
    """The product's serve config with each deployment placed by `layout`:
    {"Prefill": {"replicas": 1, "resources": {"hw_w1": 0.01}, "per_node": 1}, ...}."""
    from cluster.local import LocalCluster
    from cluster.serve_config import serve_config

    config = serve_config(settings)
    app = config["applications"][0]
    app["args"] = LocalCluster.app_args(SimpleNamespace(settings=settings))  # the fields every replica takes
    for d in app["deployments"]:
        place = layout[d["name"]]
        lo, hi = place.get("min", place["replicas"]), place.get("max", place["replicas"])
        d["autoscaling_config"].update(min_replicas=lo, max_replicas=hi, initial_replicas=place["replicas"],
                                       **place.get("autoscaling", {}))
        d["ray_actor_options"] = dict(d["ray_actor_options"], num_cpus=0.5, resources=place["resources"])
        if place.get("per_node"):
            d["max_replicas_per_node"] = place["per_node"]
    return config


class RayCluster:
    """The Ray head and workers, each in its own host; Serve deployed by a driver on the head."""

    def __init__(self, net: netns.Network, tmp: Path):
        self.net, self.tmp = net, tmp
        self.workers: dict[str, object] = {}  # name -> its `ray start --block` process

    @property
    def head(self) -> netns.Host:
        return self.net["head"]

    @property
    def grpc_addr(self) -> str:
        return f"{self.head.addr}:{GRPC_PORT}"

    def start_head(self) -> None:
        h = self.head
        h.popen([RAY, "start", "--head", "--block", f"--node-ip-address={h.addr}", f"--port={RAY_PORT}",
                 "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                 f"--temp-dir=/tmp/hwmh-ray-{h.name}", "--object-store-memory=100000000"], "ray-head.log",
                env=ray_env())
        wait_listening(h.addr, RAY_PORT, 90)

    def start_worker(self, name: str) -> None:
        h = self.net[name]
        self.workers[name] = h.popen([RAY, "start", "--block", f"--address={self.head.addr}:{RAY_PORT}", f"--node-ip-address={h.addr}",
                 "--num-cpus=2", f"--resources={json.dumps({f'hw_{name}': 1, 'hw_worker': 1})}",
                 "--disable-usage-stats", f"--temp-dir=/tmp/hwmh-ray-{name}", "--object-store-memory=100000000"],
                f"ray-{name}.log", env=ray_env())

    def wait_nodes(self, n: int, timeout_s: float = 180) -> float:
        """Seconds until n nodes are alive; a worker's `ray start` that exits fails at once, with its log.
        (Joining takes seconds; the one run that timed out shared its hosts with a concurrent run,
        which the session lock now prevents.)"""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            for name, p in self.workers.items():
                if p.poll() is not None:
                    log = (self.net.logdir / f"ray-{name}.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"`ray start` on {name} exited with {p.returncode}:\n{log}")
            r = self.head.run([sys.executable, "-c", f"import ray; ray.init(address='{self.head.addr}:{RAY_PORT}', log_to_driver=False); "
                               "print('alive', sum(1 for n in ray.nodes() if n['Alive']))"], 60, env=ray_env())
            if r.returncode == 0 and f"alive {n}" in r.stdout.splitlines():
                return time.monotonic() - t0
            time.sleep(1)
        raise TimeoutError(f"the Ray cluster did not reach {n} live nodes in {timeout_s:.0f} s")

    def driver(self, *args: str, timeout_s: float = 300) -> dict:
        r = self.head.run([sys.executable, "-m", "tests.multihost.serve_driver", *args], timeout_s,
                          env=ray_env(HWMH_RAY_ADDRESS=f"{self.head.addr}:{RAY_PORT}"))
        if r.returncode != 0:
            raise RuntimeError(f"serve_driver {args[0]} failed ({r.returncode}): {r.stderr[-3000:]}")
        # its answer is the last JSON line: Ray may print warnings after it (a dead node's lagging heartbeats)
        return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))

    def deploy(self, config: dict) -> None:
        path = self.tmp / f"serve-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(config))
        self.driver("deploy", str(path))
        wait_listening(self.head.addr, GRPC_PORT, 60)

    def replicas(self) -> dict[str, list[str]]:
        return self.driver("replicas", timeout_s=60)

    def watch(self, seconds: float) -> "ReplicaWatch":
        return ReplicaWatch(self, seconds)


class ReplicaWatch:
    """`serve_driver watch` on the head, read in the background: the timeline of the replicas."""

    def __init__(self, cluster: RayCluster, seconds: float):
        h = cluster.head
        err = open(h.logdir / "watch.log", "ab")
        self.proc = subprocess.Popen(["ip", "netns", "exec", h.ns, sys.executable, "-m", "tests.multihost.serve_driver",
                                      "watch", str(seconds)], stdout=subprocess.PIPE, stderr=err, text=True,
                                     env=ray_env(HWMH_RAY_ADDRESS=f"{h.addr}:{RAY_PORT}"), start_new_session=True)
        err.close()
        h.procs.append(self.proc)  # the session teardown ends it if a test does not
        self.lines: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def running(self, deployment: str, line: dict | None = None) -> int | None:
        """RUNNING replicas of `deployment` in `line` (default: the latest); None before the first look."""
        line = line or (self.lines[-1] if self.lines else None)
        if line is None or "states" not in line:
            return None
        return line["states"].get(deployment, {}).get("RUNNING", 0)

    async def until(self, pred, timeout_s: float, what: str) -> dict:
        """The first line (from now on) for which pred(line) holds; AssertionError past timeout_s."""
        import asyncio

        seen, t0 = len(self.lines), time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            for line in self.lines[seen:]:
                if "states" in line and pred(line):
                    return line
            seen = len(self.lines)
            if self.proc.poll() is not None and seen == len(self.lines):
                raise AssertionError(f"the replica watch ended ({self.proc.returncode}) before {what}")
            await asyncio.sleep(0.2)
        raise AssertionError(f"not {what} within {timeout_s:.0f} s; last: {self.lines[-3:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="session")
def ray_cluster(net, kvstores, tmp_path_factory) -> RayCluster:
    c = RayCluster(net, tmp_path_factory.mktemp("ray"))
    c.start_head()
    for w in WORKERS:
        c.start_worker(w)
    joined = c.wait_nodes(1 + len(WORKERS))
    print(f"\nRay worker hosts joined {joined:.0f} s after their `ray start`", file=sys.stderr)
    return c
