"""Prometheus metrics of one KV store server (its own registry, so several servers can share a process)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class StoreMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("headwise_kvstore_requests", "Calls by method and status code", ["method", "code"], registry=r)
        self.latency = Histogram("headwise_kvstore_latency_seconds", "Call latency, seconds", ["method"], registry=r,
                                 buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30))
        self.tenant_bytes = Gauge("headwise_kvstore_tenant_bytes", "Bytes stored per tenant (live segments)", ["tenant"], registry=r)
        self.bytes_in = Counter("headwise_kvstore_put_bytes", "Bytes accepted by Put, per tenant", ["tenant"], registry=r)
        self.bytes_out = Counter("headwise_kvstore_get_bytes", "Bytes sent by Get, per tenant", ["tenant"], registry=r)
        self.hits = Counter("headwise_kvstore_hits", "Get calls that returned a whole segment", ["tenant"], registry=r)
        self.misses = Counter("headwise_kvstore_misses", "Get/Recall misses by reason (absent, checksum, vanished)",
                              ["tenant", "reason"], registry=r)
        self.tenant_quota = Gauge("headwise_kvstore_tenant_quota_bytes", "Byte quota per tenant (0 = unlimited)",
                                  ["tenant"], registry=r)
        self.evictions = Counter("headwise_kvstore_evictions", "Segments evicted (tenant's LRU) to make room for a put",
                                 ["tenant"], registry=r)
        self.evicted_bytes = Counter("headwise_kvstore_evicted_bytes", "Stored bytes of the evicted segments",
                                     ["tenant"], registry=r)
        self.refusals = Counter("headwise_kvstore_put_refusals",
                                "Puts not stored: too_large (over the whole quota), store_full (Redis at maxmemory)",
                                ["tenant", "reason"], registry=r)
        self.http = None
        self.http_port: int | None = None

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.requests.labels(method, code.name).inc()
        self.latency.labels(method).observe(seconds)

    def stored(self, tenant: str, nbytes: int, tenant_bytes: int) -> None:
        self.bytes_in.labels(tenant).inc(nbytes)
        self.tenant_bytes.labels(tenant).set(tenant_bytes)

    def evicted(self, tenant: str, segments: int, nbytes: int) -> None:
        if segments:
            self.evictions.labels(tenant).inc(segments)
            self.evicted_bytes.labels(tenant).inc(nbytes)

    def refused(self, tenant: str, reason: str) -> None:
        self.refusals.labels(tenant, reason).inc()

    def hit(self, tenant: str, nbytes: int) -> None:
        self.hits.labels(tenant).inc()
        self.bytes_out.labels(tenant).inc(nbytes)

    def miss(self, tenant: str, reason: str) -> None:
        self.misses.labels(tenant, reason).inc()

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics over HTTP on `port` (0 = a free one); returns the port."""
        self.http, _ = start_http_server(port, addr=addr, registry=self.registry)
        self.http_port = self.http.server_port
        return self.http_port

    def close(self) -> None:
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
            self.http = None
