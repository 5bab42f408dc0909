"""The storage protocol behind the KV store service, and its in-memory reference implementation.

A backend stores opaque bytes per (tenant, segment key): the codec header blob, the chunk
frames and the recall blobs. Rules every backend keeps (tests/kvstore/test_contract.py):

- a segment is invisible until `commit()` returns; `abort()` (or a failed commit) leaves nothing;
- a tenant's quota is a cache capacity: a commit that would take the tenant past it first
  evicts that tenant's least recently used segments (chunks, recall blobs, manifest) until the
  new one fits, in the same atomic step, so usage never exceeds the quota, even with concurrent
  puts; only a segment larger than the whole quota is refused (SegmentTooLarge), leaving nothing;
- "used" means its manifest was read (Get), one of its recall blobs read (Recall) or it was
  found by Lookup; a commit counts as a use;
- a reader that started before its segment was evicted, replaced or deleted gets None for the
  chunks or blob it had not read yet (a clean miss, which the server turns into NOT_FOUND), never
  bytes of another upload;
- a segment disappears, with its chunks and recall blobs, `ttl_s` after its commit;
- tenants never see, nor evict, each other's keys.

Methods, grouped by caller: the Put handler uses `begin_put` and the writer; Get uses
`manifest` and `chunks`; Lookup, Recall, Delete, Stats use the method of the same name
(Stats also `evictions`).

Coordination (Acquire/Release, PutRecord/GetRecord): a counting semaphore per (tenant, name)
whose slots lapse `ttl_s` after their last renewal, and small records with a TTL. They are
not segments: they do not count against the quota and never appear in Lookup.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol


class BackendError(Exception):
    """Base of the errors a backend raises on purpose."""


class BackendUnavailable(BackendError):
    """The storage could not be reached within the deadline."""


class SegmentTooLarge(BackendError):
    """The segment alone is larger than the tenant's whole quota: it can never be kept."""

    def __init__(self, tenant: str, need: int, quota: int):
        self.tenant, self.need, self.quota = tenant, need, quota
        super().__init__(f"segment of {need} bytes is larger than tenant {tenant!r}'s whole quota of {quota} bytes; "
                         f"nothing was stored (raise the quota to keep segments this large)")


class StoreFull(BackendError):
    """The storage itself has no room (Redis at maxmemory under noeviction); nothing was stored."""


@dataclass(frozen=True)
class Evicted:
    """What a commit evicted to make room: segments and their stored bytes."""

    segments: int = 0
    nbytes: int = 0


@dataclass(frozen=True)
class Limits:
    quota_bytes: int = 0  # 0 = unlimited
    ttl_s: float = 0  # 0 = segments never expire


@dataclass(frozen=True)
class Manifest:
    """What a committed segment is: written last, so its presence means the segment is complete."""

    key: str
    upload: str  # id of the put that wrote the chunks (chunk keys are per upload)
    header: bytes  # codec header blob
    num_chunks: int
    total_bytes: int  # sum of chunk frame lengths
    stored_bytes: int  # header + chunks + recall blobs, what counts against the quota


class PutWriter(Protocol):
    async def chunk(self, index: int, data: bytes, verify: Callable[[], None] | None = None) -> None:
        """Stage chunk `index`. `verify` (the server's checksum check, which raises on a damaged
        chunk) must have returned before the chunk is stored; a backend may run it in a worker
        thread, so its error can surface from a later `chunk()` or from `commit()`."""
        ...
    async def recall(self, layer: int, head: int, row: int, data: bytes) -> None: ...
    async def commit(self) -> tuple[int, int, Evicted]:
        """Make the segment visible, evicting the tenant's least recently used segments first
        if it would not fit: (stored bytes, tenant bytes after, what was evicted)."""
        ...
    async def abort(self) -> None: ...


class Backend(Protocol):
    name: str

    async def begin_put(self, tenant: str, key: str, header: bytes, num_chunks: int, total_bytes: int,
                        limits: Limits) -> PutWriter: ...
    async def manifest(self, tenant: str, key: str) -> Manifest | None:
        """The segment's manifest (a use, for the LRU), or None."""
        ...
    async def chunks(self, tenant: str, m: Manifest, start: int, stop: int) -> list[bytes | None]: ...
    async def lookup(self, tenant: str, keys: list[str]) -> int:
        """How many leading keys are stored; those found count as used."""
        ...
    async def recall(self, tenant: str, key: str, layer: int, head: int, row: int) -> bytes | None: ...
    async def delete(self, tenant: str, key: str) -> bool: ...
    async def usage(self, tenant: str) -> tuple[int, int]:
        """(bytes, segments) the tenant holds now."""
        ...
    async def evictions(self, tenant: str) -> Evicted:
        """Segments and bytes evicted from the tenant to make room, since the store began."""
        ...
    async def acquire(self, tenant: str, name: str, holder: str, limit: int, ttl_s: float) -> tuple[bool, int]:
        """Take or renew `holder`'s slot of semaphore `name`: (granted, slots held now)."""
        ...
    async def release(self, tenant: str, name: str, holder: str) -> bool: ...
    async def put_record(self, tenant: str, key: str, data: bytes, ttl_s: float) -> None: ...
    async def get_record(self, tenant: str, key: str) -> bytes | None: ...
    async def ping(self) -> None: ...
    async def close(self) -> None: ...


def recall_field(layer: int, head: int, row: int) -> str:
    return f"{layer}:{head}:{row}"


# ---- the reference implementation ---------------------------------------------------
@dataclass
class _Stored:
    manifest: Manifest
    chunks: list[bytes]
    recall: dict[str, bytes]
    expires: float  # clock time; inf = never
    used: int  # the tenant's use counter at the last use (LRU order)


