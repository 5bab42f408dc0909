"""The store breaker trips per tenant: a dead shard (one Redis Cluster master) bypasses its own tenants only."""

from __future__ import annotations

import pytest

from services.kvstore.backend import BackendUnavailable
from services.kvstore.errors import StoreUnavailable
from services.kvstore.server import create_server, start_server
from services.kvstore.settings import KVStoreSettings
from tests.fixtures.kvstore import TOKEN, FaultyBackend, LocalStore


class ShardedBackend(FaultyBackend):
    """Tenants in `dead` live on a master that is down (their calls: BackendUnavailable); counts lookups."""

    def __init__(self, dead: set[str]):
        super().__init__()
        self.dead, self.lookups = dead, {}

    async def lookup(self, tenant, keys):
        self.lookups[tenant] = self.lookups.get(tenant, 0) + 1
        if tenant in self.dead:
            raise BackendUnavailable(f"the master of {tenant}'s slot is down")
        return await super().lookup(tenant, keys)


@pytest.fixture
async def sharded():
    backend = ShardedBackend(dead={"a"})
    settings = KVStoreSettings(service_token=TOKEN, redis_url="memory://", metrics_enabled=False, tenant_ttl_s=0)
    server, port = create_server("127.0.0.1:0", settings, backend)
    await start_server(server)
    s = LocalStore(server, port, backend)
    yield s
    await s.close()


async def test_a_tenant_on_a_dead_shard_trips_only_its_own_breaker(sharded) -> None:
    stores = sharded.clients(timeout_s=2.0)
    stores.cooldown_s = 60.0
    with pytest.raises(StoreUnavailable):
        await stores.for_tenant("a").lookup(["k"])
    calls = sharded.backend.lookups["a"]
    with pytest.raises(StoreUnavailable):  # refused at once, without a call to the store
        await stores.for_tenant("a").lookup(["k"])
    assert sharded.backend.lookups["a"] == calls
    assert await stores.for_tenant("b").lookup(["k", "l"]) == 0  # another tenant's shard is up: its calls go on
    assert sharded.backend.lookups["b"] == 1
    stores.trip()  # the whole store, as a test of a dead replica does
    with pytest.raises(StoreUnavailable):
        await stores.for_tenant("b").lookup(["k"])
    assert sharded.backend.lookups["b"] == 1
