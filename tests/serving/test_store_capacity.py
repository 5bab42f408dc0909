"""Prefill and decode workers over the real KV store service and a real Redis: a request never
fails because the store will not keep its cache.

The workers are those of the Ray Serve app (decode calls prefill, fetches, streams), with the
real StoreClients / KVStoreClient; the quota is a cache capacity (the store evicts the tenant's
least recently used documents), and a put the store refuses is answered from the cache prefill
computed, with `store_status` "not_stored". No status message a client could see names an
internal exception.
"""

from __future__ import annotations

import asyncio
import re

import pytest
import torch

from services.decode.worker import DecodeWorker
from services.errors import ServiceError
from services.handoff import PrefillRequest
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings, TenantLimits
from services.store import StoreClients
from services.tenancy import TenantRegistry
from tests.kvstore.conftest import TOKEN, settings, start_service
from tests.serving.test_workers import DOC, ByteTokenizer

INTERNAL_NAME = re.compile(r"\b\w+(Error|Exception|Unavailable|TooLarge|Full|Exceeded)\b|services\.|Traceback")


class Stack:
    """A kvstore service on Redis, one prefill and one decode worker using it."""

    def __init__(self, svc, runner, tenants: str, cache_bytes: int = 0, **kw):
        self.svc = svc
        self.settings = Settings(tenants=tenants, kvstore_addr=svc.addr, service_token=TOKEN, store_timeout_s=5.0,
                                 **({"default_policy": "streaming", "max_prompt_tokens": 900} | kw))
        self.stores = StoreClients(svc.addr, TOKEN, timeout_s=5.0)
        # cache_bytes=0: the replica remembers nothing, every reuse is read from the store
        self.pw = PrefillWorker(runner, self.stores, self.settings, cache_bytes=cache_bytes)
        self.dw = DecodeWorker(runner, self.stores, self.pw.prefill, TenantRegistry.from_settings(self.settings),
                               self.settings)

    def set_quota(self, tenant: str, quota: int) -> None:
        s = self.svc.server.kvstore.settings
        self.svc.server.kvstore.settings = s.model_copy(update={"tenant_limits": {tenant: TenantLimits(quota_bytes=quota)}})

    async def ask(self, key="ka", context=DOC, **fields):
        req = pb.GenerateRequest(**({"context": context, "prompt": "what jumps?", "max_new_tokens": 6,
                                     "policy": "streaming", "kept": 0.5} | fields))
        ids, figures = [], None
        async for m in self.dw.generate(req, {"authorization": f"Bearer {key}"}):
            if m.HasField("delta"):
                ids += list(m.delta.token_ids)
            else:
                figures = m.figures
        return ids, figures

    async def stats(self, tenant: str = "acme") -> dict:
        """The tenant's Stats once decode's deletes of one-request question segments have landed
        (they run in the background): the same segment count twice in a row, 20 ms apart."""
        last = None
        for _ in range(100):
            st = await self.stores.for_tenant(tenant).stats()
            st.pop("client")
            if last is not None and st == last:
                return st
            last = st
            await asyncio.sleep(0.02)
        return last

    async def close(self) -> None:
        await self.stores.close()
        await self.svc.close()


