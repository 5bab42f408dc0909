"""A tenant's quota as an LRU cache capacity, through the real service and a real Redis.

The same rules as the contract (tests/kvstore/test_contract.py), seen by clients: LRU order
follows Get / Recall / Lookup, usage never exceeds the quota under concurrent puts, tenants never
evict each other, a reader of a segment evicted under it gets a clean miss, recall entries of any
size are stored, and under Redis's noeviction policy a full Redis refuses puts while reads go on.
"""

from __future__ import annotations

import asyncio
import re

import grpc
import pytest
import redis
import torch

from headwise.cache.codec import encode
from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from services.kvstore.errors import QuotaExceeded
from services.kvstore.protocol import TENANT_HEADER, TOKEN_HEADER
from services.protos.headwise.v1 import kvstore_pb2 as pb
from services.protos.headwise.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.conftest import TOKEN, big_cache, settings, start_service
from tests.test_codec import assert_same, same

# An internal exception name (StoreError, BackendUnavailable, ...) or module path in a status message.
INTERNAL_NAME = re.compile(r"\b\w+(Error|Exception|Unavailable|TooLarge|Full)\b|services\.|Traceback")


def doc(seed: int, rows: int = 400) -> CompactCache:
    return big_cache(rows=rows, seed=seed)


async def quota_service(redis_url: str, docs: float, rows: int = 400, **kw):
    """A service whose default quota holds `docs` documents of `rows` rows."""
    size = encode(doc(0, rows)).nbytes
    return await start_service(settings(redis_url, tenant_quota_bytes=int(docs * size), **kw)), size


async def server_stats(c) -> dict:
    """Stats as the server reports them (without this client's own counters)."""
    return {k: v for k, v in (await c.stats()).items() if k != "client"}


def stored(redis_url: str, keys) -> set[str]:
    """Which of acme's keys are stored, read from Redis directly (a Lookup would count as a use)."""
    with redis.Redis.from_url(redis_url) as r:
        return {k for k in keys if r.exists(f"hw:acme:m:{k}")}


async def test_storing_one_more_evicts_the_least_recently_used_not_the_last_read(redis_url) -> None:
    svc, size = await quota_service(redis_url, 3.5)
    try:
        c = svc.client()
        for i, k in enumerate("abc"):
            await c.put(k, doc(i))
        assert await c.get("a") is not None  # read: a is the most recently used now
        await c.put("d", doc(3))
        assert stored(redis_url, "abcd") == {"a", "c", "d"}
        assert await c.lookup(["c"]) == 1  # looked up: c (the oldest) is used; a is the oldest now
        await c.put("e", doc(4))
        assert stored(redis_url, "acde") == {"c", "d", "e"}
        st = await c.stats()
        assert (st["evictions"], st["evicted_bytes"], st["segments"]) == (2, 2 * size, 3)
        assert st["tenant_bytes"] <= st["quota_bytes"] == int(3.5 * size)
        assert svc.metrics.value("headwise_kvstore_evictions_total", tenant="acme") == 2
        assert svc.metrics.value("headwise_kvstore_evicted_bytes_total", tenant="acme") == 2 * size
        assert svc.metrics.value("headwise_kvstore_tenant_quota_bytes", tenant="acme") == int(3.5 * size)
        assert_same(await c.get("c"), doc(2))
    finally:
        await svc.close()


async def test_eight_concurrent_puts_never_take_usage_over_the_quota(redis_url) -> None:
    svc, size = await quota_service(redis_url, 3)
    quota = 3 * size
    try:
        writers = [svc.client() for _ in range(8)]
        docs = [doc(i) for i in range(8)]
        seen, done = [], False

        async def watch() -> None:  # the tenant's usage as Redis holds it, while the puts run
            while not done:
                seen.append((await writers[0].stats())["tenant_bytes"])
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        sent = await asyncio.gather(*(w.put(f"doc{i}", d) for i, (w, d) in enumerate(zip(writers, docs, strict=True))))
        done = True
        await watcher
        st = await writers[0].stats()
        assert len(sent) == 8 and st["segments"] == 3 and st["tenant_bytes"] == quota and st["evictions"] == 5
        assert seen and max(seen) <= quota
        for i, d in enumerate(docs):  # what is left is whole
            got = await writers[0].get(f"doc{i}")
            assert got is None or same(got, d)
        with redis.Redis.from_url(redis_url) as r:  # evicted segments left nothing behind
            assert len(r.keys("hw:acme:m:*")) == 3 and len(r.keys("hw:acme:c:*")) == 3 * len(encode(docs[0]).chunks)
    finally:
        await svc.close()


