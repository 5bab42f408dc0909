"""RedisBackend: the store's Backend over a real Redis (async redis-py, pipelined).

Layout, one namespace per tenant (`hw:{tenant}:`; tenant ids cannot contain ':'):

  hw:{t}:c:{upload}:{i}   chunk frame i of one put (string)
  hw:{t}:r:{upload}       recall blobs of that put (hash, field "layer:head:row")
  hw:{t}:m:{key}          manifest (hash: u=upload, h=codec header, n=chunks, b=chunk bytes, s=stored bytes)
  hw:{t}:idx              live segments (zset: key -> expiry in ms since the epoch, +inf = none)
  hw:{t}:sz               stored bytes per segment (hash: key -> bytes), for the quota

A put streams its chunks to per-upload keys with a staging TTL as they arrive (pipelined,
one batch in flight while the next is received). Nothing refers to them until the commit,
one MULTI/EXEC under WATCH of the tenant's index and the manifest: it gives chunks and
recall blobs the tenant's TTL, drops expired index entries, records the size and writes
the manifest last. A quota failure or an aborted stream deletes the staged keys; if the
server dies first, the staging TTL removes them. Readers start from the manifest, so they
see a whole segment or none; a segment replaced or deleted under a reader gives a miss.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from services.kvstore.backend import BackendUnavailable, Limits, Manifest, QuotaExceededError, recall_field

STAGING_TTL_MS = 3_600_000  # staged chunks of a put that never commits vanish after an hour
FLUSH_BYTES = 4 << 20  # chunk bytes per pipelined write
COMMIT_RETRIES = 50
_CLEANUPS: set[asyncio.Task] = set()  # aborted puts still deleting their staged keys


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, deadline_s: float = 2.0):
        self.url = url
        self.deadline_s = deadline_s
        self.r = aioredis.Redis.from_url(
            url, socket_timeout=deadline_s, socket_connect_timeout=deadline_s, decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1), health_check_interval=0,
        )

    # ---- plumbing -----------------------------------------------------------------
    @asynccontextmanager
    async def guard(self, what: str):
        """Redis errors and slowness past the deadline become BackendUnavailable."""
        try:
            async with asyncio.timeout(self.deadline_s):
                yield
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as e:
            where = self.url.rsplit("@", 1)[-1]
            raise BackendUnavailable(f"redis at {where} failed {what} within {self.deadline_s} s: "
                                     f"{type(e).__name__}: {e}") from None

    @staticmethod
    def _ns(tenant: str) -> str:
        return f"hw:{tenant}"

    def _mkey(self, tenant: str, key: str) -> str:
        return f"{self._ns(tenant)}:m:{key}"

    def _ckey(self, tenant: str, upload: str, i: int) -> str:
        return f"{self._ns(tenant)}:c:{upload}:{i}"

    def _rkey(self, tenant: str, upload: str) -> str:
        return f"{self._ns(tenant)}:r:{upload}"

    # ---- put ----------------------------------------------------------------------
    async def begin_put(self, tenant, key, header, num_chunks, total_bytes, limits: Limits) -> "_RedisWriter":
        need = len(header) + total_bytes
        if limits.quota_bytes:
            used = await self._used_except(tenant, key)
            if used + need > limits.quota_bytes:
                raise QuotaExceededError(tenant, used, need, limits.quota_bytes)
        return _RedisWriter(self, tenant, key, header, num_chunks, limits, os.urandom(8).hex())

    async def _used_except(self, tenant: str, key: str) -> int:
        async with self.guard("a usage read"):
            live = await self.r.zrangebyscore(f"{self._ns(tenant)}:idx", _now_ms(), "+inf")
            live = [k for k in live if k != key.encode()]
            sizes = await self.r.hmget(f"{self._ns(tenant)}:sz", live) if live else []
        return sum(int(s or 0) for s in sizes)

    # ---- reads --------------------------------------------------------------------
    async def manifest(self, tenant, key):
        async with self.guard("a manifest read"):
            h = await self.r.hgetall(self._mkey(tenant, key))
        if not h:
            return None
        return Manifest(key, h[b"u"].decode(), h[b"h"], int(h[b"n"]), int(h[b"b"]), int(h[b"s"]))

    async def chunks(self, tenant, m, start, stop):
        async with self.guard(f"a read of chunks {start}..{stop - 1}"):
            return await self.r.mget([self._ckey(tenant, m.upload, i) for i in range(start, stop)])

    async def lookup(self, tenant, keys):
        if not keys:
            return 0
        async with self.guard("a lookup"):
            pipe = self.r.pipeline(transaction=False)
            for k in keys:
                pipe.exists(self._mkey(tenant, k))
            found = await pipe.execute()
        n = 0
        while n < len(found) and found[n]:
            n += 1
        return n

    async def recall(self, tenant, key, layer, head, row):
        async with self.guard("a recall read"):
            upload = await self.r.hget(self._mkey(tenant, key), "u")
            if upload is None:
                return None
            return await self.r.hget(self._rkey(tenant, upload.decode()), recall_field(layer, head, row))

    async def usage(self, tenant):
        ns = self._ns(tenant)
        async with self.guard("a usage read"):
            live = await self.r.zrangebyscore(f"{ns}:idx", _now_ms(), "+inf")
            sizes = await self.r.hmget(f"{ns}:sz", live) if live else []
        return sum(int(s or 0) for s in sizes), len(live)

    # ---- delete -------------------------------------------------------------------
    async def delete(self, tenant, key):
        ns, mkey = self._ns(tenant), self._mkey(tenant, key)
        async with self.guard("a delete"), self.r.pipeline(transaction=True) as pipe:
            for _ in range(COMMIT_RETRIES):
                try:
                    await pipe.watch(mkey)
                    old = await pipe.hgetall(mkey)
                    if not old:
                        await pipe.unwatch()
                        return False
                    pipe.multi()
                    self._drop_upload(pipe, tenant, old)
                    pipe.delete(mkey)
                    pipe.zrem(f"{ns}:idx", key)
                    pipe.hdel(f"{ns}:sz", key)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        raise BackendUnavailable(f"delete of {key!r} lost {COMMIT_RETRIES} races with concurrent writers")

    def _drop_upload(self, pipe, tenant: str, manifest: dict) -> None:
        upload = manifest[b"u"].decode()
        pipe.delete(*[self._ckey(tenant, upload, i) for i in range(int(manifest[b"n"]))], self._rkey(tenant, upload))

    async def ping(self):
        async with self.guard("PING"):
            await self.r.ping()

    async def close(self):
        await self.r.aclose()


@dataclass
class _RedisWriter:
    store: RedisBackend
    tenant: str
    key: str
    header: bytes
    num_chunks: int
    limits: Limits
    upload: str
    _pending: list[tuple[str, str | None, bytes]] = field(default_factory=list)
    _pending_bytes: int = 0
    _inflight: asyncio.Task | None = None
    _chunk_bytes: int = 0
    _recall_bytes: int = 0
    _has_recall: bool = False

    async def chunk(self, index, data):
        self._pending.append((self.store._ckey(self.tenant, self.upload, index), None, data))
        self._chunk_bytes += len(data)
        await self._add(len(data))

    async def recall(self, layer, head, row, data):
        self._pending.append((self.store._rkey(self.tenant, self.upload), recall_field(layer, head, row), data))
        self._recall_bytes += len(data)
        self._has_recall = True
        await self._add(len(data))

    async def _add(self, n: int) -> None:
        self._pending_bytes += n
        if self._pending_bytes >= FLUSH_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        """Send the pending batch; at most one batch in flight, so receiving overlaps writing."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if self._inflight is not None:
            task, self._inflight = self._inflight, None
            await task
        if batch:
            self._inflight = asyncio.ensure_future(self._write(batch))

    async def _write(self, batch) -> None:
        async with self.store.guard("a chunk write"):
            pipe = self.store.r.pipeline(transaction=False)
            for k, f, data in batch:
                if f is None:
                    pipe.set(k, data, px=STAGING_TTL_MS)
                else:
                    pipe.hset(k, f, data)
                    pipe.pexpire(k, STAGING_TTL_MS)
            await pipe.execute()

    async def commit(self):
        stored = len(self.header) + self._chunk_bytes + self._recall_bytes
        try:
            await self._flush()
            await self._flush()  # waits for the last batch
            async with self.store.guard("the commit"):
                return stored, await self._commit(stored)
        except BaseException:
            await self.abort()
            raise

    async def _commit(self, stored: int) -> int:
        st, t = self.store, self.tenant
        ns, mkey = st._ns(t), st._mkey(t, self.key)
        ttl_ms = int(self.limits.ttl_s * 1000)
        async with st.r.pipeline(transaction=True) as pipe:
            for _ in range(COMMIT_RETRIES):
                try:
                    await pipe.watch(f"{ns}:idx", mkey)
                    now = _now_ms()
                    expired = await pipe.zrangebyscore(f"{ns}:idx", "-inf", now)
                    live = [k for k in await pipe.zrangebyscore(f"{ns}:idx", now + 1, "+inf") if k != self.key.encode()]
                    used = sum(int(s or 0) for s in (await pipe.hmget(f"{ns}:sz", live) if live else []))
                    if self.limits.quota_bytes and used + stored > self.limits.quota_bytes:
                        await pipe.unwatch()
                        raise QuotaExceededError(t, used, stored, self.limits.quota_bytes)
                    old = await pipe.hgetall(mkey)
                    pipe.multi()
                    self._queue_commit(pipe, ns, mkey, ttl_ms, now, expired, old, stored)
                    await pipe.execute()
                    return used + stored
                except WatchError:
                    continue
        raise BackendUnavailable(f"put of {self.key!r} lost {COMMIT_RETRIES} races with concurrent writers")

    def _queue_commit(self, pipe, ns, mkey, ttl_ms, now, expired, old, stored) -> None:
        st, t = self.store, self.tenant
        keep = [st._ckey(t, self.upload, i) for i in range(self.num_chunks)]
        if self._has_recall:
            keep.append(st._rkey(t, self.upload))
        for k in keep:
            pipe.pexpire(k, ttl_ms) if ttl_ms else pipe.persist(k)
        if old and old[b"u"].decode() != self.upload:
            st._drop_upload(pipe, t, old)
        if expired:
            pipe.zrem(f"{ns}:idx", *expired)
            pipe.hdel(f"{ns}:sz", *expired)
        pipe.zadd(f"{ns}:idx", {self.key: now + ttl_ms if ttl_ms else math.inf})
        pipe.hset(f"{ns}:sz", self.key, stored)
        pipe.delete(mkey)
        pipe.hset(mkey, mapping={"u": self.upload, "h": self.header, "n": self.num_chunks,
                                 "b": self._chunk_bytes, "s": stored})
        if ttl_ms:
            pipe.pexpire(mkey, ttl_ms)

    async def abort(self):
        """Delete whatever was staged (best effort: the staging TTL covers a dead Redis).

        Runs as its own task: the Put handler is usually being cancelled (client gone), and
        the cleanup must finish even if that cancellation interrupts the wait for it."""
        task = asyncio.ensure_future(self._cleanup())
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
        await asyncio.shield(task)

    async def _cleanup(self) -> None:
        task, self._inflight, self._pending = self._inflight, None, []
        if task is not None:  # let a write in flight land first, so the delete below catches it
            await asyncio.gather(task, return_exceptions=True)
        st = self.store
        keys = [st._ckey(self.tenant, self.upload, i) for i in range(self.num_chunks)]
        keys.append(st._rkey(self.tenant, self.upload))
        try:
            async with st.guard("cleanup of an aborted put"):
                await st.r.delete(*keys)
        except BackendUnavailable:
            pass
