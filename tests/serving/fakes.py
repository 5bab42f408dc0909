"""Test doubles for the serving unit tests: an in-memory store behind the KVStoreClient API.

Segments are kept as CompactCache objects (no codec); semaphores and records go to the
kvstore's own MemoryBackend, the reference the Redis backend is contract-tested against.
"""

from __future__ import annotations

from headwise.cache.codec import stored_nbytes
from headwise.cache.quant import as_stored
from services.kvstore.backend import MemoryBackend


class StoreError(Exception):
    def __init__(self, code, message: str):  # the real client's signature
        super().__init__(f"{code}: {message}")
        self.code = code


class StoreUnavailable(StoreError):
    pass


class QuotaExceeded(StoreError):
    pass


class MemoryStoreClient:
    """KVStoreClient's API over a dict shared by all tenants' clients (namespaced by tenant)."""

    def __init__(self, data: dict, tenant: str, flags: dict, backend: MemoryBackend | None = None):
        self.data, self.tenant, self.flags = data, tenant, flags
        self.backend = backend or MemoryBackend()

    def _check(self):
        if self.flags.get("down"):
            raise StoreUnavailable("UNAVAILABLE", "store is down")

    async def put(self, key, cache, precision=None):
        self._check()
        quota = self.flags.get("quota")
        if quota is not None and cache.nbytes > quota:  # the real store evicts for anything smaller
            raise QuotaExceeded("RESOURCE_EXHAUSTED", f"segment of {cache.nbytes} bytes > quota {quota}")
        if (code := self.flags.get("refuse")) is not None:  # any other refusal of the real store
            raise StoreError(code, "refused by the test")
        self.data[(self.tenant, key)] = as_stored(cache, precision).clone()  # the rows the codec gives back
        self.flags["puts"] = self.flags.get("puts", 0) + 1
        return stored_nbytes(cache, precision)

    async def get(self, key):
        self._check()
        if (code := self.flags.get("get_error")) is not None:
            raise StoreError(code, "get failed in the test")
        if key in self.flags.get("corrupt", set()):
            self.flags["corrupt"].discard(key)
            return None
        c = self.data.get((self.tenant, key))
        return c.clone() if c is not None else None

    async def lookup(self, keys):
        self._check()
        n = 0
        for k in keys:
            if (self.tenant, k) not in self.data:
                break
            n += 1
        return n

    async def recall(self, key, layer, head, row):
        self._check()
        return None

    async def delete(self, key):
        self._check()
        return self.data.pop((self.tenant, key), None) is not None

    async def stats(self):
        return {}

    async def acquire(self, name, holder, limit, ttl_s):
        self._check()
        return await self.backend.acquire(self.tenant, name, holder, limit, ttl_s)

    async def release(self, name, holder):
        self._check()
        return await self.backend.release(self.tenant, name, holder)

    async def put_record(self, key, data, ttl_s):
        self._check()
        await self.backend.put_record(self.tenant, key, data, ttl_s)

    async def get_record(self, key):
        self._check()
        return await self.backend.get_record(self.tenant, key)

    async def close(self):
        pass


class MemoryFactory:
    errors = (StoreError, StoreUnavailable, QuotaExceeded)

    def __init__(self):
        self.data: dict = {}
        self.flags: dict = {}
        self.backend = MemoryBackend()

    def __call__(self, tenant: str) -> MemoryStoreClient:
        return MemoryStoreClient(self.data, tenant, self.flags, self.backend)
