"""A kvstore host over a three-master Redis Cluster on the store host; one master dies."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from services.kvstore.client import StoreUnavailable
from tests.fixtures.redis_cluster import RedisClusterProcs
from tests.kvstore.conftest import small_cache
from tests.multihost.conftest import TOKEN, host_env, wait_listening
from tests.test_codec import assert_same

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
PORTS, KV_CLUSTER_PORT = [7000, 7001, 7002], 50052
TENANTS = [f"t{i}" for i in range(9)]


@pytest.fixture(scope="module")
def cluster_store(net):
    """(the Redis Cluster on the store host, the address of a kvstore on kv1 over it)."""
    import sys

    store, kv = net["store"], net["kv1"]
    c = RedisClusterProcs(host=store.addr, ports=list(PORTS), popen=lambda args: store.popen(args, "rcluster.log"))
    c.start()
    try:
        p = kv.popen([sys.executable, "-m", "services.kvstore", "--host", kv.addr, "--port", str(KV_CLUSTER_PORT),
                      "--redis-url", c.url, "--no-metrics"], "kvstore-cluster.log", env=host_env(HEADWISE_TENANT_TTL_S="0"))
        wait_listening(kv.addr, KV_CLUSTER_PORT, 60, p)
        yield c, f"{kv.addr}:{KV_CLUSTER_PORT}"
    finally:
        c.stop()


def home_master(c: RedisClusterProcs, tenant: str) -> int:
    for port in c.ports:
        with redis.Redis(c.host, port) as r:
            if f"hw:{{{tenant}}}:m:doc".encode() in r.keys("hw:*:m:*"):  # this node's own keys
                return port
    raise AssertionError(f"no master holds {tenant}'s manifest")


async def test_a_master_dies_other_tenants_keep_their_documents(cluster_store) -> None:
    from services.kvstore.client import KVStoreClient

    c, addr = cluster_store
    clients = {t: KVStoreClient(addr, TOKEN, t, timeout_s=2.0, retries=3) for t in TENANTS}
    try:
        for i, t in enumerate(TENANTS):
            await clients[t].put("doc", small_cache(i))
        home = {t: home_master(c, t) for t in TENANTS}
        dead = c.ports[0]
        c.kill(dead)
        t_fault = time.monotonic()
        kept, lost = [t for t in TENANTS if home[t] != dead], [t for t in TENANTS if home[t] == dead]
        assert kept and lost, home
        for t in kept:  # every document not on the dead master is still served, whole
            assert_same(await asyncio.wait_for(clients[t].get("doc"), 30), small_cache(TENANTS.index(t)),
                        recall_data=False)
        for t in lost:  # UNAVAILABLE within the retries' deadlines: the services then recompute
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(clients[t].get("doc"), 30)
            assert time.monotonic() - t0 < 4 * 2.0 + 2
        print(f"redis master killed: {len(kept)} tenants kept, {len(lost)} on the dead master; "
              f"checked {time.monotonic() - t_fault:.1f} s")
        c.restart(dead)
        t0 = time.monotonic()
        while True:  # the restarted master is empty; it takes puts, and reuse resumes
            try:
                await clients[lost[0]].put("doc", small_cache(99))
                break
            except StoreUnavailable:
                assert time.monotonic() - t0 < 30, "the restarted master took no put within 30 s"
                await asyncio.sleep(0.5)
        print(f"redis master back: puts of its tenants worked {time.monotonic() - t0:.1f} s after it rejoined")
        assert_same(await clients[lost[0]].get("doc"), small_cache(99), recall_data=False)
    finally:
        for cl in clients.values():
            await cl.close()
