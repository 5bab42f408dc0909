"""One contract, two backends: MemoryBackend and RedisBackend (real redis-server) pass the same tests."""

from __future__ import annotations

import asyncio

import pytest

from headwise.cache.codec import encode
from services.kvstore.backend import Evicted, Limits, SegmentTooLarge
from tests.kvstore.conftest import small_cache

NO_LIMITS = Limits()


async def put(backend, tenant: str, key: str, seed: int = 0, limits: Limits = NO_LIMITS, recall: bool = True):
    seg = encode(small_cache(seed), chunk_size=256)
    w = await backend.begin_put(tenant, key, seg.header, len(seg.chunks), sum(map(len, seg.chunks)), limits)
    for i, c in enumerate(seg.chunks):
        await w.chunk(i, c)
    if recall:
        await w.recall(0, 0, 1, b"originals of row 1")
    return seg, await w.commit()


async def read_all(backend, tenant: str, key: str) -> tuple[bytes, list[bytes]] | None:
    m = await backend.manifest(tenant, key)
    if m is None:
        return None
    return m.header, await backend.chunks(tenant, m, 0, m.num_chunks)


async def test_round_trip_is_byte_exact(backend) -> None:
    seg, (stored, tenant_bytes, evicted) = await put(backend, "acme", "k1")
    assert stored == seg.nbytes + len(b"originals of row 1") == tenant_bytes and evicted == Evicted()
    header, chunks = await read_all(backend, "acme", "k1")
    assert header == seg.header and chunks == seg.chunks and len(chunks) > 3
    m = await backend.manifest("acme", "k1")
    assert (m.num_chunks, m.total_bytes, m.stored_bytes) == (len(seg.chunks), sum(map(len, seg.chunks)), stored)
    assert await backend.chunks("acme", m, 2, 4) == seg.chunks[2:4]


async def test_invisible_until_commit_and_abort_leaves_nothing(backend) -> None:
    seg = encode(small_cache(), chunk_size=256)
    w = await backend.begin_put("acme", "k", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), NO_LIMITS)
    for i, c in enumerate(seg.chunks[:-1]):
        await w.chunk(i, c)
        assert await backend.manifest("acme", "k") is None
        assert await backend.lookup("acme", ["k"]) == 0
    await w.abort()
    assert await backend.manifest("acme", "k") is None
    assert await backend.usage("acme") == (0, 0)


async def test_lookup_finds_the_longest_stored_prefix(backend) -> None:
    for k in ("a", "b", "d"):
        await put(backend, "acme", k)
    assert await backend.lookup("acme", ["a", "b", "c", "d"]) == 2
    assert await backend.lookup("acme", ["a", "b", "d"]) == 3
    assert await backend.lookup("acme", ["x", "a"]) == 0
    assert await backend.lookup("acme", []) == 0


async def test_tenants_are_isolated(backend) -> None:
    await put(backend, "acme", "shared-name")
    assert await backend.manifest("globex", "shared-name") is None
    assert await backend.lookup("globex", ["shared-name"]) == 0
    assert await backend.recall("globex", "shared-name", 0, 0, 1) is None
    assert await backend.delete("globex", "shared-name") is False
    assert await backend.usage("globex") == (0, 0)
    assert await backend.manifest("acme", "shared-name") is not None


async def test_recall_entries(backend) -> None:
    await put(backend, "acme", "k")
    assert await backend.recall("acme", "k", 0, 0, 1) == b"originals of row 1"
    assert await backend.recall("acme", "k", 0, 0, 2) is None
    assert await backend.recall("acme", "other", 0, 0, 1) is None


async def test_delete_removes_everything(backend) -> None:
    await put(backend, "acme", "k")
    assert await backend.delete("acme", "k") is True
    assert await read_all(backend, "acme", "k") is None
    assert await backend.recall("acme", "k", 0, 0, 1) is None
    assert await backend.delete("acme", "k") is False
    assert await backend.usage("acme") == (0, 0)


async def test_replacing_a_key_counts_it_once(backend) -> None:
    seg1, (s1, _, _) = await put(backend, "acme", "k", seed=1)
    seg2, (s2, used, _) = await put(backend, "acme", "k", seed=2)
    assert used == s2 and await backend.usage("acme") == (s2, 1)
    header, chunks = await read_all(backend, "acme", "k")
    assert header == seg2.header and chunks == seg2.chunks


