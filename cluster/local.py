"""The local cluster on one machine: embedded Redis, the kvstore server, Ray Serve (DESIGN.md 7).

    with LocalCluster() as c:          # or: headwise up
        print(c.endpoints)

Everything it starts it stops, in reverse order, on exit or Ctrl-C. The Serve application is
deployed from `serve_config(settings)` (the same dict the KubeRay RayService uses), with the
local endpoints passed as the application's args.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.serve_config import APP_NAME, OPENAI_ROUTE, serve_config
from services.settings import Settings
from services.tenancy import write_tenants_file

DEV_TENANTS = {"acme": "acme-dev-key", "globex": "globex-dev-key", "initech": "initech-dev-key", "umbrella": "umbrella-dev-key"}


def free_port(low: int = 20000, high: int = 32000) -> int:
    """A port that is free now, chosen below the kernel's ephemeral range (32768+).

    Ray's many processes take ephemeral ports while the cluster starts; a port the kernel
    handed out as "free" from that range can be taken again before Serve binds it.
    """
    import random

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def prefill_records() -> list[dict]:
    """Compressions the prefill replicas finished after their requests' handoff (Prefill.stats)."""
    from ray import serve

    return serve.get_deployment_handle("Prefill", APP_NAME).stats.remote().result()["deferred"]


def wait_stored(policy: str, since: float, timeout_s: float = 900.0) -> dict | None:
    """The record of `policy`'s compression done after wall time `since`, once it is there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [r for r in prefill_records() if r["policy"] == policy and r["done_at"] >= since]
        if done:
            return done[-1]
        time.sleep(0.25)
    return None


@dataclass
class Endpoints:
    grpc: str  # the client API (Generate), Ray Serve's gRPC proxy
    http: str  # Ray Serve's HTTP proxy: the OpenAI-compatible API under /v1
    kvstore: str
    redis: str
    metrics: str = ""  # Prometheus text of this Ray node: ray_headwise_* and ray_serve_* families

    @property
    def openai(self) -> str:
        """The base URL of the OpenAI-compatible API (what `openai.OpenAI(base_url=...)` takes)."""
        return f"{self.http}{OPENAI_ROUTE}"

    def lines(self) -> list[str]:
        return [f"generate (gRPC)  {self.grpc}", f"openai (HTTP)    {self.openai}",
                f"kvstore (gRPC)   {self.kvstore}", f"redis            {self.redis}"] + (
                [f"metrics          {self.metrics}"] if self.metrics else [])


class LocalCluster:
    """Redis + kvstore subprocess + Ray (local) + the Serve app with both deployments, the gRPC proxy
