"""The storage protocol behind the KV store service, and its in-memory reference implementation.

A backend stores opaque bytes per (tenant, segment key): the codec header blob, the chunk
frames and the recall blobs. Rules every backend keeps (tests/kvstore/test_contract.py):

- a segment is invisible until `commit()` returns; `abort()` (or a failed commit) leaves nothing;
- a commit that would take the tenant past its quota raises QuotaExceededError and leaves nothing;
- a segment disappears, with its chunks and recall blobs, `ttl_s` after its commit;
- tenants never see each other's keys.

Methods, grouped by caller: the Put handler uses `begin_put` and the writer; Get uses
`manifest` and `chunks`; Lookup, Recall, Delete, Stats use the method of the same name.

Coordination (Acquire/Release, PutRecord/GetRecord): a counting semaphore per (tenant, name)
whose slots lapse `ttl_s` after their last renewal, and small records with a TTL. They are
not segments: they do not count against the quota and never appear in Lookup.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol


class BackendError(Exception):
    """Base of the errors a backend raises on purpose."""


class BackendUnavailable(BackendError):
    """The storage could not be reached within the deadline."""


class QuotaExceededError(BackendError):
    def __init__(self, tenant: str, used: int, need: int, quota: int):
        self.tenant, self.used, self.need, self.quota = tenant, used, need, quota
        super().__init__(
            f"tenant {tenant!r} would hold {used + need} bytes, over its quota of {quota} bytes "
            f"({used} in use, this segment {need}); delete segments or raise the quota"
        )


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
    async def commit(self) -> tuple[int, int]:
        """Make the segment visible; return (stored bytes, tenant bytes after)."""
        ...
    async def abort(self) -> None: ...


class Backend(Protocol):
    name: str

    async def begin_put(self, tenant: str, key: str, header: bytes, num_chunks: int, total_bytes: int,
                        limits: Limits) -> PutWriter: ...
    async def manifest(self, tenant: str, key: str) -> Manifest | None: ...
    async def chunks(self, tenant: str, m: Manifest, start: int, stop: int) -> list[bytes | None]: ...
    async def lookup(self, tenant: str, keys: list[str]) -> int: ...
    async def recall(self, tenant: str, key: str, layer: int, head: int, row: int) -> bytes | None: ...
    async def delete(self, tenant: str, key: str) -> bool: ...
    async def usage(self, tenant: str) -> tuple[int, int]:
        """(bytes, segments) the tenant holds now."""
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


@dataclass
class MemoryBackend:
    """Dicts in one process. Deliberately simple; `clock` lets tests move time."""

    clock: Callable[[], float] = time.monotonic
    name: str = "memory"
    _segments: dict[tuple[str, str], _Stored] = field(default_factory=dict)
    _slots: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # holder -> expiry
    _records: dict[tuple[str, str], tuple[bytes, float]] = field(default_factory=dict)

    def _live(self, tenant: str, key: str) -> _Stored | None:
        s = self._segments.get((tenant, key))
        if s is not None and s.expires <= self.clock():
            del self._segments[(tenant, key)]
            return None
        return s

    async def begin_put(self, tenant, key, header, num_chunks, total_bytes, limits) -> "_MemoryWriter":
        need = len(header) + total_bytes
        used, _ = await self.usage(tenant)
        old = self._live(tenant, key)
        used -= old.manifest.stored_bytes if old else 0
        if limits.quota_bytes and used + need > limits.quota_bytes:
            raise QuotaExceededError(tenant, used, need, limits.quota_bytes)
        return _MemoryWriter(self, tenant, key, header, num_chunks, total_bytes, limits)

    async def manifest(self, tenant, key):
        s = self._live(tenant, key)
        return s.manifest if s else None

    async def chunks(self, tenant, m, start, stop):
        s = self._live(tenant, m.key)
        if s is None or s.manifest.upload != m.upload:
            return [None] * (stop - start)
        return s.chunks[start:stop]

    async def lookup(self, tenant, keys):
        n = 0
        while n < len(keys) and self._live(tenant, keys[n]) is not None:
            n += 1
        return n

    async def recall(self, tenant, key, layer, head, row):
        s = self._live(tenant, key)
        return s.recall.get(recall_field(layer, head, row)) if s else None

    async def delete(self, tenant, key):
        return self._live(tenant, key) is not None and self._segments.pop((tenant, key)) is not None

    async def usage(self, tenant):
        live = [s for (t, k) in list(self._segments) if t == tenant and (s := self._live(t, k)) is not None]
        return sum(s.manifest.stored_bytes for s in live), len(live)

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
        used, _ = await self.store.usage(self.tenant)
        old = self.store._live(self.tenant, self.key)
        used -= old.manifest.stored_bytes if old else 0
        if self.limits.quota_bytes and used + stored > self.limits.quota_bytes:
            raise QuotaExceededError(self.tenant, used, stored, self.limits.quota_bytes)
        m = Manifest(self.key, f"{id(self):x}", self.header, self.num_chunks, sum(map(len, self._chunks)), stored)
        expires = self.store.clock() + self.limits.ttl_s if self.limits.ttl_s else float("inf")
        self.store._segments[(self.tenant, self.key)] = _Stored(m, self._chunks, self._recall, expires)
        return stored, used + stored

    async def abort(self):
        self._chunks, self._recall = [], {}
