"""`python -m services.kvstore --port 50051 --redis-url redis://127.0.0.1:6379/0`: run the KV store."""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import signal

from services.kvstore.memtune import tune_malloc
from services.kvstore.server import close_server, create_server, start_server
from services.kvstore.settings import KVStoreSettings


def parse(argv: list[str] | None = None) -> tuple[KVStoreSettings, str]:
    ap = argparse.ArgumentParser(prog="python -m services.kvstore", description=__doc__)
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, help="gRPC port (default $HEADWISE_KVSTORE_PORT or 50051)")
    ap.add_argument("--redis-url", help="redis://host:port/db, or memory:// (default $HEADWISE_REDIS_URL)")
    ap.add_argument("--metrics-port", type=int, help="Prometheus HTTP port (default $HEADWISE_KVSTORE_METRICS_PORT)")
    ap.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    a = ap.parse_args(argv)
    overrides = {"kvstore_port": a.port, "redis_url": a.redis_url, "kvstore_metrics_port": a.metrics_port}
    settings = KVStoreSettings(**{k: v for k, v in overrides.items() if v is not None})
    if a.no_metrics:
        settings = settings.model_copy(update={"metrics_enabled": False})
    return settings, a.host


async def serve(settings: KVStoreSettings, host: str = "0.0.0.0") -> None:
    # SIGTERM (Kubernetes, systemd, kill) stops it as Ctrl-C does: calls in flight get a grace
    # second, then the backend and the metrics server close. Taken before the port opens, so a
    # signal that finds the port open always finds the handler too.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, functools.partial(_stopping, stop, sig))
    server, port = create_server(f"{host}:{settings.kvstore_port}", settings)
    await start_server(server)
    # Everything imported so far (torch included) lives as long as the process: keep it out of
    # the collector's full passes, which otherwise walk it while chunks stream.
    gc.freeze()
    m = server.kvstore.metrics.http_port
    logging.info("kvstore listening on %s:%d (backend %s%s)", host, port, server.kvstore.backend.name,
                 f", metrics on :{m}/metrics" if m else "")
    await stop.wait()
    await close_server(server)
    logging.info("kvstore stopped")


def _stopping(stop: asyncio.Event, sig: signal.Signals) -> None:
    if not stop.is_set():
        logging.info("kvstore stopping (%s)", sig.name)
    stop.set()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, host = parse(argv)
    tune_malloc()  # chunks are fresh 1 MiB buffers: keep their pages instead of faulting them in per chunk
    asyncio.run(serve(settings, host))


if __name__ == "__main__":
    main()
