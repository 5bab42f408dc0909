"""Serving metrics: what the prefill and decode workers report, and where it goes.

The workers stay free of Ray: they call a `Metrics` object. `Metrics()` records nothing (unit
tests, tools); `RayMetrics()` (what the deployments use) records Ray's application metrics,
which every Ray node exports in Prometheus format on its metrics port with a `ray_` prefix,
next to Ray Serve's own (`ray_serve_*`): `ray_headwise_requests_total` and so on. The local
cluster prints that port's URL; on Kubernetes the Ray pods' Prometheus annotations cover it.
The store's own figures per tenant (usage, quota, evictions in count and bytes, refused puts) are
the kvstore's metrics (services/kvstore/metrics.py), also returned by its Stats call.

Families (labels in brackets):
  headwise_requests_total        Generate requests by outcome [tenant, code, store]; store is the
                                 request's store_status: "not_stored" counts answers whose cache the
                                 store refused (quota, full), "bypassed" the store being down
  headwise_ttft_seconds          time to the first token [store]
  headwise_tokens_total          tokens streamed [tenant]
  headwise_prompt_tokens_total   prompt tokens, and how many of them were reused [tenant, kind=prompt|reused]
  headwise_kv_bytes_total        KV bytes of the requests' caches, full vs held [kind=full|held]
  headwise_recalls_total         merged rows recalled during decode [tenant]
  headwise_stream_rejections_total  requests over a tenant's stream limit [tenant, scope=replica|cluster]
  headwise_prefill_seconds       prefill of a request (lookup, compute, store) [policy, store]
  headwise_single_flight_waits_total  requests that waited for another one computing their document [scope]
  headwise_deferred_compression_seconds  from the handoff of a first answer (exact cache) to its compressed
                                 cache stored, or to giving up [policy, outcome=stored|refused|failed]
"""

from __future__ import annotations

import logging

log = logging.getLogger("headwise.metrics")

TTFT_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160]


class Metrics:
    """The interface, recording nothing."""

    def request(self, tenant: str, code: str, figures: dict | None) -> None:
        """One Generate request ended: `code` is OK or the gRPC status name; figures when it finished."""

    def stream_rejected(self, tenant: str, scope: str) -> None:
        """A request was refused for the tenant's stream limit, on this replica or across the cluster."""

    def prefill(self, policy: str, store: str, seconds: float) -> None:
        """One prefill request done."""

    def single_flight_wait(self, scope: str) -> None:
        """A prefill waited for another one computing the same document (scope: replica or cluster)."""

    def deferred_compression(self, policy: str, outcome: str, seconds: float) -> None:
        """A compressed cache computed after its request was handed off: `stored`, `refused` (quota) or
        `failed` (model or store error: a later request computes it again), `seconds` after the handoff."""


class RecordingMetrics(Metrics):
    """Keeps every call, for tests."""

    def __init__(self):
        self.calls: list[tuple] = []

    def request(self, tenant, code, figures):
        self.calls.append(("request", tenant, code, figures))

    def stream_rejected(self, tenant, scope):
        self.calls.append(("stream_rejected", tenant, scope))

    def prefill(self, policy, store, seconds):
        self.calls.append(("prefill", policy, store, seconds))

    def single_flight_wait(self, scope):
        self.calls.append(("single_flight_wait", scope))

    def deferred_compression(self, policy, outcome, seconds):
        self.calls.append(("deferred_compression", policy, outcome, seconds))


class RayMetrics(Metrics):
    """Ray application metrics (ray.util.metrics), created once per replica process."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.requests = Counter("headwise_requests_total", "Generate requests by outcome",
                                tag_keys=("tenant", "code", "store"))
        self.ttft = Histogram("headwise_ttft_seconds", "time to the first token, seconds", boundaries=TTFT_BOUNDARIES,
                              tag_keys=("store",))
        self.tokens = Counter("headwise_tokens_total", "tokens streamed to clients", tag_keys=("tenant",))
        self.prompt = Counter("headwise_prompt_tokens_total", "prompt tokens, and how many were reused",
                              tag_keys=("tenant", "kind"))
        self.kv = Counter("headwise_kv_bytes_total", "KV bytes of the requests' caches, full vs held", tag_keys=("kind",))
        self.recalls = Counter("headwise_recalls_total", "merged rows recalled during decode", tag_keys=("tenant",))
        self.rejections = Counter("headwise_stream_rejections_total", "requests over a tenant's stream limit",
                                  tag_keys=("tenant", "scope"))
        self.prefills = Histogram("headwise_prefill_seconds", "prefill of a request, seconds",
                                  boundaries=TTFT_BOUNDARIES, tag_keys=("policy", "store"))
        self.waits = Counter("headwise_single_flight_waits_total",
                             "prefills that waited for another one computing the same document", tag_keys=("scope",))
        self.deferred = Histogram("headwise_deferred_compression_seconds",
                                  "from a first answer's handoff (exact cache) to its compressed cache stored, seconds",
                                  boundaries=TTFT_BOUNDARIES, tag_keys=("policy", "outcome"))

    def request(self, tenant, code, figures):
        store = str((figures or {}).get("store_status", "none"))
        self.requests.inc(1, tags={"tenant": tenant, "code": code, "store": store})
        if not figures:
            return
        self.ttft.observe(float(figures.get("ttft_s", 0.0)), tags={"store": store})
        for counter, field, tags in (
            (self.tokens, "decode_tokens", {"tenant": tenant}),
            (self.prompt, "prompt_tokens", {"tenant": tenant, "kind": "prompt"}),
            (self.prompt, "reused_tokens", {"tenant": tenant, "kind": "reused"}),
            (self.kv, "full_kv_bytes", {"kind": "full"}),
            (self.kv, "held_kv_bytes", {"kind": "held"}),
            (self.recalls, "recalls", {"tenant": tenant}),
        ):
            n = int(figures.get(field, 0))
            if n > 0:  # Ray counters take positive increments only
                counter.inc(n, tags=tags)

    def stream_rejected(self, tenant, scope):
        self.rejections.inc(1, tags={"tenant": tenant, "scope": scope})

    def prefill(self, policy, store, seconds):
        self.prefills.observe(seconds, tags={"policy": policy, "store": store})

    def single_flight_wait(self, scope):
        self.waits.inc(1, tags={"scope": scope})

    def deferred_compression(self, policy, outcome, seconds):
        self.deferred.observe(seconds, tags={"policy": policy, "outcome": outcome})


def ray_metrics() -> Metrics:
    """RayMetrics, or the silent interface when Ray's metrics cannot be created (logged)."""
    try:
        return RayMetrics()
    except Exception as e:  # noqa: BLE001 - metrics must never stop a replica from serving
        log.warning("serving metrics disabled: %s", e)
        return Metrics()
