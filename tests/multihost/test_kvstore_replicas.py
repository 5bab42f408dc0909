"""Two kvstore hosts over one store host: the client balances over both and survives either dying."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest

from services.kvstore.client import KVStoreClient, channel_target
from tests.kvstore.conftest import small_cache
from tests.multihost.conftest import KV_METRICS_PORT, KV_PORT, TOKEN, start_kvstore, wait_listening
from tests.test_codec import assert_same

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def calls_served(addr: str) -> float:
    """Calls this kvstore answered, from its /metrics (every method and status)."""
    with urllib.request.urlopen(f"http://{addr}:{KV_METRICS_PORT}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("headwise_kvstore_requests_total{"))


def client(addr: str, tenant: str = "acme") -> KVStoreClient:
    return KVStoreClient(addr, TOKEN, tenant, timeout_s=2.0, retries=3)


def test_address_list_becomes_one_balanced_target() -> None:
    assert channel_target("10.0.0.1:1,10.0.0.2:2") == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("[fd00::1]:1, [fd00::2]:2") == "ipv6:[fd00::1]:1,[fd00::2]:2"
    assert channel_target("kvstore.ns.svc:50051") == "kvstore.ns.svc:50051"  # gRPC's DNS resolver, re-resolved
    assert channel_target("dns:///kv:1") == "dns:///kv:1"
    for bad in ("10.0.0.1,10.0.0.2:2", "10.0.0.1:1,[fd00::1]:2", ""):
        with pytest.raises(ValueError):
            channel_target(bad)


async def test_calls_balance_over_both_kvstore_hosts(net, kvstores) -> None:
    hosts = [net["kv1"].addr, net["kv2"].addr]
    before = [calls_served(a) for a in hosts]
    async with client(kvstores) as c:
        await c.put("bal", small_cache(1))
        for _ in range(20):
            assert await c.lookup(["bal"]) == 1
    served = [calls_served(a) - b for a, b in zip(hosts, before, strict=True)]
    assert all(n >= 5 for n in served), f"calls per kvstore host: {served}"


async def test_stored_through_one_host_is_read_through_the_other(net, kvstores) -> None:
    cache = small_cache(2)
    async with client(f"{net['kv1'].addr}:{KV_PORT}") as a, client(f"{net['kv2'].addr}:{KV_PORT}") as b:
        await a.put("cross", cache)
        assert_same(await b.get("cross"), cache, recall_data=False)


async def _serve_through(c: KVStoreClient, keys: list[str], fault, settle_s: float) -> dict:
    """Get every key in turn while `fault()` runs; every call must succeed with the stored data.
    Returns the slowest call after the fault and how long until the first call after it succeeded."""
    expected = {k: small_cache(i) for i, k in enumerate(keys)}
    for k, v in expected.items():
        await c.put(k, v)
    for k in keys:  # both connections up before the fault
        assert await c.get(k) is not None
    t_fault = time.monotonic()
    fault()
    first_ok, slowest, n = None, 0.0, 0
    while time.monotonic() - t_fault < settle_s:
        k = keys[n % len(keys)]
        t = time.monotonic()
        got = await asyncio.wait_for(c.get(k), 30)
        slowest = max(slowest, time.monotonic() - t)
        assert_same(got, expected[k], recall_data=False)
        first_ok = first_ok or time.monotonic() - t_fault
        n += 1
    return {"first_ok_s": first_ok, "slowest_s": slowest, "calls": n}


async def test_kvstore_host_dies_requests_keep_being_served(net, kvstores, store) -> None:
    kv1 = net["kv1"]
    async with client(kvstores) as c:
        r = await _serve_through(c, [f"die{i}" for i in range(4)], lambda: (kv1.die(), kv1.cut()), settle_s=6)
        print(f"kvstore host killed: {r}")
        assert r["first_ok_s"] < 5.0 and r["calls"] >= 4, r
        # back again: the channel reconnects to it in the background and sends it calls once more
        kv1.uncut()
        start_kvstore(kv1, store)
        t0, before = time.monotonic(), calls_served(kv1.addr)
        while calls_served(kv1.addr) == before:
            assert time.monotonic() - t0 < 60, "the restarted kvstore host got no calls within 60 s"
            assert await c.lookup(["die0"]) == 1
            await asyncio.sleep(0.2)
        print(f"kvstore host back: it served calls again {time.monotonic() - t0:.1f} s after it listened")


async def test_kvstore_host_cut_off_requests_keep_being_served(net, kvstores) -> None:
    """The host drops off the network with its connections open (no FIN, no RST): a call waiting
    on it times out (the client's per-call deadline) and its retry goes to the other host."""
    kv2 = net["kv2"]
    async with client(kvstores) as c:
        try:
            r = await _serve_through(c, [f"cut{i}" for i in range(4)], kv2.cut, settle_s=12)
        finally:
            kv2.uncut()
        print(f"kvstore host cut off: {r}")
        assert r["first_ok_s"] < 5.0 and r["calls"] >= 4, r
        assert r["slowest_s"] < 2.0 * 2 + 1, r  # one deadline (timeout_s) plus the retry
        wait_listening(kv2.addr, KV_PORT, 10)
