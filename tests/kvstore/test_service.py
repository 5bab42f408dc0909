"""The KV store over real gRPC on loopback and a real Redis: round trips, tenancy, auth, bad input."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from headwise.cache.codec import CODEC_VERSION, MAX_CHUNK_BYTES, encode, encode_recall
from services.kvstore.errors import QuotaExceeded, StoreError
from services.kvstore.protocol import TENANT_HEADER, TOKEN_HEADER
from services.protos.headwise.v1 import kvstore_pb2 as pb
from services.protos.headwise.v1 import kvstore_pb2_grpc as pb_grpc
from tests.kvstore.conftest import TOKEN, big_cache, settings, small_cache, start_service
from tests.test_codec import assert_same

MD = ((TOKEN_HEADER, TOKEN), (TENANT_HEADER, "acme"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_cache_round_trip_and_recall(service, dtype) -> None:
    c = service.client()
    cache = small_cache(1, dtype=dtype)
    sent = await c.put("seg-1", cache)
    assert sent == encode(cache, include_recall=False).nbytes + sum(len(e.data) for e in encode_recall(cache))
    back = await c.get("seg-1")
    assert_same(cache, back, recall_data=False)
    k, v, pos = await c.recall("seg-1", layer=1, head=0, row=1)
    r = cache.layers[1].recall
    assert torch.equal(k, r.keys[2:4]) and torch.equal(v, r.values[2:4]) and torch.equal(pos, r.positions[2:4])
    assert await c.recall("seg-1", 1, 1, 0) is None  # not a merged row
    assert await c.get("nope") is None


async def test_bytes_come_back_exactly_as_put(service) -> None:
    c = service.client()
    seg = encode(big_cache(), chunk_size=MAX_CHUNK_BYTES)
    assert len(seg.chunks) >= 4
    await c.put_encoded("big", seg)
    header, chunks = await c.get_encoded("big")
    assert header == seg.header and chunks == seg.chunks
    assert service.metrics.value("headwise_kvstore_hits_total", tenant="acme") == 1


async def test_lookup_delete_stats(service) -> None:
    c = service.client()
    for k in ("a", "b", "d"):
        await c.put(k, small_cache())
    assert await c.lookup(["a", "b", "c", "d"]) == 2
    assert await c.lookup([]) == 0
    s = await c.stats()
    assert s["segments"] == 3 and s["backend"] == "redis" and s["tenant"] == "acme"
    assert await c.delete("b") is True and await c.delete("b") is False
    assert await c.lookup(["a", "b"]) == 1
    assert (await c.stats())["segments"] == 2


async def test_tenant_cannot_see_another_tenants_keys(service) -> None:
    a, b = service.client("acme"), service.client("globex")
    await a.put("doc", small_cache())
    assert await b.get("doc") is None
    assert await b.lookup(["doc"]) == 0
    assert await b.recall("doc", 0, 0, 0) is None
    assert await b.delete("doc") is False
    assert await a.get("doc") is not None


async def test_wrong_token_and_bad_tenant_are_rejected(service) -> None:
    with pytest.raises(StoreError) as e:
        await service.client(token="wrong").lookup(["a"])
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED and "service token" in str(e.value)
    for tenant in ("", "Acme", "a:b", "x" * 64):
        with pytest.raises(StoreError) as e:
            await service.client(tenant=tenant).get("k")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "tenant" in str(e.value)
    with pytest.raises(StoreError) as e:
        await service.client().get("bad key with spaces")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "segment key" in str(e.value)


async def test_quota_gives_resource_exhausted_and_nothing_half_written(redis_url) -> None:
    svc = await start_service(settings(redis_url, tenant_quota_bytes=20_000))
    try:
        c = svc.client()
        await c.put("small", small_cache())
        with pytest.raises(QuotaExceeded) as e:
            await c.put("big", big_cache(rows=200))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in str(e.value)
        assert await c.get("big") is None and (await c.stats())["segments"] == 1
        with redis.Redis.from_url(redis_url) as r:
            assert r.keys("hw:acme:m:*") == [b"hw:acme:m:small"]
            assert len(r.keys("hw:acme:c:*")) == len(encode(small_cache()).chunks)
    finally:
        await svc.close()


async def test_checksum_mismatch_on_read_is_a_miss_and_a_metric(service, redis_url) -> None:
    c = service.client()
    await c.put("k", big_cache(rows=1000))
    with redis.Redis.from_url(redis_url) as r:
        chunk = sorted(r.keys("hw:acme:c:*"))[0]
        data = bytearray(r.get(chunk))
        data[100] ^= 0xFF
        r.set(chunk, bytes(data))
    assert await c.get("k") is None
    assert service.metrics.value("headwise_kvstore_misses_total", tenant="acme", reason="checksum") == 1


# ---- bad input on the raw stub -------------------------------------------------------
async def raw_put(service, messages, metadata=MD) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(service.addr, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        async def gen():
            for m in messages:
                yield m

        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.KVStoreStub(ch).Put(gen(), metadata=metadata, timeout=10)
        return e.value


def put_messages(cache=None, key: str = "k", chunk_size: int = 4096):
    seg = encode(cache or big_cache(rows=100), chunk_size=chunk_size)
    head = pb.PutRequest(header=pb.PutHeader(key=key, header=seg.header, num_chunks=len(seg.chunks),
                                             total_bytes=sum(map(len, seg.chunks))))
    return head, [pb.PutRequest(chunk=pb.Chunk(index=i, data=c)) for i, c in enumerate(seg.chunks)]


async def assert_nothing_stored(service) -> None:
    assert await service.client().lookup(["k"]) == 0


async def test_missing_header(service) -> None:
    _, chunks = put_messages()
    e = await raw_put(service, chunks)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "must start with a header" in e.details()
    e = await raw_put(service, [])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty stream" in e.details()


async def test_wrong_order_duplicate_and_truncated(service) -> None:
    head, chunks = put_messages()
    e = await raw_put(service, [head, chunks[1], chunks[0], *chunks[2:]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk 1 arrived where chunk 0 was expected" in e.details()
    e = await raw_put(service, [head, chunks[0], chunks[0], *chunks[1:]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk 0 arrived where chunk 1 was expected" in e.details()
    e = await raw_put(service, [head, *chunks[:-1]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and f"after {len(chunks) - 1} of {len(chunks)} chunks" in e.details()
    await assert_nothing_stored(service)


async def test_oversize_chunk(service) -> None:
    head, chunks = put_messages()
    big = pb.PutRequest(chunk=pb.Chunk(index=0, data=b"\0" * (2 * MAX_CHUNK_BYTES)))
    e = await raw_put(service, [head, big])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of" in e.details()
    await assert_nothing_stored(service)


async def test_unknown_codec_version_and_corrupted_chunk(service) -> None:
    head, chunks = put_messages()
    future = bytearray(head.header.header)
    future[4:6] = (CODEC_VERSION + 7).to_bytes(2, "little")
    bad = pb.PutRequest()
    bad.CopyFrom(head)
    bad.header.header = bytes(future)
    e = await raw_put(service, [bad, *chunks])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"codec version {CODEC_VERSION + 7} is not supported" in e.details()
    damaged = pb.PutRequest()
    damaged.CopyFrom(chunks[2])
    damaged.chunk.data = damaged.chunk.data[:-1] + bytes([damaged.chunk.data[-1] ^ 1])
    e = await raw_put(service, [head, *chunks[:2], damaged, *chunks[3:]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "chunk 2 checksum mismatch" in e.details()
    await assert_nothing_stored(service)


async def test_corrupted_chunk_after_staged_batches_leaves_nothing(service, redis_url) -> None:
    """Chunks are checked beside the Redis writes (worker threads): a damaged chunk in a later batch
    still rejects the put with its precise message, and the batches staged before it are deleted."""
    head, chunks = put_messages(big_cache(rows=6000), chunk_size=MAX_CHUNK_BYTES)
    assert len(chunks) >= 10  # several 4 MiB batches
    bad = len(chunks) - 2
    damaged = pb.PutRequest()
    damaged.CopyFrom(chunks[bad])
    damaged.chunk.data = damaged.chunk.data[:500] + bytes([damaged.chunk.data[500] ^ 0x10]) + damaged.chunk.data[501:]
    e = await raw_put(service, [head, *chunks[:bad], damaged, *chunks[bad + 1:]])
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and f"chunk {bad} checksum mismatch" in e.details()
    await assert_nothing_stored(service)
    with redis.Redis.from_url(redis_url) as r:
        assert r.keys("hw:acme:*") == []


async def test_wrong_token_on_put(service) -> None:
    head, chunks = put_messages()
    e = await raw_put(service, [head, *chunks], metadata=((TOKEN_HEADER, "nope"), (TENANT_HEADER, "acme")))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    e = await raw_put(service, [head, *chunks], metadata=((TENANT_HEADER, "acme"),))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection(service) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(service.addr) as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="headwise.v1.KVStore"))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        stream = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for resp in stream for s in resp.list_services_response.service]
        assert "headwise.v1.KVStore" in names and "grpc.health.v1.Health" in names


async def test_metrics_over_http(redis_url) -> None:
    svc = await start_service(settings(redis_url, metrics_enabled=True, kvstore_metrics_port=0))
    try:
        c = svc.client()
        await c.put("k", small_cache())
        await c.get("k")
        await c.get("missing")
        body = urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics.http_port}/metrics", timeout=5).read().decode()
        assert 'headwise_kvstore_hits_total{tenant="acme"} 1.0' in body
        assert 'headwise_kvstore_misses_total{reason="absent",tenant="acme"} 1.0' in body
        assert 'headwise_kvstore_tenant_bytes{tenant="acme"}' in body
        assert 'headwise_kvstore_latency_seconds_count{method="Put"} 1.0' in body
    finally:
        await svc.close()


async def test_memory_backend_serves_the_same_api() -> None:
    svc = await start_service(settings("memory://"))
    try:
        c = svc.client()
        cache = small_cache(5)
        await c.put("k", cache)
        assert_same(cache, await c.get("k"), recall_data=False)
        assert (await c.stats())["backend"] == "memory"
    finally:
        await svc.close()


async def test_acquire_release_and_records_through_the_service(service) -> None:
    a, b = service.client("acme"), service.client("globex")
    assert await a.acquire("streams", "r1", 1, 30) == (True, 1)
    assert await a.acquire("streams", "r2", 1, 30) == (False, 1)
    assert await b.acquire("streams", "r2", 1, 30) == (True, 1)
    assert await a.release("streams", "r1") is True and await a.acquire("streams", "r2", 1, 30) == (True, 1)
    await a.put_record("session-1", b"{}", 60)
    assert await a.get_record("session-1") == b"{}" and await b.get_record("session-1") is None
    assert await a.get_record("nope") is None


async def test_coordination_bad_input_is_invalid_argument(service) -> None:
    c = service.client()
    for call in (c.acquire("streams", "r", 0, 30), c.acquire("streams", "r", 1, 0), c.acquire("bad name!", "r", 1, 30),
                 c.put_record("k", b"x" * ((1 << 20) + 1), 30), c.put_record("k", b"x", -1)):
        with pytest.raises(StoreError) as e:
            await call
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
