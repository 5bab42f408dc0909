"""Several decode replicas, one store: the tenant's stream limit and conversations are cluster-wide.

Two DecodeWorkers (two replicas) and one PrefillWorker share one kvstore, the real server over
its MemoryBackend (the Redis backend passes the same contract: tests/kvstore/test_contract.py). Through the real service and Redis:
tests/kvstore/test_service.py; the single-replica path end to end: tests/e2e.
"""

from __future__ import annotations

import asyncio

import pytest

from services.decode.worker import DecodeWorker
from services.errors import ServiceError
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings
from services.tenancy import TenantRegistry
from tests.serving.test_workers import DOC, ByteTokenizer, ask


@pytest.fixture
async def replicas(tiny_model, store):
    from headwise.models import ModelRunner

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    settings = Settings(tenants="acme:ka:2,globex:kb", default_policy="streaming", max_prompt_tokens=900,
                        stream_lease_s=0.3)
    pw = PrefillWorker(runner, store.clients(), settings)

    def replica() -> DecodeWorker:  # own breaker, sessions and stream counts: only the store is shared
        return DecodeWorker(runner, store.clients(), pw.prefill, TenantRegistry.from_settings(settings), settings)

    return replica(), replica(), store


async def open_stream(dw, key="ka"):
    req = pb.GenerateRequest(context=DOC, prompt="q", max_new_tokens=200, policy="streaming", kept=0.5)
    agen = dw.generate(req, {"authorization": f"Bearer {key}"})
    await agen.__anext__()
    return agen


async def test_stream_limit_holds_across_replicas_and_slots_are_renewed(replicas):
    a, b, _ = replicas
    s1, s2 = await open_stream(a), await open_stream(a)
    await asyncio.sleep(1.0)  # > 3 lease periods: the open streams renewed their slots
    with pytest.raises(ServiceError) as e:
        await open_stream(b)  # replica b holds no stream of acme itself
    assert e.value.code == "RESOURCE_EXHAUSTED" and "across the cluster" in e.value.message
    assert "limit 2" in e.value.message
    other = await open_stream(b, key="kb")  # another tenant is not affected
    await s1.aclose()  # a cancel gives the slot back
    await asyncio.sleep(0.05)
    s3 = await open_stream(b)
    for s in (s2, s3, other):
        await s.aclose()


async def test_a_dead_replicas_slots_lapse(replicas):
    a, b, mem = replicas
    await mem.backend.acquire("acme", "streams", "crashed-1", 2, 0.3)  # a replica died holding both slots
    await mem.backend.acquire("acme", "streams", "crashed-2", 2, 0.3)
    with pytest.raises(ServiceError):
        await open_stream(b)
    await asyncio.sleep(0.4)
    s = await open_stream(b)
    await s.aclose()


async def test_a_conversation_continues_on_another_replica(replicas):
    a, b, _ = replicas
    _, first = await ask(a, session_id="s1")
    _, second = await ask(b, session_id="s1", context="", prompt="and then?")  # b never saw s1
    assert ("acme", "s1") in b.sessions
    assert second.reused_tokens > first.prompt_tokens - 1 >= first.reused_tokens
    assert second.store_status in ("reused", "partial")
    # the same session id from another tenant is another conversation: nothing of acme's is found
    _, other = await ask(b, key="kb", session_id="s1", context="Another document.", prompt="and then?")
    assert other.reused_tokens == 0 and other.store_status == "stored"


async def test_store_down_falls_back_to_each_replicas_own_limit_and_sessions(replicas):
    a, b, mem = replicas
    mem.backend.down = True
    s1, s2 = await open_stream(a), await open_stream(b)  # no cluster view: each replica counts its own
    with pytest.raises(ServiceError) as e:
        await open_stream(a), await open_stream(a)
    assert e.value.code == "RESOURCE_EXHAUSTED" and "across the cluster" not in e.value.message
    for s in (s1, s2):
        await s.aclose()
    _, first = await ask(a, session_id="s2")
    assert first.store_status == "bypassed" and ("acme", "s2") in a.sessions


async def test_two_prefill_replicas_compute_a_new_document_once(tiny_model, store):
    from headwise.models import ModelRunner
    from services.handoff import PrefillRequest

    compressed = []

    def replica() -> PrefillWorker:
        runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
        real = runner.prefill_segment

        def counting(ids, cache, policy):
            compressed.append(policy.name)
            return real(ids, cache, policy)

        runner.prefill_segment = counting
        return PrefillWorker(runner, store.clients(), Settings(max_prompt_tokens=900))

    p1, p2 = replica(), replica()
    req = PrefillRequest(tenant="acme", salt="s", context=DOC, prompt="q?", answer_prefix="", policy="streaming",
                         kept=0.5)
    handles = await asyncio.gather(p1.prefill(req), p2.prefill(req), p1.prefill(req), p2.prefill(req))
    assert compressed.count("streaming") == 1
    assert sorted(h.store_status for h in handles) == ["reused", "reused", "reused", "stored"]
    assert p1.cluster_waits + p2.cluster_waits >= 1
    assert await store.backend.acquire("acme", f"fill-{handles[0].keys[0]}", "probe", 1, 1) == (True, 1)  # released


async def test_metrics_see_outcomes_rejections_and_single_flight(tiny_model, store):
    from headwise.models import ModelRunner
    from services.metrics import RecordingMetrics

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    settings = Settings(tenants="acme:ka:1", default_policy="streaming", max_prompt_tokens=900)
    metrics = RecordingMetrics()
    pw = PrefillWorker(runner, store.clients(), settings, metrics=metrics)
    dw = DecodeWorker(runner, store.clients(), pw.prefill, TenantRegistry.from_settings(settings), settings,
                      metrics=metrics)
    _, fig = await ask(dw)
    s = await open_stream(dw)
    with pytest.raises(ServiceError):
        await ask(dw)  # over acme's one stream
    await s.aclose()
    with pytest.raises(ServiceError):
        await ask(dw, key="wrong")
    requests = [c for c in metrics.calls if c[0] == "request"]
    assert [(t, code) for _, t, code, _ in requests] == [
        ("acme", "OK"), ("acme", "RESOURCE_EXHAUSTED"), ("acme", "CANCELLED"), ("unauthenticated", "UNAUTHENTICATED")]
    done = requests[0][3]
    assert done["decode_tokens"] == 6 and done["store_status"] == "stored" and done["held_kv_bytes"] == fig.held_kv_bytes
    assert ("stream_rejected", "acme", "replica") in metrics.calls
    assert [c[1:3] for c in metrics.calls if c[0] == "prefill"][:2] == [("streaming", "stored"), ("streaming", "reused")]
