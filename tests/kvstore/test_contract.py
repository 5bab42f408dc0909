"""One contract, two backends: MemoryBackend and RedisBackend (real redis-server) pass the same tests."""

from __future__ import annotations

import asyncio

import pytest

from headwise.cache.codec import encode
from services.kvstore.backend import Limits, QuotaExceededError
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
    seg, (stored, tenant_bytes) = await put(backend, "acme", "k1")
    assert stored == seg.nbytes + len(b"originals of row 1") == tenant_bytes
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
    seg1, (s1, _) = await put(backend, "acme", "k", seed=1)
    seg2, (s2, used) = await put(backend, "acme", "k", seed=2)
    assert used == s2 and await backend.usage("acme") == (s2, 1)
    header, chunks = await read_all(backend, "acme", "k")
    assert header == seg2.header and chunks == seg2.chunks


async def test_quota_rejects_before_and_at_commit_leaving_nothing(backend) -> None:
    _, (stored, _) = await put(backend, "acme", "first")
    limits = Limits(quota_bytes=stored + stored // 2)
    with pytest.raises(QuotaExceededError, match="over its quota"):
        await put(backend, "acme", "second", seed=1, limits=limits)
    assert await backend.manifest("acme", "second") is None
    assert await backend.usage("acme") == (stored, 1)
    # declared size fits, but another put lands first: the commit re-checks
    seg = encode(small_cache(3), chunk_size=256)
    w = await backend.begin_put("acme", "third", seg.header, len(seg.chunks), sum(map(len, seg.chunks)),
                                Limits(quota_bytes=2 * stored + 100))
    for i, c in enumerate(seg.chunks):
        await w.chunk(i, c)
    await put(backend, "acme", "racer", seed=4)
    with pytest.raises(QuotaExceededError):
        await w.commit()
    assert await backend.manifest("acme", "third") is None
    assert (await backend.usage("acme"))[1] == 2
    # another tenant's quota is its own
    await put(backend, "globex", "second", seed=1, limits=limits)


async def test_ttl_expires_segments_and_frees_quota(backend) -> None:
    _, (stored, _) = await put(backend, "acme", "k", limits=Limits(ttl_s=0.3))
    await put(backend, "acme", "forever")
    assert await backend.lookup("acme", ["k"]) == 1
    for _ in range(50):
        if await backend.lookup("acme", ["k"]) == 0:
            break
        await asyncio.sleep(0.1)
    assert await read_all(backend, "acme", "k") is None
    assert await backend.recall("acme", "k", 0, 0, 1) is None
    _, n = await backend.usage("acme")
    assert n == 1
    # the expired segment no longer counts against the quota
    await put(backend, "acme", "k2", limits=Limits(quota_bytes=2 * stored + 10))


async def test_semaphore_counts_slots_renews_releases_and_lapses(backend) -> None:
    assert await backend.acquire("acme", "streams", "a", 2, 30) == (True, 1)
    assert await backend.acquire("acme", "streams", "b", 2, 30) == (True, 2)
    assert await backend.acquire("acme", "streams", "c", 2, 30) == (False, 2)  # full
    assert await backend.acquire("acme", "streams", "a", 2, 30) == (True, 2)  # a renewal, not a new slot
    assert await backend.acquire("globex", "streams", "c", 2, 30) == (True, 1)  # tenants do not share
    assert await backend.release("acme", "streams", "a") and not await backend.release("acme", "streams", "a")
    assert await backend.acquire("acme", "streams", "c", 2, 30) == (True, 2)
    # a holder that stops renewing (a dead replica) frees its slot after ttl
    assert await backend.acquire("acme", "short", "dead", 1, 0.3) == (True, 1)
    assert (await backend.acquire("acme", "short", "next", 1, 30))[0] is False
    for _ in range(50):
        await asyncio.sleep(0.1)
        if (await backend.acquire("acme", "short", "next", 1, 30))[0]:
            break
    assert await backend.acquire("acme", "short", "next", 1, 30) == (True, 1)
    assert not await backend.release("acme", "short", "dead")


async def test_records_round_trip_isolated_and_expire(backend) -> None:
    await backend.put_record("acme", "s-1", b"\x00state\xff" * 100, 30)
    await backend.put_record("acme", "s-2", b"short", 0.3)
    assert await backend.get_record("acme", "s-1") == b"\x00state\xff" * 100
    assert await backend.get_record("globex", "s-1") is None and await backend.get_record("acme", "nope") is None
    await backend.put_record("acme", "s-1", b"replaced", 30)
    assert await backend.get_record("acme", "s-1") == b"replaced"
    for _ in range(50):
        if await backend.get_record("acme", "s-2") is None:
            break
        await asyncio.sleep(0.1)
    assert await backend.get_record("acme", "s-2") is None
    assert await backend.lookup("acme", ["s-1"]) == 0 and (await backend.usage("acme")) == (0, 0)  # not segments
