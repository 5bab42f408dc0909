"""KVStoreClient: what prefill and decode workers use to keep and fetch compact caches.

One grpc.aio channel per client, opened lazily in the event loop of the first call (use the
client from that loop only). Calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED are
retried with exponential backoff, then raise StoreUnavailable; a miss, including a segment
that failed its checksum anywhere on the way, is None, never bad data.

    client = KVStoreClient("10.0.0.21:50051,10.0.0.22:50051", service_token, tenant="acme")
    sent = await client.put(key, cache)           # bytes on the wire
    cache = await client.get(key)                 # CompactCache or None
    n = await client.lookup(chain)                # leading keys stored
    k, v, pos = await client.recall(key, layer, head, row)

`addr` names one kvstore or several: "host:port", a comma list of them, or a name that resolves
to several addresses (a headless Kubernetes Service). The channel balances calls round-robin
over every address that is connected (gRPC's client-side load balancing) and leaves out one
whose connection failed, so a dead replica costs the calls in flight on it one retry each.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from torch import Tensor

from headwise.cache import quant
from headwise.cache.codec import (
    MAX_CHUNK_BYTES,
    CodecError,
    Decoder,
    EncodedSegment,
    Prepared,
    RecallEntry,
    StreamingSegment,
    decode_recall,
    encode_streaming,
    prepare,
)
from headwise.cache.compact import CompactCache
from services.kvstore.errors import QuotaExceeded, StoreError, StoreUnavailable
from services.kvstore.protocol import GRPC_OPTIONS, SERVICE, TENANT_HEADER, TOKEN_HEADER
from services.kvstore.wire import chunk_message, parse_get_response, serialize
from services.protos.headwise.v1 import kvstore_pb2 as pb
from services.protos.headwise.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
WIRE_RATE_FLOOR = 20e6  # bytes/s: a streaming call's deadline grows by its size at this rate


# Calls rotate over every connected address (a name is re-resolved by gRPC's DNS resolver when
# a connection drops). The keepalive pings an address that went silent while a call waits on it:
# a host that vanished without closing its connections is dropped within KEEPALIVE_MS + its
# timeout rather than at each call's deadline.
KEEPALIVE_MS = 5_000
CHANNEL_OPTIONS = [*GRPC_OPTIONS, ("grpc.lb_policy_name", "round_robin"),
                   ("grpc.keepalive_time_ms", KEEPALIVE_MS), ("grpc.keepalive_timeout_ms", 3_000)]


def channel_target(addr: str) -> str:
    """The gRPC target for `addr`: "host:port", "h1:p1,h2:p2,...", or a target already in gRPC's
    syntax (dns:, ipv4:, ipv6:, unix:). A list of IP literals becomes one ipv4:/ipv6: target, whose
    addresses the round-robin policy balances over; names in a list are resolved once, here."""
    addr = addr.strip()
    if not addr:
        raise ValueError("kvstore address is empty")
    if addr.startswith(("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:")) or "," not in addr:
        return addr
    v4, v6 = [], []
    for part in filter(None, (p.strip() for p in addr.split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not host:
            raise ValueError(f"kvstore address {part!r} in {addr!r} is not host:port")
        host = host.strip("[]")
        for ip in _resolve(host, int(port)):
            (v6 if ":" in ip else v4).append(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
    if v4 and v6:
        raise ValueError(f"kvstore addresses {addr!r} mix IPv4 and IPv6; gRPC balances over one family")
    return ("ipv6:" + ",".join(v6)) if v6 else ("ipv4:" + ",".join(v4))


def _resolve(host: str, port: int) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"kvstore host {host!r} does not resolve: {e}") from None
    return list(dict.fromkeys(i[4][0] for i in infos))


def recall_pieces(r: RecallEntry, piece: int = MAX_CHUNK_BYTES) -> list[pb.RecallEntry]:
    """One recall entry as the messages that carry it: whole when it fits `piece` bytes, else in
    consecutive pieces (part 0 .. parts - 1) that the server joins."""
    parts = max(1, -(-len(r.data) // piece))
    if parts == 1:
        return [pb.RecallEntry(layer=r.layer, head=r.head, row=r.row, data=r.data)]
    return [pb.RecallEntry(layer=r.layer, head=r.head, row=r.row, data=r.data[i * piece:(i + 1) * piece], part=i,
                           parts=parts) for i in range(parts)]


@dataclass
class ClientCounters:
    bytes_sent: int = 0
    bytes_received: int = 0
    retries: int = 0
    corrupt_misses: int = 0  # segments the client itself found damaged
    last_error: str = ""


@dataclass
class KVStoreClient:
    addr: str
    service_token: str
    tenant: str
    timeout_s: float = 5.0
    retries: int = 3
    backoff_s: float = 0.05
    chunk_size: int = MAX_CHUNK_BYTES
    stream_timeout_s: float = 120.0  # whole-Get deadline (the size is unknown up front)
    counters: ClientCounters = field(default_factory=ClientCounters)
    _channel: grpc.aio.Channel | None = field(default=None, repr=False)
    _stub: pb_grpc.KVStoreStub | None = field(default=None, repr=False)
    _bulk: tuple | None = field(default=None, repr=False)  # (Put, Get) with pre-serialised chunk messages

    # ---- plumbing -----------------------------------------------------------------
    @property
    def stub(self) -> pb_grpc.KVStoreStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(channel_target(self.addr), options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.KVStoreStub(self._channel)
            self._bulk = (
                self._channel.stream_unary(f"/{SERVICE}/Put", request_serializer=serialize,
                                           response_deserializer=pb.PutResponse.FromString),
                self._channel.unary_stream(f"/{SERVICE}/Get", request_serializer=serialize,
                                           response_deserializer=parse_get_response),
            )
        return self._stub

    @property
    def bulk(self) -> tuple:
        """Put and Get whose chunk messages skip protobuf's copies (services/kvstore/wire.py)."""
        _ = self.stub
        return self._bulk

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_HEADER, self.service_token), (TENANT_HEADER, self.tenant))

    async def _call(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` with retries on UNAVAILABLE / DEADLINE_EXCEEDED; map errors to StoreError."""
        for n in range(self.retries + 1):
            try:
                return await attempt()
            except grpc.aio.AioRpcError as e:
                code, msg = e.code(), e.details() or ""
                self.counters.last_error = f"{what}: {code.name}: {msg}"
                if code not in RETRYABLE:
                    raise (QuotaExceeded if code == grpc.StatusCode.RESOURCE_EXHAUSTED else StoreError)(code, msg) from None
                if n == self.retries:
                    raise StoreUnavailable(code, f"{what} failed {n + 1} times; last: {msg}") from None
                self.counters.retries += 1
                delay = self.backoff_s * 2**n * (1 + random.random())
                log.info("kvstore %s: %s, retry %d in %.2f s", what, code.name, n + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    def _deadline(self, nbytes: int) -> float:
        return self.timeout_s + nbytes / WIRE_RATE_FLOOR

    # ---- put ----------------------------------------------------------------------
    async def put(self, key: str, cache: CompactCache | Prepared, precision: str | None = None) -> int:
        """Store `cache` under `key` (recall originals as separate entries), its K/V rows at
        `precision` (codec: "fp32", "bf16", "fp16", "int8", "int4"; None = the cache's own dtype); return bytes sent.
        A `Prepared` cache (codec.prepare, store-ready: rows already in the wire format, recall blobs
        made) goes as it is; `precision` must then be None or its own."""
        if not isinstance(cache, Prepared):
            lossy = cache.layers and not quant.lossless(precision, cache.layers[0].keys.dtype)
            # quantising is numpy work that releases the GIL: off the event loop, which keeps serving
            cache = await asyncio.to_thread(prepare, cache, precision) if lossy else prepare(cache, precision)
        elif precision is not None and precision != cache.precision:
            raise ValueError(f"cache prepared at precision {cache.precision!r}, put asked for {precision!r}")
        # Frames are copied out of the tensors as they are sent, not all before the first one goes.
        return await self.put_encoded(key, encode_streaming(cache, chunk_size=self.chunk_size), cache.recall)

    async def put_encoded(self, key: str, seg: EncodedSegment | StreamingSegment, recall: list[RecallEntry] = ()) -> int:
        nbytes = seg.nbytes + sum(len(r.data) for r in recall)
        if isinstance(seg, StreamingSegment):
            num_chunks, frame_bytes, parts = seg.num_chunks, seg.frame_bytes, seg.frame_parts
        else:
            num_chunks, frame_bytes, parts = len(seg.chunks), sum(map(len, seg.chunks)), lambda i: (seg.chunks[i],)

        async def requests() -> AsyncIterator[pb.PutRequest | bytes]:
            yield pb.PutRequest(header=pb.PutHeader(key=key, header=seg.header, num_chunks=num_chunks,
                                                    total_bytes=frame_bytes))
            for i in range(num_chunks):
                # checksummed (chained CRC) and copied out of the tensors as gRPC takes it
                yield chunk_message(i, parts(i))
            for r in recall:
                for entry in recall_pieces(r, self.chunk_size):
                    yield pb.PutRequest(recall=entry)

        async def attempt() -> int:
            # Written by hand, not from a request iterator: when the server ends the call early
            # (quota, bad input) a racing write can fail with a bare INTERNAL from gRPC core; the
            # call's own status, awaited below, is the server's precise one.
            call = self.bulk[0](metadata=self.metadata, timeout=self._deadline(nbytes))
            try:
                try:
                    async for req in requests():
                        await call.write(req)
                    await call.done_writing()
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    pass
                await call
            finally:
                if not call.done():
                    call.cancel()
            return nbytes

        sent = await self._call(f"Put {key}", attempt)
        self.counters.bytes_sent += sent
        return sent

    # ---- get ----------------------------------------------------------------------
    async def get(self, key: str) -> CompactCache | None:
        """The cache stored under `key` (recall originals not included: see `recall`), or None."""
        return await self._call(f"Get {key}", lambda: self._get_once(key, decode=True))

    async def get_encoded(self, key: str) -> tuple[bytes, list[bytes]] | None:
        """The stored bytes, exactly as put: (header blob, chunk frames), or None."""
        return await self._call(f"Get {key}", lambda: self._get_once(key, decode=False))

    async def _get_once(self, key: str, decode: bool):
        call = self.bulk[1](pb.GetRequest(key=key), metadata=self.metadata, timeout=self.stream_timeout_s)
        dec, frames, received = None, [], 0
        try:
            async for msg in call:
                if msg.WhichOneof("part") == "header":
                    dec = Decoder(msg.header.header)
                    frames.append(msg.header.header)
                    received += len(msg.header.header)
                elif dec is not None:
                    data = msg.chunk.data  # a view into the received message (wire.parse_chunk)
                    dec.feed(data)
                    if not decode:
                        frames.append(bytes(data))
                    received += len(data)
                else:
                    raise CodecError("Get stream sent a chunk before the header")
            self.counters.bytes_received += received
            if dec is None:
                raise CodecError("Get stream ended without a header")
            if not decode:
                return frames[0], frames[1:]
            if dec.header.rows != "float32":  # dequantising / casting rows: numpy work off the event loop
                return await asyncio.to_thread(dec.finish)
            return dec.finish()  # fp32 rows: views of the payload
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        except CodecError as e:
            self.counters.corrupt_misses += 1
            log.warning("kvstore Get %s: damaged segment counted as a miss: %s", key, e)
            call.cancel()
            return None

    # ---- small calls --------------------------------------------------------------
    async def lookup(self, keys: list[str]) -> int:
        """How many leading keys of the chain are stored."""
        if not keys:
            return 0

        async def attempt() -> int:
            r = await self.stub.Lookup(pb.LookupRequest(keys=list(keys)), metadata=self.metadata, timeout=self.timeout_s)
            return r.stored_prefix

        return await self._call("Lookup", attempt)

    async def recall(self, key: str, layer: int, head: int, row: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Originals behind merged row `row` of head `head` in `layer` of segment `key`:
        (keys [m, d], values [m, d], positions [m]), or None when not stored."""

        async def attempt():
            try:
                blob = await self._recall_once(key, layer, head, row)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            try:
                return decode_recall(blob)
            except CodecError as e:
                self.counters.corrupt_misses += 1
                log.warning("kvstore Recall %s: damaged entry counted as a miss: %s", key, e)
                return None

        return await self._call(f"Recall {key}", attempt)

    async def _recall_once(self, key: str, layer: int, head: int, row: int) -> bytes:
        parts, total = [], None
        call = self.stub.Recall(pb.RecallRequest(key=key, layer=layer, head=head, row=row), metadata=self.metadata,
                                timeout=self.timeout_s)
        async for msg in call:
            total = msg.total_bytes if total is None else total
            parts.append(msg.data)
        blob = b"".join(parts)
        self.counters.bytes_received += len(blob)
        if total is not None and len(blob) != total:
            raise CodecError(f"Recall stream sent {len(blob)} of {total} bytes")
        return blob

    async def delete(self, key: str) -> bool:
        async def attempt() -> bool:
            r = await self.stub.Delete(pb.DeleteRequest(key=key), metadata=self.metadata, timeout=self.timeout_s)
            return r.deleted

        return await self._call(f"Delete {key}", attempt)

    async def stats(self) -> dict:
        """The tenant's usage as the server sees it, plus this client's counters."""

        async def attempt() -> dict:
            r = await self.stub.Stats(pb.StatsRequest(), metadata=self.metadata, timeout=self.timeout_s)
            return {"tenant": r.tenant, "tenant_bytes": r.tenant_bytes, "quota_bytes": r.quota_bytes,
                    "segments": r.segments, "ttl_s": r.ttl_s, "backend": r.backend, "evictions": r.evictions,
                    "evicted_bytes": r.evicted_bytes}

        out = await self._call("Stats", attempt)
        out["client"] = dict(vars(self.counters))
        return out

    # ---- coordination -------------------------------------------------------------
    async def acquire(self, name: str, holder: str, limit: int, ttl_s: float) -> tuple[bool, int]:
        """Take or renew `holder`'s slot of the tenant's semaphore `name`: (granted, held now)."""

        async def attempt() -> tuple[bool, int]:
            r = await self.stub.Acquire(pb.AcquireRequest(name=name, holder=holder, limit=limit, ttl_s=ttl_s),
                                        metadata=self.metadata, timeout=self.timeout_s)
            return r.granted, r.held

        return await self._call(f"Acquire {name}", attempt)

    async def release(self, name: str, holder: str) -> bool:
        async def attempt() -> bool:
            r = await self.stub.Release(pb.ReleaseRequest(name=name, holder=holder), metadata=self.metadata,
                                        timeout=self.timeout_s)
            return r.released

        return await self._call(f"Release {name}", attempt)

    async def put_record(self, key: str, data: bytes, ttl_s: float) -> None:
        async def attempt() -> None:
            await self.stub.PutRecord(pb.PutRecordRequest(key=key, data=data, ttl_s=ttl_s), metadata=self.metadata,
                                      timeout=self.timeout_s)

        await self._call(f"PutRecord {key}", attempt)

    async def get_record(self, key: str) -> bytes | None:
        async def attempt() -> bytes | None:
            try:
                r = await self.stub.GetRecord(pb.GetRecordRequest(key=key), metadata=self.metadata,
                                              timeout=self.timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND:
                    return None
                raise
            return r.data

        return await self._call(f"GetRecord {key}", attempt)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = self._stub = self._bulk = None

    async def __aenter__(self) -> "KVStoreClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