@pytest.fixture
async def stack(tiny_model, redis_url):
    from headwise.models import ModelRunner

    svc = await start_service(settings(redis_url))
    s = Stack(svc, ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama"), "acme:ka,globex:kb")
    yield s
    await s.close()


def docs(n: int) -> list[str]:
    return [f"Document {i}: " + DOC.replace("fox", f"fox number {i}") for i in range(n)]


async def context_bytes(stack: Stack, doc: str) -> int:
    """What one document's context segment holds in the store (asked as globex, quota unlimited)."""
    before = (await stack.stats("globex"))["tenant_bytes"]
    _, fig = await stack.ask(key="kb", context=doc)
    assert fig.store_status == "stored"
    return (await stack.stats("globex"))["tenant_bytes"] - before


async def test_a_document_larger_than_the_quota_is_answered_and_not_stored(stack) -> None:
    ref, _ = await stack.ask(key="kb")  # another tenant, unlimited: the reference answer
    size = (await stack.stats("globex"))["tenant_bytes"]
    stack.set_quota("acme", size // 2)
    small = "A short note about a fox."
    await stack.ask(context=small)  # something of acme's that fits
    before = await stack.stats()
    ids, fig = await stack.ask()
    assert fig.store_status == "not_stored" and ids == ref
    assert await stack.stats() == before and before["segments"] == 1  # nothing stored, nothing evicted
    assert stack.svc.metrics.value("headwise_kvstore_put_refusals_total", tenant="acme", reason="too_large") >= 1
    last = stack.stores.for_tenant("acme").client.counters.last_error
    assert "larger than" in last and not INTERNAL_NAME.search(last)


async def test_after_eviction_the_document_is_recomputed_with_the_same_answer(stack) -> None:
    d = docs(3)
    size = await context_bytes(stack, d[0])
    stack.set_quota("acme", int(2.5 * size))  # two documents (and a question segment in flight)
    first = [await stack.ask(context=doc) for doc in d[:2]]
    assert [f.store_status for _, f in first] == ["stored", "stored"]
    again, fig = await stack.ask(context=d[0])
    assert fig.store_status == "reused" and again == first[0][0]  # d0 is now more recent than d1
    _, fig = await stack.ask(context=d[2])  # evicts d1, the least recently used
    st = await stack.stats()
    assert fig.store_status == "stored" and st["evictions"] >= 1 and st["tenant_bytes"] <= st["quota_bytes"]
    ids, fig = await stack.ask(context=d[1])
    assert fig.store_status == "stored" and fig.reused_tokens == 0 and ids == first[1][0]
    ids, fig = await stack.ask(context=d[2])
    assert fig.store_status == "reused"


async def test_a_tenant_at_its_quota_leaves_another_tenant_reusing(stack) -> None:
    d = docs(4)
    size = await context_bytes(stack, d[0])  # globex stores d0
    stack.set_quota("acme", int(1.5 * size))
    for doc in d:
        _, fig = await stack.ask(context=doc)
        assert fig.store_status == "stored"
    assert (await stack.stats())["evictions"] >= 3 and (await stack.stats("globex"))["evictions"] == 0
    _, fig = await stack.ask(key="kb", context=d[0])
    assert fig.store_status == "reused"


async def test_a_put_the_store_rejects_is_answered_and_not_stored(stack) -> None:
    """A refusal of another kind injected in the real service: the segment limit (INVALID_ARGUMENT)."""
    ref, _ = await stack.ask(key="kb")
    s = stack.svc.server.kvstore.settings
    stack.svc.server.kvstore.settings = s.model_copy(update={"max_segment_bytes": 1000})
    ids, fig = await stack.ask()
    assert fig.store_status == "not_stored" and ids == ref
    assert (await stack.stats())["segments"] == 0
    last = stack.stores.for_tenant("acme").client.counters.last_error
    assert "INVALID_ARGUMENT" in last and not INTERNAL_NAME.search(last.split(": ", 2)[2])


async def test_no_store_failure_reaches_a_client_as_a_status(stack) -> None:
    """Quota refusal, rejected segment, store down: every request is answered; the only statuses a
    client gets here are the admission ones, and they name no internal exception."""
    seen = []
    stack.set_quota("acme", 10)
    seen.append((await stack.ask())[1].store_status)
    await stack.svc.close()  # the store goes away
    seen.append((await stack.ask())[1].store_status)
    assert seen == ["not_stored", "bypassed"]
    with pytest.raises(ServiceError) as e:
        await stack.ask(key="wrong")
    assert e.value.code == "UNAUTHENTICATED" and not INTERNAL_NAME.search(e.value.message)


@pytest.mark.slow
async def test_razor_at_kept_quarter_on_a_real_document_stores_its_recall_entries(real_runner, redis_url) -> None:
    """The issue's failing case: razor's compensation rows stand for ~2,000 originals each, over 1 MiB.
    razor (KVzip fill) is deferred: the first answer is exact, the compressed cache is stored after it."""
    from headwise.cache.codec import decode_recall, encode_recall
    from headwise.documents import document_tokens

    doc = document_tokens(real_runner.tokenizer, 2500)
    svc = await start_service(settings(redis_url))
    s = Stack(svc, real_runner, "acme:ka", cache_bytes=1 << 30, default_policy="razor", max_prompt_tokens=4000)
    try:
        ids, fig = await s.ask(context=doc, prompt="What is this document about?", policy="razor", kept=0.25)
        assert fig.store_status == "compressing" and len(ids) > 0 and fig.prompt_tokens > 2500
        await s.pw.drain()
        assert [d["outcome"] for d in s.pw.stats()["deferred"]] == ["stored"]
        salt = s.dw.tenants.authenticate({"authorization": "Bearer ka"}).salt  # as decode asked
        handle = await s.pw.prefill(PrefillRequest("acme", salt, doc, "What is this document about?",
                                                   policy="razor", kept=0.25))
        assert handle.store_status == "reused"
        key, store = handle.keys[0], s.stores.for_tenant("acme")
        entries = encode_recall(s.pw._recent[key])  # the segment as computed and put, originals included
        big = [e for e in entries if len(e.data) > 1 << 20]
        assert big, "expected compensation rows whose originals are over 1 MiB"
        for e in big[:3] + entries[:2]:
            k, v, pos = await store.recall(key, e.layer, e.head, e.row)
            ek, ev, epos = decode_recall(e.data)
            assert torch.equal(pos, epos) and torch.equal(k, ek) and torch.equal(v, ev)
        st = await s.stats()
        assert st["tenant_bytes"] > sum(len(e.data) for e in entries)
    finally:
        await s.close()


def test_the_cli_and_demo_print_a_line_for_an_answer_not_stored() -> None:
    from cluster.demo import store_note

    assert "not stored" in store_note({"store_status": "not_stored"})
    assert "unreachable" in store_note({"store_status": "bypassed"})
    assert all(store_note({"store_status": s}) is None for s in ("stored", "reused", "partial", "private"))


async def test_an_unexpected_prefill_failure_reaches_the_client_without_its_exception_name() -> None:
    """The issue's `INTERNAL: prefill failed: UnserializableException: services.kvstore.client.StoreError`:
    what crosses Ray is logged by the decode replica; the client gets a fixed line."""
    from services.decode.deployment import INTERNAL_PREFILL, Decode

    class Failing:
        class prefill:  # noqa: N801 - the handle's method name
            @staticmethod
            async def remote(req):
                raise RuntimeError("services.kvstore.client.StoreError: INVALID_ARGUMENT: recall entry too big")

    decode = object.__new__(Decode.func_or_class)
    decode._prefill = Failing()
    with pytest.raises(ServiceError) as e:
        await decode._call_prefill(PrefillRequest("acme", "s", "doc", "q"))
    assert e.value.code == "INTERNAL" and e.value.message == INTERNAL_PREFILL
    assert not INTERNAL_NAME.search(e.value.message)