@dataclass
class MemoryBackend:
    """Dicts in one process. Deliberately simple; `clock` lets tests move time. Every method
    runs without an await between its check and its change, so each is atomic on the loop."""

    clock: Callable[[], float] = time.monotonic
    name: str = "memory"
    _segments: dict[tuple[str, str], _Stored] = field(default_factory=dict)
    _slots: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # holder -> expiry
    _records: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)
    _evicted: dict[str, Evicted] = field(default_factory=dict)
    _uses: itertools.count = field(default_factory=itertools.count)

    def _live(self, tenant: str, key: str) -> _Stored | None:
        s = self._segments.get((tenant, key))
        if s is not None and s.expires <= self.clock():
            del self._segments[(tenant, key)]
            return None
        return s

    def _touch(self, s: _Stored | None) -> _Stored | None:
        if s is not None:
            s.used = next(self._uses)
        return s

    def _tenant_segments(self, tenant: str) -> list[tuple[str, _Stored]]:
        return [(k, s) for (t, k) in list(self._segments) if t == tenant and (s := self._live(t, k)) is not None]

    async def begin_put(self, tenant, key, header, num_chunks, total_bytes, limits) -> "_MemoryWriter":
        need = len(header) + total_bytes
        if limits.quota_bytes and need > limits.quota_bytes:
            raise SegmentTooLarge(tenant, need, limits.quota_bytes)
        return _MemoryWriter(self, tenant, key, header, num_chunks, total_bytes, limits)

    def _make_room(self, tenant: str, key: str, need: int, quota: int) -> tuple[int, Evicted]:
        """Evict the tenant's least recently used segments (never `key`'s old version, which the
        put replaces) until `need` more bytes fit; (bytes in use after, what was evicted)."""
        others = sorted(((s.used, k, s) for k, s in self._tenant_segments(tenant) if k != key), key=lambda t: t[0])
        used = sum(s.manifest.stored_bytes for _, _, s in others)
        n = freed = 0
        for _, k, s in others:
            if not quota or used + need <= quota:
                break
            del self._segments[(tenant, k)]
            used, n, freed = used - s.manifest.stored_bytes, n + 1, freed + s.manifest.stored_bytes
        if n:
            total = self._evicted.get(tenant, Evicted())
            self._evicted[tenant] = Evicted(total.segments + n, total.nbytes + freed)
        return used, Evicted(n, freed)

    async def manifest(self, tenant, key):
        s = self._touch(self._live(tenant, key))
        return s.manifest if s else None

    async def chunks(self, tenant, m, start, stop):
        s = self._live(tenant, m.key)
        if s is None or s.manifest.upload != m.upload:
            return [None] * (stop - start)
        return s.chunks[start:stop]

    async def lookup(self, tenant, keys):
        n = 0
        while n < len(keys) and self._touch(self._live(tenant, keys[n])) is not None:
            n += 1
        return n

    async def recall(self, tenant, key, layer, head, row):
        s = self._live(tenant, key)
        blob = s.recall.get(recall_field(layer, head, row)) if s else None
        if blob is not None:
            self._touch(s)
        return blob

    async def delete(self, tenant, key):
        return self._live(tenant, key) is not None and self._segments.pop((tenant, key)) is not None

    async def usage(self, tenant):
        live = self._tenant_segments(tenant)
        return sum(s.manifest.stored_bytes for _, s in live), len(live)

    async def evictions(self, tenant):
        return self._evicted.get(tenant, Evicted())

    async def acquire(self, tenant, name, holder, limit, ttl_s):
        now = self.clock()
        slots = {h: t for h, t in self._slots.get((tenant, name), {}).items() if t > now}
        granted = holder in slots or len(slots) < limit
        if granted:
            slots[holder] = now + ttl_s
        self._slots[(tenant, name)] = slots
        return granted, len(slots)

    async def release(self, tenant, name, holder):
        slots = self._slots.get((tenant, name), {})
        return slots.pop(holder, 0.0) > self.clock()

    async def put_record(self, tenant, key, data, ttl_s):
        self._records[(tenant, key)] = (bytes(data), self.clock() + ttl_s)

    async def get_record(self, tenant, key):
        data, expires = self._records.get((tenant, key), (None, 0.0))
        return data if expires > self.clock() else None

    async def ping(self):
        return None

    async def close(self):
        return None


@dataclass
class _MemoryWriter:
    store: MemoryBackend
    tenant: str
    key: str
    header: bytes
    num_chunks: int
    total_bytes: int
    limits: Limits
    _chunks: list[bytes] = field(default_factory=list)
    _recall: dict[str, bytes] = field(default_factory=dict)

    async def chunk(self, index, data, verify=None):
        if verify is not None:
            verify()
        self._chunks.append(bytes(data))

    async def recall(self, layer, head, row, data):
        self._recall[recall_field(layer, head, row)] = bytes(data)

    async def commit(self):
        stored = len(self.header) + sum(map(len, self._chunks)) + sum(map(len, self._recall.values()))
        quota = self.limits.quota_bytes
        if quota and stored > quota:
            raise SegmentTooLarge(self.tenant, stored, quota)
        # from here to the insert there is no await: eviction and commit are one step
        used, evicted = self.store._make_room(self.tenant, self.key, stored, quota)
        m = Manifest(self.key, os.urandom(8).hex(), self.header, self.num_chunks, sum(map(len, self._chunks)), stored)
        expires = self.store.clock() + self.limits.ttl_s if self.limits.ttl_s else float("inf")
        self.store._segments[(self.tenant, self.key)] = _Stored(m, self._chunks, self._recall, expires,
                                                                next(self.store._uses))
        return stored, used + stored, evicted

    async def abort(self):
        self._chunks, self._recall = [], {}
