"""The KV store as prefill and decode use it: one client per tenant, and a short circuit breaker.

When the store is unreachable, every call would spend the client's retries before failing;
after one such failure the breaker answers `StoreUnavailable` at once for `cooldown_s`, so
requests go straight to the bypass path (DESIGN.md 6) instead of each waiting out timeouts.
It trips per tenant: over a sharded store (Redis Cluster keeps each tenant in one slot) a dead
master is unavailable to its own tenants only, and the others keep reusing; when the whole store
is down, each tenant pays one failed call before its requests bypass.

The store keeps reusable work, not data of record, so no store failure fails a request: a put
the store refuses (a segment larger than the tenant's whole quota, Redis full, input it rejects)
raises `NotStored`, and the caller answers from the cache it computed, as on the bypass path;
`fallback_status` names what the figures say ("not_stored" or "bypassed").
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from headwise.cache.codec import Prepared
from headwise.cache.compact import CompactCache
from services.asyncutil import settle
from services.handoff import BYPASSED, NOT_STORED
from services.kvstore.client import KVStoreClient
from services.kvstore.errors import StoreError, StoreUnavailable

log = logging.getLogger("headwise.store")


class NotStored(Exception):
    """The store refused to keep a segment; nothing of it was stored. The request goes on with
    the cache prefill computed (the message says why, for the logs; never sent to a client)."""


def fallback_status(e: Exception) -> str:
    """What Figures.store_status says when a request went on without the store after `e`."""
    return BYPASSED if isinstance(e, StoreUnavailable) else NOT_STORED


class TenantStore:
    """The store seen from one tenant's namespace, counting the bytes that cross the wire."""

    def __init__(self, client: KVStoreClient, breaker: "StoreClients", tenant: str = ""):
        self.client = client
        self.breaker = breaker
        self.tenant = tenant

    async def _call(self, name: str, *args):
        self.breaker.check(self.tenant)
        try:
            return await getattr(self.client, name)(*args)
        except StoreUnavailable:
            self.breaker.trip(self.tenant)
            raise

    async def lookup(self, keys: list[str]) -> int:
        return int(await self._call("lookup", list(keys))) if keys else 0

    async def get(self, key: str) -> CompactCache | None:
        return await self._call("get", key)

    async def put(self, key: str, cache: CompactCache | Prepared, precision: str | None = None) -> int:
        """Bytes sent, rows at `precision` (None: the cache's own dtype; a `Prepared` cache goes at
        its own); StoreUnavailable when the store is down, NotStored when it refused the segment."""
        try:
            return int(await self._call("put", key, cache, precision))
        except StoreUnavailable:
            raise
        except StoreError as e:
            log.warning("kvstore did not store segment %s: %s", key, e)
            raise NotStored(str(e)) from None

    async def delete(self, key: str) -> bool:
        return bool(await self._call("delete", key))

    async def recall(self, key: str, layer: int, head: int, row: int):
        return await self._call("recall", key, layer, head, row)

    async def stats(self) -> dict:
        return await self._call("stats")

    async def acquire(self, name: str, holder: str, limit: int, ttl_s: float) -> tuple[bool, int]:
        return await self._call("acquire", name, holder, limit, ttl_s)

    async def release(self, name: str, holder: str) -> bool:
        return bool(await self._call("release", name, holder))

    async def put_record(self, key: str, data: bytes, ttl_s: float) -> None:
        await self._call("put_record", key, data, ttl_s)

    async def get_record(self, key: str) -> bytes | None:
        return await self._call("get_record", key)

    @asynccontextmanager
    async def holding(self, name: str, holder: str, limit: int, ttl_s: float, release_timeout_s: float):
        """Keep `holder`'s acquired slot of semaphore `name` renewed (every ttl/3) while the body
        runs, and give it back before leaving, even when the body is cancelled."""
        renew = asyncio.ensure_future(self._renew(name, holder, limit, ttl_s))
        try:
            yield
        finally:
            renew.cancel()
            await settle(self.release(name, holder), release_timeout_s)

    async def _renew(self, name: str, holder: str, limit: int, ttl_s: float) -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                if not (await self.acquire(name, holder, limit, ttl_s))[0]:  # lapsed and taken meanwhile
                    log.warning("slot of %s lapsed and was taken; the work holding it goes on", name)
            except StoreError as e:
                log.warning("renewal of a slot of %s failed: %s", name, e)


class StoreClients:
    """Lazily opened KVStoreClient per tenant, and the breaker (tripped per tenant, or for all)."""

    def __init__(self, addr: str, service_token: str, timeout_s: float = 5.0, cooldown_s: float = 5.0):
        self.addr, self.token, self.timeout_s, self.cooldown_s = addr, service_token, timeout_s, cooldown_s
        self._clients: dict[str, TenantStore] = {}
        self._down_until = 0.0  # every tenant's calls bypass until then
        self._tenant_down_until: dict[str, float] = {}

    def for_tenant(self, tenant: str) -> TenantStore:
        if tenant not in self._clients:
            client = KVStoreClient(self.addr, self.token, tenant, timeout_s=self.timeout_s, retries=2)
            self._clients[tenant] = TenantStore(client, self, tenant)
        return self._clients[tenant]

    def check(self, tenant: str | None = None) -> None:
        now = time.monotonic()
        if now < self._down_until or (tenant is not None and now < self._tenant_down_until.get(tenant, 0.0)):
            raise StoreUnavailable("UNAVAILABLE", f"kvstore at {self.addr} was unreachable moments ago; bypassing it")

    def trip(self, tenant: str | None = None) -> None:
        """Bypass the store for `cooldown_s`: `tenant`'s calls, or every tenant's (None)."""
        until = time.monotonic() + self.cooldown_s
        if tenant is None:
            self._down_until = until
        else:
            self._tenant_down_until[tenant] = until

    async def close(self) -> None:
        for s in self._clients.values():
            try:
                await s.client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._clients.clear()
