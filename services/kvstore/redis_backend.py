"""RedisBackend: the store's Backend over a real Redis (async redis-py, pipelined).

Layout, one namespace per tenant (`hw:{tenant}:`; tenant ids cannot contain ':'):

  hw:{t}:c:{upload}:{i}   chunk frame i of one put (string)
  hw:{t}:r:{upload}       recall blobs of that put (hash, field "layer:head:row")
  hw:{t}:m:{key}          manifest (hash: u=upload, h=codec header, n=chunks, b=chunk bytes, s=stored bytes)
  hw:{t}:idx              live segments (zset: key -> expiry in ms since the epoch, +inf = none)
  hw:{t}:sz               stored bytes per segment (hash: key -> bytes), for the quota
  hw:{t}:lru              last use of each segment (zset: key -> the tenant's use count then)
  hw:{t}:st               the tenant's counters (hash: uses, evictions, evicted_bytes)
  hw:{t}:sem:{name}       a counting semaphore (zset: holder -> lapse time in ms, Redis's clock)
  hw:{t}:rec:{key}        a small record (string with its own TTL)

A put streams its chunks to per-upload keys with a staging TTL as they arrive. On plain
redis:// and unix:// URLs each chunk is checked (the server's verifier) and written at once from
the event loop, pipelined on one connection (`_PipeWriter`, services/kvstore/resp.py `LoopPipe`:
one writev per SET, the frame straight from the received message, no reply waited for), and the
commit script follows on the same connection. Elsewhere (TLS, Redis Cluster) 4 MiB batches, each
checked and written in one pipeline by a worker thread through a blocking client, up to two in
flight while the event loop receives the next (`_RedisWriter`). Nothing
refers to them until the commit, one Lua script (atomic, one round trip): it checks that every
staged key is there (a write refused at maxmemory or expired is never committed around), drops expired index
entries, evicts the tenant's least recently used segments until the new one fits in the quota,
gives chunks and recall blobs the tenant's TTL, deletes the key's previous upload, records the
size and writes the manifest last. An aborted stream deletes the staged keys; if the server dies
first, the staging TTL removes them. Reads that count as a use (manifest, Lookup, Recall) are
scripts too, so the use is recorded in the same round trip. Readers start from the manifest and
read chunks of its upload, so they see a whole segment or, when it is evicted, replaced or
deleted under them, a miss. Chunk frames are read back through `BulkReader`
(services/kvstore/resp.py: pipelined GETs, each value received into its own buffer) in two read
threads; redis-py's MGET for TLS URLs.

Redis's own eviction must stay off (`maxmemory-policy noeviction`, docs/deploy.md): it would pick
victims across tenants and could take a chunk from under a manifest. At maxmemory Redis refuses
writes; the store reports that as StoreFull (nothing stored) and reads go on.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry as SyncRetry

from services.kvstore.backend import (
    BackendUnavailable,
    Evicted,
    Limits,
    Manifest,
    SegmentTooLarge,
    StoreFull,
    recall_field,
)
from services.kvstore.resp import BulkReader, LoopConnections, LoopPipe, ThreadSender, command, command_head, set_head

STAGING_TTL_MS = 3_600_000  # staged chunks of a put that never commits vanish after an hour
FLUSH_BYTES = 4 << 20  # chunk bytes per pipelined write (threads); between looks at the replies (loop)
MAX_INFLIGHT = 2  # pipelined writes under way while the next batch is received
# Who sends a put's writes on plain URLs: "loop", the event loop itself (the default), or "thread",
# a worker thread per put (the loop only hands each checked chunk over and goes on receiving the
# next; measured no faster on 2 cores, where the thread's copy competes with the rest: docs/kvstore.md).
PUT_SENDERS = ("loop", "thread")
SENDER_QUEUE_BYTES = 8 << 20  # a put's chunk bytes handed to its sender thread and not yet sent
SEND_THREADS = 64  # puts whose sender threads run at once (more wait for a thread)
COMMIT_RETRIES = 50
OOM_REPLY = "used memory > 'maxmemory'"  # Redis's refusal of a write at maxmemory under noeviction

# Lua shared by the scripts below. live_usage: bytes and number of the live segments in index
# `idx` (sizes in hash `sz`) at `now` (ms), leaving out `except` (the key being replaced).
_LIVE_USAGE = """
local function live_usage(idx, sz, now, except)
  local used, n = 0, 0
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', idx, '(' .. now, '+inf')) do
    if k ~= except then used = used + tonumber(redis.call('HGET', sz, k) or 0); n = n + 1 end
  end
  return used, n
end
"""
# now: Redis's own clock in ms, so kvstore replicas with skewed clocks agree.
_REDIS_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Bytes and number of a tenant's live segments, leaving out ARGV[2]. KEYS: idx, sz. ARGV: now_ms, key.
_USAGE = _LIVE_USAGE + """
local used, n = live_usage(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {used, n}
"""

# Take or renew a semaphore slot, atomic. KEYS: the zset. ARGV: holder, limit, ttl_ms.
# Redis's own clock, so kvstore replicas with skewed clocks agree. Returns {granted, held}.
_ACQUIRE = _REDIS_NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local mine = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not mine and held >= tonumber(ARGV[2]) then return {0, held} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
if not mine then held = held + 1 end
return {1, held}
"""

# Give a slot back; 1 if the holder had a live one. KEYS: the zset. ARGV: holder.
_RELEASE = _REDIS_NOW + """
local lapse = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if lapse and tonumber(lapse) > now then return 1 end
return 0
"""

# A use of segment KEY (Get's manifest read, Recall, Lookup, a commit) for the tenant's LRU: its
# score in `lru` becomes the tenant's next use count (`st` field "uses"). pcall: under noeviction
# at maxmemory Redis refuses the write, and a read must still succeed (its order goes stale).
_TOUCH = """
local function touch(lru, st, key)
  local n = redis.pcall('HINCRBY', st, 'uses', 1)
  if type(n) == 'number' then redis.pcall('ZADD', lru, n, key) end
end
"""

# A manifest, read as a use. KEYS: manifest, lru, st. ARGV: key. Returns HGETALL's flat list.
_MANIFEST = _TOUCH + """
local h = redis.call('HGETALL', KEYS[1])
if #h > 0 then touch(KEYS[2], KEYS[3], ARGV[1]) end
return h
"""

# The stored prefix of a chain, each key found a use. KEYS: lru, st, then the chain's manifests.
# ARGV: the chain's segment keys.
_LOOKUP = _TOUCH + """
local n = 0
for i = 3, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then break end
  touch(KEYS[1], KEYS[2], ARGV[i - 2])
  n = n + 1
end
return n
"""

# One recall blob of the segment's current upload, read as a use. KEYS: manifest, lru, st.
# ARGV: key, field, namespace.
_RECALL = _TOUCH + """
local u = redis.call('HGET', KEYS[1], 'u')
if not u then return false end
local blob = redis.call('HGET', ARGV[3] .. ':r:' .. u, ARGV[2])
if blob then touch(KEYS[2], KEYS[3], ARGV[1]) end
return blob
"""

# drop(ns, idx, sz, lru, k): delete segment k (chunks, recall blobs, manifest, index entries).
_DROP = """
local function drop(ns, idx, sz, lru, k)
  local mk = ns .. ':m:' .. k
  local old = redis.call('HMGET', mk, 'u', 'n')
  if old[1] then
    local doomed = {ns .. ':r:' .. old[1]}
    for i = 0, tonumber(old[2]) - 1 do
      doomed[#doomed + 1] = ns .. ':c:' .. old[1] .. ':' .. i
      if #doomed == 1000 then redis.call('DEL', unpack(doomed)); doomed = {} end
    end
    if #doomed > 0 then redis.call('DEL', unpack(doomed)) end
  end
  redis.call('DEL', mk)
  redis.call('ZREM', idx, k)
  redis.call('ZREM', lru, k)
  redis.call('HDEL', sz, k)
end
"""

# The commit of a put, atomic (a script runs alone) and in one round trip: drop expired index
# entries; if the segment does not fit in the quota, evict the tenant's least recently used
# segments (lru order; segments that predate LRU tracking first) until it does; then give the
# staged keys the tenant's TTL, delete the key's previous upload, record the size and write the
# manifest last. Returns {0} when the segment alone is over the quota, {-1} when a staged key is
# missing (a chunk write that was refused or expired; nothing changed either way), else
# {1, tenant bytes after, segments evicted, bytes evicted}.
# The first write is a denyoom command (HSET): under noeviction at maxmemory Redis refuses it
# with OOM before anything has changed (a script's later writes are not re-checked).
# KEYS: idx, sz, lru, st, manifest, then the staged keys to keep (chunks, recall hash).
# ARGV: now_ms, ttl_ms (0 = none), quota (0 = none), key, stored, upload, header, n chunks,
#       chunk bytes, namespace (to name the keys of the uploads it deletes).
_COMMIT = _LIVE_USAGE + _TOUCH + _DROP + """
local idx, sz, lru, st, mkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now, ttl, quota, key = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local stored, upload, ns = tonumber(ARGV[5]), ARGV[6], ARGV[10]
if quota > 0 and stored > quota then return {0} end
for i = 6, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1} end  -- a staged write that did not land
end
redis.call('HSET', sz, key, stored)
for _, k in ipairs(redis.call('ZRANGEBYSCORE', idx, '-inf', now)) do
  redis.call('ZREM', idx, k); redis.call('ZREM', lru, k)
  if k ~= key then redis.call('HDEL', sz, k) end
end
local used = live_usage(idx, sz, now, key)
local ev_n, ev_b = 0, 0
local function evict(k)
  if k == key or used + stored <= quota then return end
  if not redis.call('ZSCORE', idx, k) then redis.call('ZREM', lru, k); return end  -- gone already
  local size = tonumber(redis.call('HGET', sz, k) or 0)
  drop(ns, idx, sz, lru, k)
  used, ev_n, ev_b = used - size, ev_n + 1, ev_b + size
end
if quota > 0 and used + stored > quota then
  for _, k in ipairs(redis.call('ZRANGEBYSCORE', idx, '(' .. now, '+inf')) do
    if not redis.call('ZSCORE', lru, k) then evict(k) end
  end
  for _, k in ipairs(redis.call('ZRANGE', lru, 0, -1)) do evict(k) end
  if ev_n > 0 then
    redis.call('HINCRBY', st, 'evictions', ev_n)
    redis.call('HINCRBY', st, 'evicted_bytes', ev_b)
  end
end
for i = 6, #KEYS do
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) else redis.call('PERSIST', KEYS[i]) end
end
local old = redis.call('HMGET', mkey, 'u', 'n')
if old[1] and old[1] ~= upload then
  for i = 0, tonumber(old[2]) - 1 do redis.call('DEL', ns .. ':c:' .. old[1] .. ':' .. i) end
  redis.call('DEL', ns .. ':r:' .. old[1])
end
redis.call('ZADD', idx, ttl > 0 and (now + ttl) or '+inf', key)
redis.call('DEL', mkey)
redis.call('HSET', mkey, 'u', upload, 'h', ARGV[7], 'n', ARGV[8], 'b', ARGV[9], 's', stored)
if ttl > 0 then redis.call('PEXPIRE', mkey, ttl) end
touch(lru, st, key)
return {1, used + stored, ev_n, ev_b}
"""
_CLEANUPS: set[asyncio.Task] = set()  # aborted puts still deleting their staged keys


def _text(v: str | bytes) -> str:
    return v.decode() if isinstance(v, bytes) else v


def _now_ms() -> int:
    return int(time.time() * 1000)


class RedisBackend:
    name = "redis"

    def __init__(self, url: str, deadline_s: float = 2.0, put_sender: str = "loop"):
        if put_sender not in PUT_SENDERS:
            raise ValueError(f"put_sender {put_sender!r}: one of {', '.join(PUT_SENDERS)}")
        self.url = url
        self.deadline_s = deadline_s
        self.put_sender = put_sender
        self.r = aioredis.Redis.from_url(
            url, socket_timeout=deadline_s, socket_connect_timeout=deadline_s, decode_responses=False,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1), health_check_interval=0,
        )
        # Bulk chunk writes go through a blocking client in worker threads: its sendall() writes
        # each frame straight from the received message (no join into one buffer, as asyncio's
        # writelines does on Python 3.11) with the GIL released, and the chunk's checksum check
        # (zlib releases the GIL too) runs there, beside the event loop that receives the next chunks.
        self.sync = redis.Redis.from_url(
            url, socket_timeout=deadline_s, socket_connect_timeout=deadline_s, decode_responses=False,
            retry=SyncRetry(ExponentialBackoff(cap=0.1, base=0.01), 1), health_check_interval=0,
        )
        self._threads = ThreadPoolExecutor(MAX_INFLIGHT, thread_name_prefix="kvstore-redis-write")
        # Chunk reads (Get) land each frame with one kernel copy (services/kvstore/resp.py), in
        # threads of their own so a Get does not queue behind a put's writes; None for TLS URLs.
        self._bulk = BulkReader.for_url(url, deadline_s)
        self._read_threads = ThreadPoolExecutor(2, thread_name_prefix="kvstore-redis-read") if self._bulk else None
        # Puts on plain URLs: pipelined from the event loop, each frame written to Redis as it
        # arrives (services/kvstore/resp.py LoopPipe); None for TLS, whose puts keep the threads.
        self._pipes = LoopConnections.for_url(url, deadline_s)
        self._send_threads = ThreadPoolExecutor(SEND_THREADS, thread_name_prefix="kvstore-redis-send")
        self._usage = self.r.register_script(_USAGE)
        self._commit = self.r.register_script(_COMMIT)
        self._manifest = self.r.register_script(_MANIFEST)
        self._lookup = self.r.register_script(_LOOKUP)
        self._recall = self.r.register_script(_RECALL)
        self._acquire = self.r.register_script(_ACQUIRE)
        self._release = self.r.register_script(_RELEASE)

    # ---- plumbing -----------------------------------------------------------------
    @asynccontextmanager
    async def guard(self, what: str):
        """Redis errors and slowness past the deadline become BackendUnavailable."""
        try:
            async with asyncio.timeout(self.deadline_s):
                yield
        except (TimeoutError, RedisConnectionError, RedisTimeoutError, OSError) as e:
            raise BackendUnavailable(f"redis at {self.where} failed {what} within {self.deadline_s} s: "
                                     f"{type(e).__name__}: {e}") from None
        except ResponseError as e:
            if not isinstance(e, OutOfMemoryError) and OOM_REPLY not in str(e):  # a script's OOM is a ResponseError
                raise
            raise StoreFull(f"redis at {self.where} is at its maxmemory and refused {what} (maxmemory-policy "
                            f"noeviction); nothing was stored: raise maxmemory or lower the tenants' quotas") from None

    @property
    def where(self) -> str:
        return self.url.rsplit("@", 1)[-1]

    @staticmethod
    def _ns(tenant: str) -> str:
        return f"hw:{tenant}"

    def _mkey(self, tenant: str, key: str) -> str:
        return f"{self._ns(tenant)}:m:{key}"

    def _ckey(self, tenant: str, upload: str, i: int) -> str:
        return f"{self._ns(tenant)}:c:{upload}:{i}"

    def _rkey(self, tenant: str, upload: str) -> str:
        return f"{self._ns(tenant)}:r:{upload}"

    def _lru_keys(self, tenant: str) -> list[str]:
        ns = self._ns(tenant)
        return [f"{ns}:lru", f"{ns}:st"]

    # ---- put ----------------------------------------------------------------------
    async def begin_put(self, tenant, key, header, num_chunks, total_bytes, limits: Limits) -> "_RedisWriter":
        need = len(header) + total_bytes
        if limits.quota_bytes and need > limits.quota_bytes:  # the commit evicts for anything smaller
            raise SegmentTooLarge(tenant, need, limits.quota_bytes)
        if getattr(self, "_pipes", None) is not None:
            return _PipeWriter(self, tenant, key, header, num_chunks, limits, os.urandom(8).hex())
        return _RedisWriter(self, tenant, key, header, num_chunks, limits, os.urandom(8).hex())

    async def _used_except(self, tenant: str, key: str | None) -> tuple[int, int]:
        ns = self._ns(tenant)
        async with self.guard("a usage read"):
            used, n = await self._usage(keys=[f"{ns}:idx", f"{ns}:sz"], args=[_now_ms(), key if key is not None else ""])
        return int(used), int(n)

    # ---- reads --------------------------------------------------------------------
    async def manifest(self, tenant, key):
        async with self.guard("a manifest read"):
            flat = await self._manifest(keys=[self._mkey(tenant, key), *self._lru_keys(tenant)], args=[key])
        if not flat:
            return None
        h = dict(zip(flat[::2], flat[1::2], strict=True))
        return Manifest(key, h[b"u"].decode(), h[b"h"], int(h[b"n"]), int(h[b"b"]), int(h[b"s"]))

    async def chunks(self, tenant, m, start, stop):
        keys = [self._ckey(tenant, m.upload, i) for i in range(start, stop)]
        async with self.guard(f"a read of chunks {start}..{stop - 1}"):
            if self._bulk is None:
                return await self.r.mget(keys)
            return await asyncio.get_running_loop().run_in_executor(self._read_threads, self._bulk.get, keys)

    async def lookup(self, tenant, keys):
        if not keys:
            return 0
        async with self.guard("a lookup"):
            n = await self._lookup(keys=[*self._lru_keys(tenant), *(self._mkey(tenant, k) for k in keys)], args=list(keys))
        return int(n)

    async def recall(self, tenant, key, layer, head, row):
        async with self.guard("a recall read"):
            return await self._recall(keys=[self._mkey(tenant, key), *self._lru_keys(tenant)],
                                      args=[key, recall_field(layer, head, row), self._ns(tenant)])

    async def usage(self, tenant):
        return await self._used_except(tenant, None)

    async def evictions(self, tenant):
        async with self.guard("a stats read"):
            n, b = await self.r.hmget(f"{self._ns(tenant)}:st", "evictions", "evicted_bytes")
        return Evicted(int(n or 0), int(b or 0))

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
                    pipe.zrem(f"{ns}:lru", key)
                    pipe.hdel(f"{ns}:sz", key)
                    await pipe.execute()
                    return True
                except WatchError:
                    continue
        raise BackendUnavailable(f"delete of {key!r} lost {COMMIT_RETRIES} races with concurrent writers")

    def _drop_upload(self, pipe, tenant: str, manifest: dict) -> None:
        upload = manifest[b"u"].decode()
        pipe.delete(*[self._ckey(tenant, upload, i) for i in range(int(manifest[b"n"]))], self._rkey(tenant, upload))

    # ---- coordination -------------------------------------------------------------
    async def acquire(self, tenant, name, holder, limit, ttl_s):
        async with self.guard(f"an acquire of {name!r}"):
            granted, held = await self._acquire(keys=[f"{self._ns(tenant)}:sem:{name}"],
                                                args=[holder, int(limit), max(1, int(ttl_s * 1000))])
        return bool(granted), int(held)

    async def release(self, tenant, name, holder):
        async with self.guard(f"a release of {name!r}"):
            return bool(await self._release(keys=[f"{self._ns(tenant)}:sem:{name}"], args=[holder]))

    async def put_record(self, tenant, key, data, ttl_s):
        async with self.guard("a record write"):
            await self.r.set(f"{self._ns(tenant)}:rec:{key}", bytes(data), px=max(1, int(ttl_s * 1000)))

    async def get_record(self, tenant, key):
        async with self.guard("a record read"):
            return await self.r.get(f"{self._ns(tenant)}:rec:{key}")

    async def eviction_risk(self) -> str | None:
        """Why Redis's own eviction could break per-tenant isolation, or None when it cannot (no
        maxmemory, or noeviction). None too when CONFIG is not allowed (managed Redis)."""
        try:
            async with self.guard("CONFIG GET"):
                conf = {**await self.r.config_get("maxmemory-policy"), **await self.r.config_get("maxmemory")}
            conf = {_text(k): _text(v) for k, v in conf.items()}  # str or bytes, by redis-py version
            policy, maxmemory = conf.get("maxmemory-policy", ""), int(conf.get("maxmemory", 0))
        except (BackendUnavailable, ResponseError):
            return None
        if maxmemory and policy != "noeviction":
            return (f"redis at {self.where} has maxmemory {maxmemory} with maxmemory-policy {policy}: Redis may evict "
                    f"one tenant's keys for another's; set maxmemory-policy noeviction (docs/deploy.md)")
        return None

    async def ping(self):
        async with self.guard("PING"):
            await self.r.ping()

    async def close(self):
        await self.r.aclose()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if getattr(self, "_send_threads", None) is not None:  # not in RedisClusterBackend
            self._send_threads.shutdown(wait=False, cancel_futures=True)
        if self._read_threads is not None:
            self._read_threads.shutdown(wait=False, cancel_futures=True)
        if self._bulk is not None:
            self._bulk.close()
        if getattr(self, "_pipes", None) is not None:
            self._pipes.close()
        self.sync.close()


def _commit_call(w: "_RedisWriter | _PipeWriter", stored: int) -> tuple[list[str], list]:
    """KEYS and ARGV of the commit script for writer `w`'s upload."""
    st, t = w.store, w.tenant
    ns = st._ns(t)
    keep = [st._ckey(t, w.upload, i) for i in range(w.num_chunks)]
    if w._has_recall:
        keep.append(st._rkey(t, w.upload))
    args = [_now_ms(), int(w.limits.ttl_s * 1000), w.limits.quota_bytes, w.key, stored, w.upload, w.header,
            w.num_chunks, w._chunk_bytes, ns]
    return [f"{ns}:idx", f"{ns}:sz", *st._lru_keys(t), st._mkey(t, w.key), *keep], args


def _committed(w: "_RedisWriter | _PipeWriter", stored: int, out: list) -> tuple[int, Evicted]:
    """(tenant bytes after, evicted) from the commit script's reply; its refusals raised."""
    if out[0] == 0:
        raise SegmentTooLarge(w.tenant, stored, w.limits.quota_bytes)
    if out[0] == -1:
        raise BackendUnavailable(f"redis at {w.store.where} lost a staged chunk of the put of {w.key!r} before "
                                 f"its commit; nothing was stored, retry")
    return int(out[1]), Evicted(int(out[2]), int(out[3]))


def _first_error(replies: list) -> None:
    """Raise the first error reply among `replies` (inside a guard: OOM becomes StoreFull)."""
    for r in replies:
        if isinstance(r, ResponseError):
            raise r


@dataclass
class _PipeWriter:
    """A put over one pipelined connection driven from the event loop (plain redis:// and
    unix:// URLs). Each chunk is checked (the server's verifier), then sent at once as
    `SET chunk-key <frame> PX staging`: one writev whose middle piece is the received
    message's own memory, no reply waited for, no thread. Errors already answered are looked
    at every FLUSH_BYTES (a refusal at maxmemory ends the put early). The commit script goes
    on the same connection after the last write, so the put's only round trip is at its end:
    the script runs after every staged write (one connection, in order) and first checks that
    each staged key is there, so a refused write can never be committed around."""

    store: RedisBackend
    tenant: str
    key: str
    header: bytes
    num_chunks: int
    limits: Limits
    upload: str
    _pipe: LoopPipe | None = None
    _chunk_bytes: int = 0
    _recall_bytes: int = 0
    _has_recall: bool = False
    _unpolled: int = 0
    _sender: ThreadSender | None = None

    def _lost(self, what: str, e: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"redis at {self.store.where} failed {what}: {type(e).__name__}: {e}")

    async def _send(self, pieces: list, nbytes: int, what: str) -> None:
        """Send one command (its pieces in one writev) without waiting for its reply: from the
        event loop, or handed to the put's sender thread (`PUT_SENDERS`)."""
        pipe = self._pipe
        if pipe is None:
            async with self.store.guard("a connection for a put"):
                pipe = self._pipe = await self.store._pipes.acquire()
            if self.store.put_sender == "thread":
                self._sender = ThreadSender(pipe, self.store._send_threads.submit, SENDER_QUEUE_BYTES,
                                            self.store.deadline_s)
        if self._sender is not None:
            try:
                space = self._sender.put(pieces, nbytes)
            except (OSError, TimeoutError) as e:
                raise self._lost(what, e) from None
            if space is not None:  # the thread is SENDER_QUEUE_BYTES behind: Redis is; wait for it
                async with self.store.guard(what):
                    await space
                if self._sender.error is not None:
                    raise self._lost(what, self._sender.error)
        else:
            try:
                done = pipe.send_nowait(pieces)
            except OSError as e:
                raise self._lost(what, e) from None
            if not done:  # the socket is full: Redis is behind; wait for it (within the deadline)
                async with self.store.guard(what):
                    await pipe.finish_sends()
        self._unpolled += nbytes
        if self._unpolled >= FLUSH_BYTES:
            self._unpolled = 0
            async with self.store.guard(what):
                _first_error(pipe.poll())

    async def _sent(self, what: str) -> None:
        """Wait until the sender thread has sent everything handed to it (then the pipe is the
        loop's again); BackendUnavailable when a send failed (the pipe is then closed)."""
        sender, self._sender = self._sender, None
        if sender is None:
            return
        sender.close()
        try:
            async with self.store.guard(what):
                await asyncio.shield(sender.done)
        except BaseException:  # the thread may still be in a send: it closes the pipe when out of it
            sender.abandon()
            self._pipe = None
            raise
        if sender.error is not None:
            self._drop_pipe()
            raise self._lost(what, sender.error)

    def _drop_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()
            self._pipe = None

    async def chunk(self, index, data, verify=None):
        if verify is not None:
            verify()  # before the frame is sent: a damaged chunk is never written
        head, tail = set_head(self.store._ckey(self.tenant, self.upload, index).encode(), len(data), STAGING_TTL_MS)
        await self._send([head, data, tail], len(data), "a chunk write")
        self._chunk_bytes += len(data)

    async def recall(self, layer, head, row, data):
        rkey = self.store._rkey(self.tenant, self.upload).encode()
        f = recall_field(layer, head, row).encode()
        await self._send([command_head(b"HSET", rkey, f, value_len=len(data)), data, b"\r\n"], len(data), "a recall write")
        await self._send([command(b"PEXPIRE", rkey, b"%d" % STAGING_TTL_MS)], 0, "a recall write")
        self._recall_bytes += len(data)
        self._has_recall = True

    async def commit(self):
        stored = len(self.header) + self._chunk_bytes + self._recall_bytes
        try:
            keys, args = _commit_call(self, stored)
            script = self.store._commit
            call = command(b"EVALSHA", script.sha.encode(), b"%d" % len(keys), *(_arg(a) for a in (*keys, *args)))
            await self._send([call], 0, "the commit")
            await self._sent("the commit")
            async with self.store.guard("the commit"):
                replies = await self._pipe.replies()
                _first_error(replies[:-1])  # a staged write refused (the script then changed nothing)
                out = replies[-1]
                if isinstance(out, ResponseError) and str(out).startswith("NOSCRIPT"):  # a Redis that restarted
                    out = await script(keys=keys, args=args)
                _first_error([out])
            self.store._pipes.release(self._pipe)
            self._pipe = None
            used, evicted = _committed(self, stored, out)
            return stored, used, evicted
        except BaseException:
            await self.abort()
            raise

    async def abort(self):
        """Delete whatever was staged: on the put's own connection after its writes (so the
        delete cannot overtake one of them), else on another (best effort; the staging TTL
        covers a dead Redis). Its own task, as _RedisWriter's."""
        task = asyncio.ensure_future(self._cleanup())
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
        await asyncio.shield(task)

    async def _cleanup(self) -> None:
        try:  # the writes handed to the sender thread first, so the delete below comes after them
            await self._sent("cleanup of an aborted put")
        except (BackendUnavailable, StoreFull):
            pass  # the pipe is closed: the delete goes on another connection
        st, pipe, self._pipe = self.store, self._pipe, None
        keys = [st._ckey(self.tenant, self.upload, i) for i in range(self.num_chunks)]
        keys.append(st._rkey(self.tenant, self.upload))
        if pipe is not None:
            try:
                async with st.guard("cleanup of an aborted put"):
                    await pipe.send([command(b"DEL", *(k.encode() for k in keys))])
                    await pipe.replies()
                st._pipes.release(pipe)
                return
            except (BackendUnavailable, StoreFull, ResponseError, RedisConnectionError, OSError):
                pipe.close()
        try:
            async with st.guard("cleanup of an aborted put"):
                await st.r.delete(*keys)
        except BackendUnavailable:
            pass


def _arg(a: str | bytes | int) -> bytes:
    return a if isinstance(a, bytes) else str(a).encode()


@dataclass
class _RedisWriter:
    store: RedisBackend
    tenant: str
    key: str
    header: bytes
    num_chunks: int
    limits: Limits
    upload: str
    _pending: list[tuple[str, str | None, bytes | memoryview, Callable[[], None] | None]] = field(default_factory=list)
    _pending_bytes: int = 0
    _inflight: deque[asyncio.Task] = field(default_factory=deque)
    _chunk_bytes: int = 0
    _recall_bytes: int = 0
    _has_recall: bool = False

    async def chunk(self, index, data, verify=None):
        self._pending.append((self.store._ckey(self.tenant, self.upload, index), None, data, verify))
        self._chunk_bytes += len(data)
        await self._add(len(data))

    async def recall(self, layer, head, row, data):
        self._pending.append((self.store._rkey(self.tenant, self.upload), recall_field(layer, head, row), data, None))
        self._recall_bytes += len(data)
        self._has_recall = True
        await self._add(len(data))

    async def _add(self, n: int) -> None:
        self._pending_bytes += n
        if self._pending_bytes >= FLUSH_BYTES:
            await self._flush(MAX_INFLIGHT - 1)

    async def _flush(self, keep: int) -> None:
        """Send the pending batch, leaving at most `keep` earlier batches in flight (their
        connections write while the handler receives the next chunks); bounded memory."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if batch:
            loop = asyncio.get_running_loop()
            self._inflight.append(loop.run_in_executor(self.store._threads, self._write, batch))
        while len(self._inflight) > keep:
            async with self.store.guard("a chunk write"):
                # shielded: a timeout leaves the thread's write queued, so abort() waits for it to land
                await asyncio.shield(self._inflight[0])  # stays queued if this raises
            self._inflight.popleft()

    def _write(self, batch) -> None:
        """In a worker thread: check each chunk (the server's verifier), then write the batch in
        one pipeline; nothing of a batch is written if one of its chunks fails its check."""
        for *_, verify in batch:
            if verify is not None:
                verify()
        pipe = self.store.sync.pipeline(transaction=False)
        for k, f, data, _ in batch:
            if f is None:
                pipe.set(k, data, px=STAGING_TTL_MS)
            else:
                pipe.hset(k, f, data)
                pipe.pexpire(k, STAGING_TTL_MS)
        pipe.execute()

    async def commit(self):
        stored = len(self.header) + self._chunk_bytes + self._recall_bytes
        try:
            await self._flush(0)  # every batch has landed
            async with self.store.guard("the commit"):
                used, evicted = await self._commit(stored)
            return stored, used, evicted
        except BaseException:
            await self.abort()
            raise

    async def _commit(self, stored: int) -> int:
        keys, args = _commit_call(self, stored)
        return _committed(self, stored, await self.store._commit(keys=keys, args=args))

    async def abort(self):
        """Delete whatever was staged (best effort: the staging TTL covers a dead Redis).

        Runs as its own task: the Put handler is usually being cancelled (client gone), and
        the cleanup must finish even if that cancellation interrupts the wait for it."""
        task = asyncio.ensure_future(self._cleanup())
        _CLEANUPS.add(task)
        task.add_done_callback(_CLEANUPS.discard)
        await asyncio.shield(task)

    async def _cleanup(self) -> None:
        tasks, self._inflight, self._pending = list(self._inflight), deque(), []
        if tasks:  # let writes in flight land first, so the delete below catches them
            await asyncio.gather(*tasks, return_exceptions=True)
        st = self.store
        keys = [st._ckey(self.tenant, self.upload, i) for i in range(self.num_chunks)]
        keys.append(st._rkey(self.tenant, self.upload))
        try:
            async with st.guard("cleanup of an aborted put"):
                await st.r.delete(*keys)
        except BackendUnavailable:
            pass