async def test_a_segment_larger_than_the_quota_is_refused_leaving_everything_as_it_was(backend) -> None:
    seg0, (stored, _, _) = await put(backend, "acme", "first")
    seg = encode(small_cache(1), chunk_size=256)
    declared = len(seg.header) + sum(map(len, seg.chunks))
    with pytest.raises(SegmentTooLarge, match="larger than tenant 'acme'"):  # refused before any chunk
        await backend.begin_put("acme", "big", seg.header, len(seg.chunks), declared - len(seg.header),
                                Limits(quota_bytes=declared - 1))
    # the declared chunks fit, the recall entries take it over: refused at the commit, nothing evicted
    with pytest.raises(SegmentTooLarge):
        await put(backend, "acme", "big", seed=1, limits=Limits(quota_bytes=declared + 5))
    assert await backend.manifest("acme", "big") is None
    assert await backend.usage("acme") == (stored, 1) and await read_all(backend, "acme", "first") == (
        seg0.header, seg0.chunks)
    assert await backend.evictions("acme") == Evicted()


async def test_a_full_quota_evicts_the_least_recently_used_segments(backend) -> None:
    _, (size, _, _) = await put(backend, "acme", "a")
    quota = Limits(quota_bytes=3 * size + size // 2)  # room for three
    for k in ("b", "c"):
        await put(backend, "acme", k, limits=quota)
    assert await backend.manifest("acme", "a") is not None  # a Get: a is now the most recent
    _, (_, used, evicted) = await put(backend, "acme", "d", limits=quota)
    assert evicted == Evicted(1, size) and used == 3 * size
    assert await backend.lookup("acme", ["b"]) == 0 and await backend.lookup("acme", ["a"]) == 1  # a looked up
    assert await backend.recall("acme", "c", 0, 0, 1) is not None  # a Recall: order now d, a, c
    _, (_, _, evicted) = await put(backend, "acme", "e", limits=quota)
    assert evicted == Evicted(1, size) and await backend.lookup("acme", ["d"]) == 0
    assert {k for k in "abcde" if await backend.lookup("acme", [k])} == {"a", "c", "e"}
    assert await read_all(backend, "acme", "d") is None and await backend.recall("acme", "d", 0, 0, 1) is None
    # one put may need several evictions; its own older version is replaced, not evicted
    _, (_, used, evicted) = await put(backend, "acme", "e", seed=5, limits=Limits(quota_bytes=size + 10))
    assert evicted == Evicted(2, 2 * size) and used == size and await backend.usage("acme") == (size, 1)
    assert await backend.evictions("acme") == Evicted(4, 4 * size)


async def test_concurrent_puts_never_take_usage_over_the_quota(backend) -> None:
    _, (size, _, _) = await put(backend, "acme", "probe")
    await backend.delete("acme", "probe")
    quota = Limits(quota_bytes=3 * size)
    segs = [encode(small_cache(i), chunk_size=256) for i in range(8)]
    writers = [await backend.begin_put("acme", f"doc{i}", s.header, len(s.chunks), sum(map(len, s.chunks)), quota)
               for i, s in enumerate(segs)]

    async def upload(w, seg):
        for i, c in enumerate(seg.chunks):
            await w.chunk(i, c)
            await asyncio.sleep(0)
        await w.recall(0, 0, 1, b"originals of row 1")
        return await w.commit()

    results = await asyncio.gather(*(upload(w, s) for w, s in zip(writers, segs, strict=True)))
    assert all(used <= quota.quota_bytes for _, used, _ in results)
    assert sum(e.segments for _, _, e in results) == 5 and await backend.usage("acme") == (3 * size, 3)
    for i, seg in enumerate(segs):  # whatever is left is whole
        got = await read_all(backend, "acme", f"doc{i}")
        assert got is None or got == (seg.header, seg.chunks)


async def test_a_tenant_filling_its_quota_never_evicts_another_tenant(backend) -> None:
    kept = {k: (await put(backend, "globex", k, seed=i))[0] for i, k in enumerate(("g1", "g2"))}
    _, (size, _, _) = await put(backend, "acme", "a0")
    for i in range(1, 8):
        await put(backend, "acme", f"a{i}", seed=i, limits=Limits(quota_bytes=2 * size))
    assert await backend.evictions("acme") == Evicted(6, 6 * size) and await backend.evictions("globex") == Evicted()
    for k, seg in kept.items():
        assert await read_all(backend, "globex", k) == (seg.header, seg.chunks)
    assert await backend.usage("globex") == (2 * size, 2)


async def test_a_reader_of_an_evicted_segment_gets_a_clean_miss(backend) -> None:
    seg, (size, _, _) = await put(backend, "acme", "a")
    m = await backend.manifest("acme", "a")
    first = await backend.chunks("acme", m, 0, 2)
    assert first == seg.chunks[:2]
    await put(backend, "acme", "b", seed=1, limits=Limits(quota_bytes=size + 10))  # evicts a mid-read
    assert await backend.chunks("acme", m, 2, m.num_chunks) == [None] * (m.num_chunks - 2)
    # stored again (another upload): the old reader still misses, never reads the new upload's chunks
    await put(backend, "acme", "a", seed=2, limits=Limits(quota_bytes=size + 10))
    assert await backend.chunks("acme", m, 2, m.num_chunks) == [None] * (m.num_chunks - 2)
    assert (await backend.manifest("acme", "a")).upload != m.upload


async def test_ttl_expires_segments_and_frees_quota(backend) -> None:
    # TTLs of 1.5 s: long enough that a loaded machine reaches the next line before expiry
    _, (stored, _, _) = await put(backend, "acme", "k", limits=Limits(ttl_s=1.5))
    assert await backend.lookup("acme", ["k"]) == 1
    await put(backend, "acme", "forever")
    for _ in range(100):
        if await backend.lookup("acme", ["k"]) == 0:
            break
        await asyncio.sleep(0.1)
    assert await read_all(backend, "acme", "k") is None
    assert await backend.recall("acme", "k", 0, 0, 1) is None
    _, n = await backend.usage("acme")
    assert n == 1
    # the expired segment no longer counts against the quota: nothing live is evicted for k2
    _, (_, used, evicted) = await put(backend, "acme", "k2", limits=Limits(quota_bytes=2 * stored + 10))
    assert evicted == Evicted() and used == 2 * stored and await backend.lookup("acme", ["forever"]) == 1


async def test_semaphore_counts_slots_renews_releases_and_lapses(backend) -> None:
    assert await backend.acquire("acme", "streams", "a", 2, 30) == (True, 1)
    assert await backend.acquire("acme", "streams", "b", 2, 30) == (True, 2)
    assert await backend.acquire("acme", "streams", "c", 2, 30) == (False, 2)  # full
    assert await backend.acquire("acme", "streams", "a", 2, 30) == (True, 2)  # a renewal, not a new slot
    assert await backend.acquire("globex", "streams", "c", 2, 30) == (True, 1)  # tenants do not share
    assert await backend.release("acme", "streams", "a") and not await backend.release("acme", "streams", "a")
    assert await backend.acquire("acme", "streams", "c", 2, 30) == (True, 2)
    # a holder that stops renewing (a dead replica) frees its slot after ttl
    assert await backend.acquire("acme", "short", "dead", 1, 1.5) == (True, 1)
    assert (await backend.acquire("acme", "short", "next", 1, 30))[0] is False
    for _ in range(100):
        await asyncio.sleep(0.1)
        if (await backend.acquire("acme", "short", "next", 1, 30))[0]:
            break
    assert await backend.acquire("acme", "short", "next", 1, 30) == (True, 1)
    assert not await backend.release("acme", "short", "dead")


async def test_records_round_trip_isolated_and_expire(backend) -> None:
    await backend.put_record("acme", "s-1", b"\x00state\xff" * 100, 30)
    await backend.put_record("acme", "s-2", b"short", 1.5)
    assert await backend.get_record("acme", "s-1") == b"\x00state\xff" * 100
    assert await backend.get_record("globex", "s-1") is None and await backend.get_record("acme", "nope") is None
    await backend.put_record("acme", "s-1", b"replaced", 30)
    assert await backend.get_record("acme", "s-1") == b"replaced"
    for _ in range(100):
        if await backend.get_record("acme", "s-2") is None:
            break
        await asyncio.sleep(0.1)
    assert await backend.get_record("acme", "s-2") is None
    assert await backend.lookup("acme", ["s-1"]) == 0 and (await backend.usage("acme")) == (0, 0)  # not segments