async def test_a_document_larger_than_the_quota_is_refused_and_nothing_changes(redis_url) -> None:
    svc, size = await quota_service(redis_url, 1.5)
    try:
        c = svc.client()
        await c.put("small", doc(0))
        before = await server_stats(c)
        with pytest.raises(QuotaExceeded) as e:
            await c.put("big", doc(1, rows=1200))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in str(e.value)
        assert not INTERNAL_NAME.search(str(e.value).split(": ", 1)[1])
        after = await server_stats(c)
        assert after == before and await c.lookup(["small"]) == 1  # nothing evicted for it either
        assert svc.metrics.value("headwise_kvstore_put_refusals_total", tenant="acme", reason="too_large") == 1
    finally:
        await svc.close()


async def test_a_tenant_filling_its_quota_never_evicts_another(redis_url) -> None:
    svc, size = await quota_service(redis_url, 2)
    try:
        a, b = svc.client("acme"), svc.client("globex")
        await b.put("b1", doc(100))
        await b.put("b2", doc(101))
        b_stats = await server_stats(b)
        for i in range(8):
            await a.put(f"a{i}", doc(i))
        assert (await a.stats())["evictions"] == 6
        assert await server_stats(b) == b_stats and b_stats["evictions"] == 0
        assert_same(await b.get("b1"), doc(100))
        assert_same(await b.get("b2"), doc(101))
    finally:
        await svc.close()


async def test_a_get_whose_segment_is_evicted_mid_stream_is_a_clean_miss(redis_url) -> None:
    """Header and first chunk read, then the segment is evicted: the stream ends NOT_FOUND."""
    svc, size = await quota_service(redis_url, 1.5, rows=6000)
    try:
        c = svc.client(chunk_size=256 << 10)
        await c.put("a", doc(0, rows=6000))
        stub = pb_grpc.KVStoreStub(c._channel)
        call = stub.Get(pb.GetRequest(key="a"), metadata=((TOKEN_HEADER, TOKEN), (TENANT_HEADER, "acme")))
        it = call.__aiter__()
        head, first = await it.__anext__(), await it.__anext__()
        assert head.header.num_chunks > 40 and first.chunk.index == 0
        await c.put("b", doc(1, rows=6000))  # evicts a while its reader is at chunk 0
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in it:
                pass
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "evicted while being read" in e.value.details()
        assert await c.get("a") is None and svc.metrics.value("headwise_kvstore_misses_total", tenant="acme",
                                                               reason="vanished") == 1
    finally:
        await svc.close()


async def test_readers_racing_evictions_get_all_of_a_segment_or_a_miss(redis_url) -> None:
    svc, size = await quota_service(redis_url, 1.5, rows=1500)
    try:
        writer, reader = svc.client(chunk_size=64 << 10), svc.client()
        docs = [doc(i, rows=1500) for i in range(2)]
        seen = {"whole": 0, "miss": 0}
        done = asyncio.Event()

        async def write() -> None:  # each put evicts the other document
            for i in range(10):
                await writer.put(f"d{i % 2}", docs[i % 2])
                await asyncio.sleep(0.01)
            done.set()

        async def read(key: str, d) -> None:
            for _ in range(5000):  # as long as the writer runs, whatever the machine's load
                got = await reader.get(key)
                if got is None:
                    seen["miss"] += 1
                else:
                    assert same(got, d), "a reader saw bytes of two uploads"
                    seen["whole"] += 1
                if done.is_set():
                    return
                await asyncio.sleep(0)

        await asyncio.gather(write(), read("d0", docs[0]), read("d1", docs[1]))
        assert seen["whole"] + seen["miss"] >= 2 and (await writer.stats())["evictions"] == 9
        # the last put (d1) evicted d0: one clean miss and one whole read, whatever the interleaving was
        assert await reader.get("d0") is None and same(await reader.get("d1"), docs[1])
    finally:
        await svc.close()


def wide_recall_cache(m: int = 4000, d: int = 64) -> CompactCache:
    """One layer, one head, whose first row is merged over `m` originals: a recall entry of
    m * (8 + 2 * 4 * d) bytes, several MiB, over gRPC's message cap too."""
    gen = torch.Generator().manual_seed(7)
    n = 16
    rids = torch.full((n,), NO_RECALL, dtype=torch.long)
    rids[0] = 0
    table = RecallTable(torch.tensor([0, m]), torch.arange(m) + 100, torch.zeros(1, dtype=torch.long),
                        torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen))
    lw = torch.where(rids >= 0, torch.tensor(8.29), torch.tensor(0.0))
    layer = LayerCache.from_heads([torch.randn(n, d, generator=gen)], [torch.randn(n, d, generator=gen)],
                                  [torch.arange(n)], [lw], [rids], table)
    return CompactCache([layer], m + n)


async def test_a_recall_entry_of_several_mib_is_stored_and_recalled(service) -> None:
    c = service.client()
    cache = wide_recall_cache()
    await c.put("wide", cache)
    k, v, pos = await c.recall("wide", 0, 0, 0)
    r = cache.layers[0].recall
    assert k.shape == (4000, 64) and torch.equal(k, r.keys) and torch.equal(v, r.values)
    assert torch.equal(pos, r.positions)
    assert (await c.stats())["tenant_bytes"] > 4000 * 64 * 2 * 4  # the entry counts against the quota


