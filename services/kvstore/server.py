"""The KV store gRPC server (grpc.aio): Put / Get / Lookup / Recall / Delete / Stats over a Backend.

`create_server(addr, settings) -> (server, port)` builds a server that is not yet started
(bind port 0 in tests). The server checks the service token and tenant of every call,
verifies every chunk against the codec header before storing it and again before sending
it back (a mismatch on read is a miss plus a metric, never bad bytes), and maps failures
to status codes whose message says what to change.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
import time
from dataclasses import dataclass
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from headwise.cache.codec import (
    FRAME_OVERHEAD,
    MAX_CHUNK_BYTES,
    CodecError,
    check_chunk,
    decode_recall,
    frame_crc,
    parse_header,
)
from services.kvstore.backend import Backend, BackendUnavailable, MemoryBackend, SegmentTooLarge, StoreFull
from services.kvstore.metrics import StoreMetrics
from services.kvstore.protocol import GRPC_OPTIONS, LIVENESS, MAX_FRAME, SERVICE, TENANT_HEADER, TOKEN_HEADER
from services.kvstore.settings import KVStoreSettings
from services.kvstore.wire import RawChunk, add_kvstore_handlers, chunk_message
from services.protos.headwise.v1 import kvstore_pb2 as pb
from services.protos.headwise.v1 import kvstore_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
SEGMENT_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
# A connection lives a minute (then GOAWAY; calls in flight get 30 s more): clients of a name that
# resolves to several replicas (a headless Service) re-resolve it, so replicas added later get calls.
SERVER_OPTIONS = [*GRPC_OPTIONS, ("grpc.max_connection_age_ms", 60_000), ("grpc.max_connection_age_grace_ms", 30_000)]
MAX_LOOKUP_KEYS = 1024
MAX_RECORD_BYTES = 1 << 20
MAX_TTL_S = 30 * 86400.0  # leases and records: at most 30 days
GET_BATCH = 4  # chunks per backend read; the next batch is fetched while this one is sent
RECALL_PIECE = MAX_CHUNK_BYTES  # a recall blob goes back in pieces of this size (any blob fits gRPC's cap)
INTERNAL_MESSAGE = "internal error in the KV store (logged there); nothing was changed by this call"


@dataclass
class Reject(Exception):
    """A call that ends with `code`; the message says what to change."""

    code: grpc.StatusCode
    message: str


class KVStoreServicer(pb_grpc.KVStoreServicer):
    def __init__(self, settings: KVStoreSettings, backend: Backend, metrics: StoreMetrics):
        self.settings, self.backend, self.metrics = settings, backend, metrics
        self._token = settings.service_token.encode()

    # ---- checks -------------------------------------------------------------------
    def tenant_of(self, context: grpc.aio.ServicerContext) -> str:
        md = {k: v for k, v in (context.invocation_metadata() or ())}
        token = md.get(TOKEN_HEADER, "")
        if not token or not hmac.compare_digest(str(token).encode(), self._token):
            raise Reject(grpc.StatusCode.UNAUTHENTICATED,
                         f"missing or wrong service token: send metadata '{TOKEN_HEADER}' with the cluster's token")
        tenant = md.get(TENANT_HEADER, "")
        if not TENANT_ID.match(str(tenant)):
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"tenant {tenant!r} is not valid: send metadata '{TENANT_HEADER}' matching {TENANT_ID.pattern}")
        return str(tenant)

    @staticmethod
    def check_key(key: str) -> str:
        if not SEGMENT_KEY.match(key):
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"segment key {key[:140]!r} is not valid: 1 to 128 characters of [A-Za-z0-9_.:-]")
        return key

    async def _run(self, method: str, context, body, before_status=None):
        """Run a handler: map Reject / backend errors to a status, record latency and code.
        `before_status` (a coroutine function) runs before a failure status is sent."""
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            return await body(self.tenant_of(context))
        except Exception as e:  # noqa: BLE001 - every failure leaves as a status, never a traceback
            code, message = self.status_of(method, e)
        finally:
            self.metrics.observe(method, code, time.perf_counter() - t0)
        if before_status is not None:
            await before_status()
        await context.abort(code, message)

    @staticmethod
    def status_of(method: str, e: Exception) -> tuple[grpc.StatusCode, str]:
        """The status a failure leaves with; a surprise is logged here and named nowhere else."""
        if isinstance(e, Reject):
            return e.code, e.message
        if isinstance(e, (SegmentTooLarge, StoreFull)):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
        if isinstance(e, BackendUnavailable):
            return grpc.StatusCode.UNAVAILABLE, f"store unavailable, retry later: {e}"
        log.error("kvstore %s failed", method, exc_info=e)
        return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE

    # ---- Put ----------------------------------------------------------------------
    async def Put(self, request_iterator: AsyncIterator[pb.PutRequest], context) -> pb.PutResponse:
        async def drain() -> None:
            # Read what the client is still sending before the status goes out, whatever the
            # rejection (token, input, quota, Redis): ending the call mid-upload makes the
            # client's racing write fail as a bare INTERNAL instead of this precise status.
            # Bounded by the segment limit and 10 s.
            await _drain(request_iterator, self.settings.max_segment_bytes, 10.0)

        return await self._run("Put", context, lambda tenant: self._put(tenant, request_iterator), drain)

    async def _put(self, tenant: str, requests: AsyncIterator[pb.PutRequest]) -> pb.PutResponse:
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("part") != "header":
            got = "an empty stream" if first is None else f"a {first.WhichOneof('part')} message"
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"Put must start with a header message; got {got}")
        h = first.header
        key = self.check_key(h.key)
        header = self._parse(h)
        limits = self.settings.limits(tenant)
        self.metrics.tenant_quota.labels(tenant).set(limits.quota_bytes)
        try:
            writer = await self.backend.begin_put(tenant, key, h.header, h.num_chunks, h.total_bytes, limits)
            try:
                await self._receive(key, header, requests, writer)
                stored, tenant_bytes, evicted = await writer.commit()
            except BaseException:
                await writer.abort()
                raise
        except (SegmentTooLarge, StoreFull) as e:
            self.metrics.refused(tenant, "too_large" if isinstance(e, SegmentTooLarge) else "store_full")
            raise
        self.metrics.stored(tenant, stored, tenant_bytes)
        self.metrics.evicted(tenant, evicted.segments, evicted.nbytes)
        return pb.PutResponse(stored_bytes=stored, tenant_bytes=tenant_bytes)

    def _parse(self, h: pb.PutHeader):
        try:
            header = parse_header(h.header)
        except CodecError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"bad segment header: {e}") from None
        frames = header.total_bytes + FRAME_OVERHEAD * header.num_chunks
        if h.num_chunks != header.num_chunks or h.total_bytes != frames:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"PutHeader says {h.num_chunks} chunks / {h.total_bytes} bytes, the codec header "
                         f"{header.num_chunks} chunks / {frames} bytes")
        if frames > self.settings.max_segment_bytes:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"segment of {frames} bytes is over the {self.settings.max_segment_bytes}-byte limit")
        return header

    async def _receive(self, key, header, requests, writer) -> None:
        index, prev_crc = 0, None
        recall = _RecallPieces(self.settings.max_segment_bytes - header.total_bytes - FRAME_OVERHEAD * header.num_chunks)
        async for msg in requests:
            part = msg.WhichOneof("part")
            if part == "chunk":
                if index >= header.num_chunks:
                    raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"chunk {msg.chunk.index} is past the {header.num_chunks} chunks the header announces")
                data = self._check_chunk(index, msg.chunk)
                # the full check (fields, chained CRC) may run in the backend's worker thread: it
                # needs only this frame and the previous frame's CRC field, itself checked in turn
                await writer.chunk(index, data, functools.partial(self._verify, header, index, data, prev_crc))
                index, prev_crc = index + 1, frame_crc(data)
            elif part == "recall":
                if index != header.num_chunks:
                    raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "recall entries must follow the last chunk")
                if (whole := recall.add(self._check_recall_piece(header, msg.recall))) is not None:
                    await writer.recall(*self._check_recall(whole))
            else:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected {part} message after the header")
        recall.finish()
        if index != header.num_chunks:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"Put stream of {key!r} ended after {index} of {header.num_chunks} chunks; nothing was stored")

    @staticmethod
    def _check_chunk(index: int, chunk: pb.Chunk | RawChunk) -> bytes | memoryview:
        data = chunk.data  # read once: a protobuf message copies its bytes field on every access
        if len(data) > MAX_FRAME:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk {chunk.index} is {len(data)} bytes, over the limit of {MAX_FRAME} "
                         f"({MAX_CHUNK_BYTES} payload + {FRAME_OVERHEAD} frame header)")
        if chunk.index != index:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"chunk {chunk.index} arrived where chunk {index} was expected: send chunks once each, in order")
        return data

    @staticmethod
    def _verify(header, index: int, data: bytes | memoryview, prev_crc: int | None) -> None:
        """The chunk's full check against the codec header (frame fields and checksum). The
        backend runs it before storing the chunk, possibly in a worker thread."""
        try:
            check_chunk(header, index, data, prev_crc)
        except CodecError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"rejected chunk: {e}") from None

    @staticmethod
    def _check_recall_piece(header, r: pb.RecallEntry) -> pb.RecallEntry:
        if r.layer >= len(header.layers) or r.head >= header.layers[r.layer].num_heads:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"recall entry names layer {r.layer} head {r.head}, outside the segment's shape")
        if len(r.data) > MAX_FRAME:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"recall piece of {len(r.data)} bytes is over {MAX_FRAME}: send larger entries in pieces "
                         f"(RecallEntry.part / parts)")
        return r

    @staticmethod
    def _check_recall(r: tuple[int, int, int, bytes]) -> tuple[int, int, int, bytes]:
        try:
            decode_recall(r[3])
        except CodecError as e:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"rejected recall entry of layer {r[0]} head {r[1]} row {r[2]}: {e}") from None
        return r

    # ---- Get ----------------------------------------------------------------------
    async def Get(self, request: pb.GetRequest, context) -> AsyncIterator[pb.GetResponse | bytes]:
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            tenant = self.tenant_of(context)
            async for msg in self._get(tenant, self.check_key(request.key)):
                yield msg
        except Exception as e:  # noqa: BLE001 - every failure leaves as a status
            code, message = self.status_of("Get", e)
            await context.abort(code, message)
        finally:
            self.metrics.observe("Get", code, time.perf_counter() - t0)

    async def _get(self, tenant: str, key: str) -> AsyncIterator[pb.GetResponse | bytes]:
        m = await self.backend.manifest(tenant, key)
        if m is None:
            self.metrics.miss(tenant, "absent")
            raise Reject(grpc.StatusCode.NOT_FOUND, f"segment {key!r} is not stored for tenant {tenant!r}")
        try:
            header = parse_header(m.header)
        except CodecError as e:
            raise self._corrupt(tenant, key, e) from None
        yield pb.GetResponse(header=pb.GetHeader(header=m.header, num_chunks=m.num_chunks, total_bytes=m.total_bytes))
        sent, prev_crc = len(m.header), None
        pending = asyncio.ensure_future(self.backend.chunks(tenant, m, 0, min(GET_BATCH, m.num_chunks)))
        try:
            for start in range(0, m.num_chunks, GET_BATCH):
                frames = await pending
                nxt = start + GET_BATCH
                if nxt < m.num_chunks:
                    pending = asyncio.ensure_future(self.backend.chunks(tenant, m, nxt, min(nxt + GET_BATCH, m.num_chunks)))
                for i, frame in enumerate(frames, start):
                    if frame is None:
                        self.metrics.miss(tenant, "vanished")
                        raise Reject(grpc.StatusCode.NOT_FOUND,
                                     f"segment {key!r} was replaced, deleted or evicted while being read (a miss)")
                    try:
                        check_chunk(header, i, frame, prev_crc)
                    except CodecError as e:
                        raise self._corrupt(tenant, key, e) from None
                    prev_crc = frame_crc(frame)
                    sent += len(frame)
                    yield chunk_message(i, (frame,))  # serialised here: one copy instead of three
        finally:
            pending.cancel()
        self.metrics.hit(tenant, sent)

    def _corrupt(self, tenant: str, key: str, e: Exception) -> Reject:
        self.metrics.miss(tenant, "checksum")
        log.warning("segment %s of tenant %s failed its checksum on read: %s", key, tenant, e)
        return Reject(grpc.StatusCode.NOT_FOUND, f"segment {key!r} failed its checksum on read ({e}); counted as a miss")

    # ---- small calls --------------------------------------------------------------
    async def Lookup(self, request: pb.LookupRequest, context) -> pb.LookupResponse:
        async def body(tenant: str):
            if len(request.keys) > MAX_LOOKUP_KEYS:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                             f"Lookup of {len(request.keys)} keys; at most {MAX_LOOKUP_KEYS} per call")
            keys = [self.check_key(k) for k in request.keys]
            return pb.LookupResponse(stored_prefix=await self.backend.lookup(tenant, keys))

        return await self._run("Lookup", context, body)

    async def Recall(self, request: pb.RecallRequest, context) -> AsyncIterator[pb.RecallResponse]:
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            blob = await self._recall(self.tenant_of(context), request)
            for start in range(0, len(blob), RECALL_PIECE):  # one read, so every piece is of one upload
                yield pb.RecallResponse(data=blob[start:start + RECALL_PIECE], total_bytes=len(blob) if not start else 0)
        except Exception as e:  # noqa: BLE001 - every failure leaves as a status
            code, message = self.status_of("Recall", e)
            await context.abort(code, message)
        finally:
            self.metrics.observe("Recall", code, time.perf_counter() - t0)

    async def _recall(self, tenant: str, request: pb.RecallRequest) -> bytes:
        key = self.check_key(request.key)
        blob = await self.backend.recall(tenant, key, request.layer, request.head, request.row)
        where = f"layer {request.layer} head {request.head} row {request.row} of segment {key!r}"
        if blob is None:
            self.metrics.miss(tenant, "absent")
            raise Reject(grpc.StatusCode.NOT_FOUND, f"no recall entry for {where} (never stored, or evicted)")
        try:
            decode_recall(blob)
        except CodecError as e:
            raise self._corrupt(tenant, key, e) from None
        return bytes(blob)

    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        async def body(tenant: str):
            deleted = await self.backend.delete(tenant, self.check_key(request.key))
            used, _ = await self.backend.usage(tenant)
            self.metrics.tenant_bytes.labels(tenant).set(used)
            return pb.DeleteResponse(deleted=deleted)

        return await self._run("Delete", context, body)

    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        async def body(tenant: str):
            used, segments = await self.backend.usage(tenant)
            evicted = await self.backend.evictions(tenant)
            lim = self.settings.limits(tenant)
            self.metrics.tenant_bytes.labels(tenant).set(used)
            self.metrics.tenant_quota.labels(tenant).set(lim.quota_bytes)
            return pb.StatsResponse(tenant=tenant, tenant_bytes=used, quota_bytes=lim.quota_bytes, segments=segments,
                                    ttl_s=int(lim.ttl_s), backend=self.backend.name, evictions=evicted.segments,
                                    evicted_bytes=evicted.nbytes)

        return await self._run("Stats", context, body)


    # ---- coordination -------------------------------------------------------------
    @staticmethod
    def _positive(what: str, value: float, unit: str) -> float:
        if not value > 0 or value > MAX_TTL_S:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"{what} must be in (0, {MAX_TTL_S}] {unit}, got {value}")
        return float(value)

    async def Acquire(self, request: pb.AcquireRequest, context) -> pb.AcquireResponse:
        async def body(tenant: str):
            name, holder = self.check_key(request.name), self.check_key(request.holder)
            if request.limit < 1:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"limit must be at least 1, got {request.limit}")
            ttl = self._positive("ttl_s", request.ttl_s, "seconds")
            granted, held = await self.backend.acquire(tenant, name, holder, request.limit, ttl)
            return pb.AcquireResponse(granted=granted, held=held)

        return await self._run("Acquire", context, body)

    async def Release(self, request: pb.ReleaseRequest, context) -> pb.ReleaseResponse:
        async def body(tenant: str):
            released = await self.backend.release(tenant, self.check_key(request.name), self.check_key(request.holder))
            return pb.ReleaseResponse(released=released)

        return await self._run("Release", context, body)

    async def PutRecord(self, request: pb.PutRecordRequest, context) -> pb.PutRecordResponse:
        async def body(tenant: str):
            key = self.check_key(request.key)
            if len(request.data) > MAX_RECORD_BYTES:
                raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                             f"record of {len(request.data)} bytes; at most {MAX_RECORD_BYTES} bytes")
            await self.backend.put_record(tenant, key, request.data, self._positive("ttl_s", request.ttl_s, "seconds"))
            return pb.PutRecordResponse()

        return await self._run("PutRecord", context, body)

    async def GetRecord(self, request: pb.GetRecordRequest, context) -> pb.GetRecordResponse:
        async def body(tenant: str):
            key = self.check_key(request.key)
            data = await self.backend.get_record(tenant, key)
            if data is None:
                raise Reject(grpc.StatusCode.NOT_FOUND, f"no record {key!r} (never put, or expired)")
            return pb.GetRecordResponse(data=data)

        return await self._run("GetRecord", context, body)


def make_backend(settings: KVStoreSettings) -> Backend:
    if settings.redis_url in ("", "memory://"):
        return MemoryBackend()
    if settings.redis_url.startswith("rediscluster://"):
        from services.kvstore.redis_cluster_backend import RedisClusterBackend

        return RedisClusterBackend(settings.redis_url, settings.redis_deadline_s)
    from services.kvstore.redis_backend import RedisBackend

    return RedisBackend(settings.redis_url, settings.redis_deadline_s, settings.kvstore_put_sender)


def create_server(addr: str = "127.0.0.1:0", settings: KVStoreSettings | None = None,
                  backend: Backend | None = None) -> tuple[grpc.aio.Server, int]:
    """A KV store server bound to `addr` (port 0 = a free port), not yet started.

    `server.kvstore` is the servicer (its backend and metrics); `await close_server(server)`
    stops it and closes the backend. Call from inside the event loop that will run it.
    """
    settings = settings or KVStoreSettings()
    metrics = StoreMetrics()
    servicer = KVStoreServicer(settings, backend or make_backend(settings), metrics)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_kvstore_handlers(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"could not bind the KV store to {addr}")
    if settings.metrics_enabled:
        metrics.serve(settings.kvstore_metrics_port)
    server.kvstore = servicer
    server.health = health_servicer
    server.health_task = None
    return server, port


async def start_server(server: grpc.aio.Server) -> None:
    """Start it and keep the health status in step with the backend: readiness ("" and the
    KVStore service name) NOT_SERVING while Redis is down; LIVENESS SERVING while this loop runs."""
    await server.start()
    if (risk := await getattr(server.kvstore.backend, "eviction_risk", _no_risk)()) is not None:
        log.warning("%s", risk)
    await server.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    await _check_health(server)
    server.health_task = asyncio.ensure_future(_watch_health(server))
    server.health_task.add_done_callback(functools.partial(_watcher_ended, server))


async def _no_risk() -> None:
    return None


def _watcher_ended(server: grpc.aio.Server, task: asyncio.Task) -> None:
    """The Redis watcher stopped: fine when the server is closing (cancelled); otherwise readiness
    is frozen, so liveness turns NOT_SERVING and the orchestrator restarts the process."""
    if task.cancelled():
        return
    log.error("kvstore health watcher died: %r; liveness now NOT_SERVING", task.exception())
    asyncio.ensure_future(server.health.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING))


async def _check_health(server: grpc.aio.Server) -> None:
    try:
        await server.kvstore.backend.ping()
        status = health_pb2.HealthCheckResponse.SERVING
    except BackendUnavailable:
        status = health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", SERVICE):
        await server.health.set(name, status)


async def _watch_health(server: grpc.aio.Server, every_s: float = 2.0) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await _check_health(server)
        except Exception:  # a surprise in one check must not stop the watcher
            log.exception("kvstore health check failed")


async def close_server(server: grpc.aio.Server, grace_s: float = 1.0) -> None:
    if getattr(server, "health_task", None) is not None:
        server.health_task.cancel()
    await server.stop(grace_s)
    await server.kvstore.backend.close()
    server.kvstore.metrics.close()


class _RecallPieces:
    """Joins the pieces of one recall entry at a time (consecutive messages, part 0, 1, ...),
    bounding the entries' bytes by what is left of the segment limit."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entry: tuple[int, int, int] | None = None
        self.parts: list[bytes] = []
        self.expected = 0

    def add(self, r: pb.RecallEntry) -> tuple[int, int, int, bytes] | None:
        """The whole entry when `r` completes one (layer, head, row, blob), else None."""
        self.budget -= len(r.data)
        if self.budget < 0:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, "segment with its recall entries is over the segment limit")
        where, parts = (r.layer, r.head, r.row), max(r.parts, 1)
        if r.part != (len(self.parts) if self.entry == where else 0) or (self.entry not in (None, where)):
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"recall piece {r.part} of layer {r.layer} head {r.head} row {r.row} is out of order: send "
                         f"an entry's pieces consecutively, part 0 to parts - 1")
        if self.entry is None:
            self.entry, self.expected = where, parts
        elif parts != self.expected:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT, f"recall pieces of layer {r.layer} head {r.head} row "
                                                           f"{r.row} disagree on parts ({parts} vs {self.expected})")
        self.parts.append(r.data)
        if len(self.parts) < self.expected:
            return None
        blob, self.entry, self.parts = b"".join(self.parts), None, []
        return (*where, blob)

    def finish(self) -> None:
        if self.entry is not None:
            raise Reject(grpc.StatusCode.INVALID_ARGUMENT,
                         f"Put stream ended inside a recall entry ({len(self.parts)} of {self.expected} pieces)")


async def _drain(requests: AsyncIterator, max_bytes: int, timeout_s: float) -> None:
    """Consume and discard the rest of a request stream: at most the messages a segment of
    max_bytes could take (chunks are at most 1 MiB, recall entries too), or timeout_s."""
    limit = max_bytes // (1 << 20) + 64

    async def consume() -> None:
        seen = 0
        async for _ in requests:
            seen += 1
            if seen > limit:
                return

    try:
        await asyncio.wait_for(consume(), timeout_s)
    except (asyncio.TimeoutError, grpc.RpcError):
        pass
