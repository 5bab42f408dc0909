"""Prefill and decode workers end to end in one process: tiny model, the kvstore over its MemoryBackend.

The same flow as the Ray Serve app (decode calls prefill, fetches the chain, streams), so
reuse, tenant isolation, faults and sessions are checked in seconds; tests/e2e does it again
through the real gRPC port.
"""

from __future__ import annotations

import pytest

from services.decode.worker import DecodeWorker
from services.errors import ServiceError
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings
from services.tenancy import TenantRegistry

DOC = "The quick brown fox jumps over the lazy dog. " * 6


class ByteTokenizer:
    """Bytes as tokens (ids 3..258 folded into the tiny model's 256-token vocabulary)."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text, add_special_tokens=False):
        class R:
            input_ids = [3 + (b % 250) for b in text.encode()]

        return R()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + (i % 26)) for i in ids)


@pytest.fixture
async def stack(tiny_model, store):
    from headwise.models import ModelRunner

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    settings = Settings(tenants="acme:ka:2,globex:kb", default_policy="streaming", max_prompt_tokens=900)
    stores = store.clients()
    pw = PrefillWorker(runner, stores, settings)
    calls = []

    async def prefill(req):
        calls.append(req)
        return await pw.prefill(req)

    dw = DecodeWorker(runner, stores, prefill, TenantRegistry.from_settings(settings), settings)
    return dw, store, calls


async def ask(dw, key="ka", **fields):
    req = pb.GenerateRequest(**({"context": DOC, "prompt": "what jumps?", "max_new_tokens": 6,
                                 "policy": "streaming", "kept": 0.5} | fields))
    ids, figures = [], None
    async for m in dw.generate(req, {"authorization": f"Bearer {key}"}):
        if m.HasField("delta"):
            ids += list(m.delta.token_ids)
        else:
            figures = m.figures
    return ids, figures


async def test_reuse_gives_the_same_answer(stack):
    dw, store, _ = stack
    cold_ids, cold = await ask(dw)
    warm_ids, warm = await ask(dw)
    assert cold.store_status == "stored" and cold.reused_tokens == 0
    assert warm.store_status == "reused" and warm.reused_tokens > 0
    assert warm_ids == cold_ids and len(cold_ids) == 6
    assert cold.held_kv_bytes < cold.full_kv_bytes and 0 < cold.realised_kept < 1
    assert len(await store.settled()) == 1  # the context only: one-request question keys were deleted


async def test_no_reuse_across_tenants(stack):
    dw, store, _ = stack
    await ask(dw, key="ka")
    ids_b, fig_b = await ask(dw, key="kb")
    assert fig_b.store_status == "stored" and fig_b.reused_tokens == 0
    assert {t for t, _ in await store.settled()} == {"acme", "globex"}


async def test_store_down_bypasses(stack):
    dw, store, _ = stack
    ref, _ = await ask(dw)
    store.backend.down = True
    ids, fig = await ask(dw)
    assert fig.store_status == "bypassed" and ids == ref


async def test_corrupt_segment_is_recomputed(stack):
    dw, store, calls = stack
    ref, _ = await ask(dw)
    for _, key in list(store.data):  # the next get of the stored context fails its checksum: a miss
        store.corrupt(key)
    ids, fig = await ask(dw)
    assert ids == ref and fig.store_status in ("stored", "reused")
    assert store.server.kvstore.metrics.value("headwise_kvstore_misses_total", tenant="acme", reason="checksum") >= 1


@pytest.mark.parametrize("refusal", ["quota", "INVALID_ARGUMENT", "INTERNAL"])
async def test_a_refused_put_is_answered_and_says_not_stored(stack, refusal):
    dw, store, _ = stack
    ref, _ = await ask(dw, context=DOC + "another document")  # the same question, stored normally
    store.data.clear()
    if refusal == "quota":
        store.quota(10)  # every segment is larger than the whole quota
    else:
        store.backend.refuse = refusal
    ids, fig = await ask(dw, context=DOC + "another document")
    assert fig.store_status == "not_stored" and ids == ref and not await store.settled()


async def test_a_store_error_on_fetch_is_answered_inline(stack):
    dw, store, _ = stack
    ref, _ = await ask(dw)
    store.backend.get_error = True  # INTERNAL, neither unavailable nor a miss: decode takes the cache inline
    ids, fig = await ask(dw)
    assert ids == ref and fig.store_status == "not_stored"


async def test_oversize_prompt_names_the_limit(stack):
    dw, _, _ = stack
    with pytest.raises(ServiceError) as e:
        await ask(dw, context="x" * 2000)
    assert e.value.code == "INVALID_ARGUMENT" and "900" in e.value.message


async def test_an_empty_context_without_a_chat_template_is_invalid_argument(stack):
    """ByteTokenizer has no chat template: an empty context leaves no document segment to prefill
    (the engine's own error used to escape as INTERNAL)."""
    dw, _, _ = stack
    for query_aware in (False, True):
        with pytest.raises(ServiceError) as e:
            await ask(dw, context="", query_aware=query_aware, policy="snapkv" if query_aware else "streaming")
        assert e.value.code == "INVALID_ARGUMENT" and "context is empty" in e.value.message
    ids, _ = await ask(dw, context="a")  # one character is a document
    assert len(ids) == 6


async def test_wrong_key(stack):
    dw, _, _ = stack
    with pytest.raises(ServiceError) as e:
        await ask(dw, key="nope")
    assert e.value.code == "UNAUTHENTICATED"


async def test_session_reuses_earlier_turns(stack):
    dw, _, calls = stack
    _, first = await ask(dw, session_id="s1")
    _, second = await ask(dw, session_id="s1", context="", prompt="and then?")
    assert len(calls[-1].history) == 2  # the first question, then its answer
    assert second.reused_tokens > first.prompt_tokens - 1 >= first.reused_tokens
    assert second.store_status in ("reused", "partial")


async def test_stream_slot_released_after_cancel(stack):
    dw, _, _ = stack
    req = pb.GenerateRequest(context=DOC, prompt="q", max_new_tokens=50, policy="streaming", kept=0.5)
    agen = dw.generate(req, {"authorization": "Bearer ka"})
    await agen.__anext__()
    await agen.aclose()  # what a client cancel does to the server's generator
    assert dw.tenants.open_streams("acme") == 0
    assert dw.recent[-1].cancelled and dw.recent[-1].tokens < 50


async def test_concurrent_cold_requests_compute_the_context_once(tiny_model, store):
    """Single flight: four requests for one document arrive together; one computes, three reuse."""
    import asyncio

    from headwise.models import ModelRunner
    from services.handoff import PrefillRequest

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    compressed = []
    real = runner.prefill_segment

    def counting(ids, cache, policy):
        compressed.append(policy.name)
        return real(ids, cache, policy)

    runner.prefill_segment = counting
    pw = PrefillWorker(runner, store.clients(), Settings(max_prompt_tokens=900))
    reqs = [PrefillRequest(tenant="acme", salt="s", context=DOC, prompt=f"question {i}?", answer_prefix="",
                           policy="streaming", kept=0.5) for i in range(4)]
    handles = await asyncio.gather(*(pw.prefill(r) for r in reqs))
    assert compressed.count("streaming") == 1 and compressed.count("full") == 4  # one context, four questions
    assert sorted(h.store_status for h in handles) == ["reused", "reused", "reused", "stored"]
    assert pw.single_flight_waits >= 3 and not pw._inflight
    # another tenant's identical document is not shared, and a failed leader hands over
    other = await pw.prefill(PrefillRequest(tenant="globex", salt="g", context=DOC, prompt="q?", answer_prefix="",
                                            policy="streaming", kept=0.5))
    assert other.store_status == "stored" and compressed.count("streaming") == 2


async def test_a_failed_leader_lets_the_next_request_compute(tiny_model, store):
    import asyncio

    from headwise.models import ModelRunner
    from services.handoff import PrefillRequest

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    real, calls = runner.prefill_segment, []

    def first_fails(ids, cache, policy):
        calls.append(policy.name)
        if len(calls) == 1:
            raise RuntimeError("model fault")
        return real(ids, cache, policy)

    runner.prefill_segment = first_fails
    pw = PrefillWorker(runner, store.clients(), Settings(max_prompt_tokens=900))
    req = PrefillRequest(tenant="acme", salt="s", context=DOC, prompt="q?", answer_prefix="", policy="streaming",
                         kept=0.5)
    a, b = await asyncio.gather(pw.prefill(req), pw.prefill(req), return_exceptions=True)
    assert isinstance(a, RuntimeError) and b.store_status == "stored" and not pw._inflight