async def test_recall_pieces_out_of_order_are_invalid_argument(service) -> None:
    c = service.client()
    seg = encode(big_cache(rows=8))
    stub = pb_grpc.KVStoreStub(c._channel if c._channel else (c.stub and c._channel))

    async def reqs():
        yield pb.PutRequest(header=pb.PutHeader(key="k", header=seg.header, num_chunks=len(seg.chunks),
                                                total_bytes=sum(map(len, seg.chunks))))
        for i, ch in enumerate(seg.chunks):
            yield pb.PutRequest(chunk=pb.Chunk(index=i, data=ch))
        yield pb.PutRequest(recall=pb.RecallEntry(layer=0, head=0, row=0, data=b"x", part=1, parts=2))

    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Put(reqs(), metadata=((TOKEN_HEADER, TOKEN), (TENANT_HEADER, "acme")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "out of order" in e.value.details()
    assert not INTERNAL_NAME.search(e.value.details())
    assert await c.lookup(["k"]) == 0


async def test_a_full_redis_under_noeviction_refuses_puts_and_keeps_serving_reads(own_redis) -> None:
    """The policy k8s sets: Redis never evicts by itself; at maxmemory a put is refused whole."""
    svc = await start_service(settings(own_redis.url))
    try:
        c = svc.client()
        await c.put("kept", doc(0))
        with redis.Redis.from_url(own_redis.url) as r:
            used = r.info("memory")["used_memory"]
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", used + (256 << 10))
            with pytest.raises(QuotaExceeded) as e:
                await c.put("more", doc(1, rows=3000))
            assert "maxmemory" in str(e.value) and not INTERNAL_NAME.search(str(e.value).split(": ", 1)[1])
            assert await c.lookup(["more"]) == 0 and not r.keys("hw:acme:c:*")[len(encode(doc(0)).chunks):]
            assert svc.metrics.value("headwise_kvstore_put_refusals_total", tenant="acme", reason="store_full") == 1
            r.config_set("maxmemory", used // 2)  # over it: every write that adds memory is refused
            assert_same(await c.get("kept"), doc(0))  # reads (and their LRU touch) still work
            assert await c.lookup(["kept"]) == 1 and (await c.recall("kept", 0, 0, 0)) is None
            r.config_set("maxmemory", 0)
        await c.put("more", doc(1, rows=3000))  # room again: stored
        assert await c.lookup(["more"]) == 1
    finally:
        await svc.close()


async def test_a_commit_refused_at_maxmemory_changes_nothing(own_redis) -> None:
    """Chunks staged, then Redis fills: the commit script's first write is refused, so nothing of
    it (evictions included) happens."""
    from services.kvstore.backend import Limits, StoreFull
    from services.kvstore.redis_backend import RedisBackend

    b = RedisBackend(own_redis.url, deadline_s=30)  # a loaded machine: no 2 s deadline flake
    try:
        seg0, seg = encode(doc(0)), encode(doc(1))
        w = await b.begin_put("acme", "first", seg0.header, len(seg0.chunks), sum(map(len, seg0.chunks)), Limits())
        for i, ch in enumerate(seg0.chunks):
            await w.chunk(i, ch)
        await w.commit()
        quota = Limits(quota_bytes=seg0.nbytes + 10)  # the second put would evict the first
        w = await b.begin_put("acme", "second", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), quota)
        for i, ch in enumerate(seg.chunks):
            await w.chunk(i, ch)
        with redis.Redis.from_url(own_redis.url) as r:
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", r.info("memory")["used_memory"] // 2)
            with pytest.raises(StoreFull):
                await w.commit()
            r.config_set("maxmemory", 0)
        m = await b.manifest("acme", "first")
        assert m is not None and await b.chunks("acme", m, 0, m.num_chunks) == seg0.chunks
        assert await b.manifest("acme", "second") is None and (await b.evictions("acme")).segments == 0
    finally:
        await b.close()


async def test_the_store_warns_when_redis_could_evict_across_tenants(own_redis, caplog) -> None:
    with redis.Redis.from_url(own_redis.url) as r:
        r.config_set("maxmemory", 1 << 30)
        r.config_set("maxmemory-policy", "allkeys-lru")
        with caplog.at_level("WARNING", logger="services.kvstore.server"):
            svc = await start_service(settings(own_redis.url))
            await svc.close()
        assert "maxmemory-policy allkeys-lru" in caplog.text and "noeviction" in caplog.text
        caplog.clear()
        r.config_set("maxmemory-policy", "noeviction")
        with caplog.at_level("WARNING", logger="services.kvstore.server"):
            svc = await start_service(settings(own_redis.url))
            await svc.close()
        assert "maxmemory-policy" not in caplog.text
