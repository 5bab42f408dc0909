"""Failure behaviour: Redis killed mid-test, restarted; readers racing writers; a put cut off mid-stream."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis

from headwise.cache.codec import encode
from services.kvstore.errors import StoreUnavailable
from tests.kvstore.conftest import big_cache, settings, small_cache, start_service
from tests.test_codec import assert_same, same


async def test_redis_down_gives_unavailable_then_recovers(own_redis) -> None:
    svc = await start_service(settings(own_redis.url, redis_deadline_s=0.5))
    try:
        c = svc.client(retries=2, backoff_s=0.05, timeout_s=3.0)
        await c.put("before", small_cache())
        own_redis.kill()
        for call in (c.get("before"), c.lookup(["before"]), c.put("during", small_cache()), c.stats()):
            with pytest.raises(StoreUnavailable) as e:
                await asyncio.wait_for(call, timeout=15)  # a hang fails here, not at the suite's timeout
            assert e.value.code == grpc.StatusCode.UNAVAILABLE and "redis" in str(e.value)
        assert c.counters.retries >= 8
        own_redis.start()
        assert await c.get("before") is None  # a fresh Redis (no persistence): a miss, not an error
        cache = small_cache(3)
        await c.put("after", cache)
        assert_same(cache, await c.get("after"), recall_data=False)
    finally:
        await svc.close()


async def test_health_reports_not_serving_while_redis_is_down(own_redis) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.kvstore.server import _check_health

    svc = await start_service(settings(own_redis.url, redis_deadline_s=0.5))
    try:
        own_redis.kill()
        await _check_health(svc.server)
        async with grpc.aio.insecure_channel(svc.addr) as ch:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert r.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        own_redis.start()
        await svc.close()


async def test_liveness_stays_serving_while_readiness_follows_redis(own_redis) -> None:
    """Killing Redis turns readiness ("" and the KVStore name) NOT_SERVING through the server's own
    watcher, while liveness (what the k8s livenessProbe asks) stays SERVING; both recover."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from services.kvstore.protocol import LIVENESS, SERVICE

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    svc = await start_service(settings(own_redis.url, redis_deadline_s=0.5))
    try:
        async with grpc.aio.insecure_channel(svc.addr) as ch:
            stub = health_pb2_grpc.HealthStub(ch)

            async def status(name: str) -> int:
                return (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status

            async def wait_for(name: str, want: int) -> None:
                for _ in range(100):  # the watcher checks every 2 s; a Redis call gives up after 0.5 s
                    if await status(name) == want:
                        return
                    await asyncio.sleep(0.1)
                raise AssertionError(f"health {name!r} never became {want}")

            assert [await status(n) for n in ("", SERVICE, LIVENESS)] == [serving] * 3
            own_redis.kill()
            await wait_for("", not_serving)
            assert await status(SERVICE) == not_serving
            assert await status(LIVENESS) == serving
            own_redis.start()
            await wait_for("", serving)
            assert await status(LIVENESS) == serving
    finally:
        await svc.close()


async def test_reader_racing_writers_sees_all_or_nothing(service, redis_url) -> None:
    """Writers replace one key with different multi-chunk caches while readers read it."""
    versions = [big_cache(rows=600, seed=s) for s in range(3)]
    writer, reader = service.client(), service.client()
    seen = {"whole": 0, "miss": 0}

    async def write() -> None:
        for i in range(9):
            await writer.put("hot", versions[i % 3])

    async def read() -> None:
        for _ in range(30):
            got = await reader.get("hot")
            if got is None:
                seen["miss"] += 1
                continue
            assert any(same(got, v) for v in versions), "a reader saw a mix of two puts"
            seen["whole"] += 1
            await asyncio.sleep(0)

    await asyncio.gather(write(), read(), read())
    assert seen["whole"] > 0
    with redis.Redis.from_url(redis_url) as r:  # replaced uploads were cleaned up
        assert len(r.keys("hw:acme:c:*")) == len(encode(versions[0]).chunks)


async def test_put_cut_off_mid_stream_leaves_nothing(service, redis_url) -> None:
    """A client that goes away mid-put: the server aborts the upload and deletes what it staged."""
    from services.protos.headwise.v1 import kvstore_pb2 as pb
    from services.protos.headwise.v1 import kvstore_pb2_grpc as pb_grpc
    from tests.kvstore.test_service import MD

    seg = encode(big_cache(rows=3000), chunk_size=1 << 20)
    sent = asyncio.Event()

    async def gen():
        yield pb.PutRequest(header=pb.PutHeader(key="cut", header=seg.header, num_chunks=len(seg.chunks),
                                                total_bytes=sum(map(len, seg.chunks))))
        for i, c in enumerate(seg.chunks[:-1]):
            yield pb.PutRequest(chunk=pb.Chunk(index=i, data=c))
        sent.set()
        await asyncio.sleep(30)

    async with grpc.aio.insecure_channel(service.addr) as ch:
        call = pb_grpc.KVStoreStub(ch).Put(gen(), metadata=MD)
        await asyncio.wait_for(sent.wait(), 10)
        await asyncio.sleep(0.2)
        call.cancel()
    with redis.Redis.from_url(redis_url) as r:
        for _ in range(50):
            if not r.keys("hw:acme:*"):
                break
            await asyncio.sleep(0.1)
        assert r.keys("hw:acme:*") == []
