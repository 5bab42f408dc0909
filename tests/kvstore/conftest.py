"""KV store fixtures: backends (memory, real Redis), a running server on loopback, clients, small caches."""

from __future__ import annotations

import pytest
import torch

from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from services.kvstore.backend import MemoryBackend
from services.kvstore.client import KVStoreClient
from services.kvstore.server import close_server, create_server, start_server
from services.kvstore.settings import KVStoreSettings

TOKEN = "test-service-token"


def small_cache(seed: int = 0, layers: int = 2, lens=(7, 3), d: int = 8, dtype=torch.float32, merged: int = 2,
                start: int = 0) -> CompactCache:
    """A ragged cache whose first `merged` rows of head 0 are merged rows with recall originals."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(layers):
        keys = [torch.randn(n, d, generator=gen).to(dtype) for n in lens]
        values = [torch.randn(n, d, generator=gen).to(dtype) for n in lens]
        positions = [torch.arange(n) + start for n in lens]
        rids = [torch.full((n,), NO_RECALL, dtype=torch.long) for n in lens]
        rids[0][:merged] = torch.arange(merged)
        offsets = torch.arange(merged + 1) * 2
        table = RecallTable(offsets, torch.arange(2 * merged) + 1000, torch.zeros(merged, dtype=torch.long),
                            torch.randn(2 * merged, d, generator=gen).to(dtype),
                            torch.randn(2 * merged, d, generator=gen).to(dtype))
        lw = [torch.where(r >= 0, torch.tensor(0.693), torch.tensor(0.0)) for r in rids]
        out.append(LayerCache.from_heads(keys, values, positions, lw, rids, table))
    return CompactCache(out, start + max(lens) + 3, start, {"policy": "test", "seed": seed})


def big_cache(rows: int = 3000, layers: int = 2, seed: int = 0) -> CompactCache:
    """Several MiB: many chunks."""
    gen = torch.Generator().manual_seed(seed)
    layer = [LayerCache.from_dense(torch.randn(2, rows, 64, generator=gen), torch.randn(2, rows, 64, generator=gen),
                                   torch.arange(rows)) for _ in range(layers)]
    return CompactCache(layer, rows)


def settings(redis_url: str = "memory://", **kw) -> KVStoreSettings:
    base = dict(service_token=TOKEN, redis_url=redis_url, metrics_enabled=False, redis_deadline_s=1.0,
                tenant_ttl_s=0, tenant_quota_bytes=0)
    base.update(kw)
    return KVStoreSettings(**base)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def backend_kind(request) -> str:
    return request.param


@pytest.fixture
async def backend(backend_kind, request):
    # a live Redis's deadline: wide enough for 8 concurrent puts on a loaded 2-core machine (2 s was
    # not); the contract tests never wait on it (dead-Redis behaviour is tests/kvstore/test_failures.py's)
    deadline_s = 10.0
    if backend_kind == "memory":
        b = MemoryBackend()
    elif backend_kind == "redis-cluster":  # three masters; a tenant's keys on one of them
        from services.kvstore.redis_cluster_backend import RedisClusterBackend

        b = RedisClusterBackend(request.getfixturevalue("redis_cluster_url"), deadline_s=deadline_s)
    else:
        from services.kvstore.redis_backend import RedisBackend

        b = RedisBackend(request.getfixturevalue("redis_url"), deadline_s=deadline_s)
    yield b
    await b.close()


class Service:
    """A started server plus a way to make clients for it."""

    def __init__(self, server, port: int):
        self.server, self.port = server, port
        self.addr = f"127.0.0.1:{port}"
        self.clients: list[KVStoreClient] = []

    @property
    def metrics(self):
        return self.server.kvstore.metrics

    def client(self, tenant: str = "acme", token: str = TOKEN, **kw) -> KVStoreClient:
        c = KVStoreClient(self.addr, token, tenant, **{"timeout_s": 5.0, "retries": 1, **kw})
        self.clients.append(c)
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await close_server(self.server)


async def start_service(s: KVStoreSettings) -> Service:
    server, port = create_server("127.0.0.1:0", s)
    await start_server(server)
    return Service(server, port)


@pytest.fixture
async def service(redis_url):
    svc = await start_service(settings(redis_url))
    yield svc
    await svc.close()
