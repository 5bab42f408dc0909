"""The store on a Redis Cluster of three masters: where keys go, and one master dying."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from services.kvstore.backend import BackendUnavailable, Limits
from services.kvstore.redis_cluster_backend import RedisClusterBackend, startup_nodes
from tests.fixtures.redis_cluster import RedisClusterProcs

pytestmark = pytest.mark.slow
LIMITS = Limits(quota_bytes=0, ttl_s=0)
TENANTS = [f"t{i}" for i in range(12)]


async def put(b: RedisClusterBackend, tenant: str, key: str, chunks: int = 3) -> None:
    w = await b.begin_put(tenant, key, b"header", chunks, chunks * 100, LIMITS)
    for i in range(chunks):
        await w.chunk(i, bytes([i]) * 100)
    await w.commit()


def keys_by_port(c: RedisClusterProcs) -> dict[int, list[bytes]]:
    out = {}
    for p in c.ports:
        with redis.Redis(c.host, p) as r:
            out[p] = r.keys("hw:*")
    return out


def test_url_names_the_startup_nodes() -> None:
    assert startup_nodes("rediscluster://10.0.0.1:7000,10.0.0.2:7001") == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    for bad in ("redis://a:1", "rediscluster://", "rediscluster://a"):
        with pytest.raises(ValueError):
            startup_nodes(bad)


async def test_a_tenants_keys_share_one_master_and_tenants_spread(redis_cluster_url, redis_cluster_procs) -> None:
    b = RedisClusterBackend(redis_cluster_url)
    try:
        for t in TENANTS:
            await put(b, t, "doc")
    finally:
        await b.close()
    where: dict[str, set[int]] = {}
    for port, keys in keys_by_port(redis_cluster_procs).items():
        for k in keys:
            where.setdefault(k.split(b"}")[0].split(b"{")[1].decode(), set()).add(port)
    assert set(where) == set(TENANTS)
    assert all(len(ports) == 1 for ports in where.values()), where  # chunks, manifest, index together
    assert len(set().union(*where.values())) == 3  # 12 tenants over all three masters


@pytest.fixture
def own_cluster():
    c = RedisClusterProcs().start()
    yield c
    c.stop()


async def test_one_master_dies_other_tenants_go_on(own_cluster) -> None:
    b = RedisClusterBackend(own_cluster.url, deadline_s=1.0)
    try:
        for t in TENANTS:
            await put(b, t, "doc")
        home = {t: p for p, keys in keys_by_port(own_cluster).items() for t in TENANTS if f"hw:{{{t}}}:m:doc".encode() in keys}
        dead = own_cluster.ports[0]
        own_cluster.kill(dead)
        lost, kept = [t for t in TENANTS if home[t] == dead], [t for t in TENANTS if home[t] != dead]
        assert lost and kept
        # redis-py refreshes its slot map on the first connection error: that one call may fail
        # for any tenant (the services' client retries it); every later one for a kept tenant works
        try:
            await b.manifest(kept[0], "doc")
        except BackendUnavailable:
            pass
        for t in kept:  # their segments are still whole and still take puts
            assert (await b.manifest(t, "doc")) is not None
            await put(b, t, "after")
        for t in lost:  # an error within the deadline, never a wrong answer
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await asyncio.wait_for(b.manifest(t, "doc"), 30)
            assert time.monotonic() - t0 < 30
        own_cluster.restart(dead)  # no persistence: it comes back empty, and takes puts again
        t0 = time.monotonic()
        while True:
            try:
                await put(b, lost[0], "again")
                break
            except BackendUnavailable:
                assert time.monotonic() - t0 < 30, "the restarted master took no put within 30 s"
                await asyncio.sleep(0.5)
        assert (await b.manifest(lost[0], "again")) is not None
        assert (await b.manifest(lost[0], "doc")) is None  # it lost its data: a miss, not corrupt data
    finally:
        await b.close()