(Generate) and the HTTP proxy (the OpenAI-compatible API)."""

    def __init__(self, settings: Settings | None = None, *, tenants: dict[str, str] | None = None,
                 tenant_limits: dict[str, dict] | None = None, num_cpus: int | None = None,
                 max_replicas: int = 1, ports: str = "free", log=print):
        self.base = settings or Settings()
        self.tenants = dict(tenants or DEV_TENANTS)
        self.tenant_limits = tenant_limits or {}  # written into the tenants file this cluster writes
        if self.tenant_limits and (self.base.tenants_file or self.base.tenants):
            raise ValueError("tenant_limits go into the tenants file LocalCluster writes; with tenants_file or "
                             "tenants configured, give each tenant's limits there")
        self.num_cpus = num_cpus
        self.max_replicas = max_replicas
        self.ports = ports  # "free": pick free ports; "settings": the configured ones
        self.log = log
        self.redis = None
        self.kvstore: subprocess.Popen | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="headwise-local-"))
        self.settings: Settings | None = None
        self._ray = False
        self.metrics_url = ""

    # ---- lifecycle ----------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 300.0) -> "LocalCluster":
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        from services.kvstore.redis_proc import start_redis

        b = self.base
        pick = (lambda p: free_port()) if self.ports == "free" else (lambda p: p)
        grpc_port, http_port, kv_port = pick(b.grpc_port), pick(b.http_port), pick(b.kvstore_port)
        self.log("starting redis …")
        self.redis = start_redis(0)
        tenants_file = b.tenants_file
        if not tenants_file and not b.tenants:
            tenants_file = str(write_tenants_file(self.tmp / "tenants.json", self.tenants, **self.tenant_limits))
        self.settings = b.model_copy(update={
            "grpc_port": grpc_port, "http_port": http_port, "kvstore_port": kv_port,
            "kvstore_addr": f"127.0.0.1:{kv_port}", "redis_url": self.redis.url, "tenants_file": tenants_file,
            "prefill_max_replicas": max(b.prefill_min_replicas, min(b.prefill_max_replicas, self.max_replicas)),
            "decode_max_replicas": max(b.decode_min_replicas, min(b.decode_max_replicas, self.max_replicas)),
        })
        self.start_kvstore()
        self.log("starting ray and the serve application (loads the model in prefill and decode) …")
        self._start_serve(timeout_s)

    def start_kvstore(self, timeout_s: float = 90.0) -> None:
        s = self.settings
        # the tenants decode authenticates are the store's too: it enforces each one's quota_bytes
        env = dict(os.environ, HEADWISE_SERVICE_TOKEN=s.service_token, HEADWISE_REDIS_URL=s.redis_url,
                   HEADWISE_TENANTS_FILE=s.tenants_file, HEADWISE_TENANTS=s.tenants)
        self.kvstore = subprocess.Popen(
            [sys.executable, "-m", "services.kvstore", "--port", str(s.kvstore_port), "--redis-url", s.redis_url],
            env=env, stdout=open(self.tmp / "kvstore.log", "ab"), stderr=subprocess.STDOUT,
        )
        wait_port("127.0.0.1", s.kvstore_port, timeout_s, self.kvstore)

    def stop_kvstore(self) -> None:
        if self.kvstore is not None and self.kvstore.poll() is None:
            self.kvstore.terminate()
            try:
                self.kvstore.wait(10)
            except subprocess.TimeoutExpired:
                self.kvstore.kill()
                self.kvstore.wait()
        self.kvstore = None

    def app_args(self) -> dict:
        """Settings every replica applies over its env: the local endpoints and what differs from defaults."""
        s = self.settings
        fields = ("kvstore_addr", "service_token", "tenants_file", "tenants", "model_path", "device", "dtype",
                  "default_policy", "default_kept", "max_prompt_tokens", "max_new_tokens", "recall_threshold",
                  "recall", "store_timeout_s", "tenant_max_streams", "tenant_quota_bytes", "torch_threads")
        return {f: getattr(s, f) for f in fields}

    def _start_serve(self, timeout_s: float) -> None:
        import ray
        from ray import serve
        from ray.serve._private import api as serve_api
        from ray.serve.config import gRPCOptions
        from ray.serve.schema import ServeDeploySchema

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        cpus = self.num_cpus or int(max(2, self.settings.prefill_num_cpus + self.settings.decode_num_cpus))
        own_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=512 * 1024**2,
                 log_to_driver=bool(os.environ.get("HEADWISE_RAY_LOGS")), configure_logging=False)
        if callable(own_sigterm):
            # ray.init takes over SIGTERM (its core worker prints a stack trace, then exits): a caller
            # that handles SIGTERM itself (`headwise up`: stop everything, as on Ctrl-C) gets it back.
            signal.signal(signal.SIGTERM, own_sigterm)
        self._ray = True
        port = getattr(getattr(ray._private.worker, "_global_node", None), "metrics_export_port", None)
        self.metrics_url = f"http://127.0.0.1:{port}/metrics" if port else ""
        config = serve_config(self.settings)
        config["applications"][0]["args"] = self.app_args()
        schema = ServeDeploySchema.model_validate(config)
        client = serve_api.serve_start(
            http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
            grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
        )
        client.deploy_apps(schema, _blocking=False)
        deadline = time.monotonic() + timeout_s
        while True:
            app = serve.status().applications.get(APP_NAME)
            state = str(app.status) if app else "NOT_STARTED"
            if state.endswith("RUNNING"):
                break
            if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
                raise RuntimeError(f"the serve application failed to deploy: {app.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the serve application is {state} after {timeout_s:.0f}s")
            time.sleep(0.5)
        wait_port("127.0.0.1", self.settings.grpc_port, 60)
        wait_port("127.0.0.1", self.settings.http_port, 60)

    def stop(self) -> None:
        if self._ray:
            import ray
            from ray.serve import context as serve_context

            # The whole local Ray instance goes, Serve's controller, proxies and replicas with it.
            # Only this driver's side of Serve is closed first: its cached handles, whose metrics
            # tasks would otherwise outlive Ray. serve.shutdown() would also ask the controller to
            # shut down gracefully, a task that races the teardown (Ray prints a retry notice).
            try:
                if serve_context._global_client is not None:  # the cached client; no call to the controller
                    serve_context._global_client.shutdown_cached_handles()
                serve_context._set_global_client(None)
            finally:
                ray.shutdown()
                self._ray = False
        self.stop_kvstore()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- facts --------------------------------------------------------------------
    @property
    def endpoints(self) -> Endpoints:
        s = self.settings
        return Endpoints(f"127.0.0.1:{s.grpc_port}", f"http://127.0.0.1:{s.http_port}", s.kvstore_addr, self.redis.url,
                         self.metrics_url)

    def decode_stats(self) -> dict:
        from ray import serve

        return serve.get_deployment_handle("Decode", APP_NAME).stats.remote().result()
