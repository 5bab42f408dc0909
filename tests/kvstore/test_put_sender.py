"""A put's writes to Redis from the event loop (the default) and from a sender thread (the
setting `kvstore_put_sender`): the same bytes stored, and the same guarantees: a put cut off
mid-stream leaves nothing readable and nothing staged, readers racing puts see a whole segment
or a miss, a Redis that stops taking writes fails the put within the deadline, nothing committed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import torch

from headwise.cache.codec import encode
from services.kvstore.backend import BackendUnavailable, Limits
from services.kvstore.redis_backend import PUT_SENDERS, STAGING_TTL_MS, RedisBackend
from services.kvstore.redis_proc import REDIS_MALLOC_TUNABLES, start_redis
from services.kvstore.resp import LoopConnections, ThreadSender, command, set_head
from services.kvstore.settings import KVStoreSettings
from services.kvstore.wire import chunk_message
from services.protos.headwise.v1 import kvstore_pb2 as pb
from tests.kvstore.conftest import TOKEN, big_cache, settings, start_service


@pytest.fixture(params=PUT_SENDERS)
async def sender_service(request, redis_url):
    svc = await start_service(settings(redis_url, kvstore_put_sender=request.param, redis_deadline_s=10.0))
    assert svc.server.kvstore.backend.put_sender == request.param
    yield svc
    await svc.close()


def _same(a, b) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values) and torch.equal(x.positions, y.positions)
               for x, y in zip(a.layers, b.layers, strict=True))


async def _until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.02)
    return cond()


async def test_a_put_through_either_sender_stores_the_exact_bytes(sender_service) -> None:
    cache = big_cache(rows=3000)  # ~6 MiB: several chunks, more than one look at the replies
    client = sender_service.client()
    await client.put("doc", cache)
    header, frames = await client.get_encoded("doc")
    seg = encode(cache, include_recall=False)
    assert len(frames) == len(seg.chunks) >= 6
    assert [bytes(f)[40:] for f in frames] == [c[40:] for c in seg.chunks]  # payloads (segment ids differ per put)
    assert _same(await client.get("doc"), cache)


async def test_a_put_cut_off_mid_stream_leaves_nothing_readable_or_staged(sender_service, redis_url) -> None:
    """Half the chunks are staged in Redis, the client cancels the call: no reader ever sees the
    segment, and the staged keys are deleted (not left to the staging TTL)."""
    client = sender_service.client()
    seg = encode(big_cache(rows=6000), include_recall=False)  # 12 chunks
    await client.put("doc", big_cache(rows=500, seed=1))  # an older version stays readable throughout
    old = await client.get_encoded("doc")
    call = client.bulk[0](metadata=client.metadata, timeout=30)
    await call.write(pb.PutRequest(header=pb.PutHeader(key="doc", header=seg.header, num_chunks=len(seg.chunks),
                                                       total_bytes=sum(map(len, seg.chunks)))))
    for i in range(6):
        await call.write(chunk_message(i, (seg.chunks[i],)))
    with redis.Redis.from_url(redis_url) as r:
        m = r.hgetall("hw:acme:m:doc")
        staged = lambda: [k for k in r.scan_iter("hw:acme:c:*") if not k.decode().startswith(f"hw:acme:c:{m[b'u'].decode()}:")]
        assert await _until(lambda: len(staged()) >= 3)  # the new upload's chunks are in Redis ...
        assert await client.get_encoded("doc") == old  # ... and readers still get the old segment, whole
        call.cancel()
        assert await _until(lambda: not staged())  # the aborted upload's keys are gone
        assert r.hgetall("hw:acme:m:doc") == m
    assert await client.get_encoded("doc") == old
    assert (await client.stats())["segments"] == 1


async def test_gets_racing_puts_see_a_whole_segment_or_nothing(sender_service) -> None:
    versions = [big_cache(rows=1500, seed=s) for s in range(3)]  # ~3 MiB each
    writer, reader = sender_service.client(), sender_service.client()
    done = False
    seen = {"none": 0, "whole": 0}

    async def write() -> None:
        nonlocal done
        try:
            for i in range(9):
                await writer.put("doc", versions[i % 3])
        finally:
            done = True

    async def read() -> None:
        while not done:
            got = await reader.get("doc")
            if got is None:
                seen["none"] += 1
            else:
                assert any(_same(got, v) for v in versions), "a get returned a mix of uploads"
                seen["whole"] += 1

    await asyncio.gather(write(), read())
    assert seen["whole"] >= 1
    assert _same(await reader.get("doc"), versions[8 % 3])


async def test_a_redis_that_stops_taking_writes_fails_the_put_within_the_deadline(own_redis) -> None:
    """Redis frozen mid-put (SIGSTOP): the sender thread cannot send, the put fails as
    BackendUnavailable within about the deadline, and once Redis is back nothing is committed; what
    Redis still had to read of the staged writes expires with the staging TTL (the cleanup's delete
    could not reach a frozen Redis)."""
    backend = RedisBackend(own_redis.url, deadline_s=0.5, put_sender="thread")
    seg = encode(big_cache(rows=12000), include_recall=False)  # 24 MiB: past the queue and the socket buffers
    w = await backend.begin_put("acme", "doc", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), Limits())
    try:
        await w.chunk(0, seg.chunks[0])
        own_redis.proc.send_signal(signal.SIGSTOP)
        t = time.monotonic()
        with pytest.raises(BackendUnavailable):
            for i in range(1, len(seg.chunks)):
                await w.chunk(i, seg.chunks[i])
            await w.commit()
        assert time.monotonic() - t < 5
        await w.abort()
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    try:
        assert await backend.manifest("acme", "doc") is None
        with redis.Redis.from_url(own_redis.url) as r:
            assert not r.keys("hw:acme:m:*") and not r.keys("hw:acme:idx")
            assert all(0 < r.pttl(k) <= STAGING_TTL_MS for k in r.keys("hw:acme:*"))
    finally:
        await backend.close()


async def test_the_sender_thread_sends_in_order_and_waits_when_its_queue_is_full(redis_url) -> None:
    from concurrent.futures import ThreadPoolExecutor

    conns = LoopConnections.for_url(redis_url, 5.0)
    values = [os.urandom(3 << 20) for _ in range(4)]  # 12 MiB through a 1 MiB queue: the loop has to wait
    pool = ThreadPoolExecutor(1)
    try:
        pipe = await conns.acquire()
        sender = ThreadSender(pipe, pool.submit, 1 << 20, 5.0)
        waits = 0
        for i, v in enumerate(values):
            head, tail = set_head(b"v%d" % i, len(v), 60_000)
            if (space := sender.put([head, memoryview(v), tail], len(v))) is not None:
                waits += 1
                await space
        assert sender.put([command(b"GET", b"v3")], 0) is None
        sender.close()
        await sender.done
        assert sender.error is None and waits >= 3
        replies = await pipe.replies()
        assert replies == [b"OK"] * 4 + [values[3]]
        conns.release(pipe)
        with redis.Redis.from_url(redis_url) as r:
            assert [r.get(f"v{i}") for i in range(4)] == values
    finally:
        conns.close()
        pool.shutdown()


def test_the_put_sender_setting_takes_thread_or_loop_only() -> None:
    assert KVStoreSettings(service_token=TOKEN).kvstore_put_sender == "loop"
    assert KVStoreSettings(service_token=TOKEN, kvstore_put_sender="thread").kvstore_put_sender == "thread"
    with pytest.raises(ValueError):
        KVStoreSettings(service_token=TOKEN, kvstore_put_sender="threads")
    with pytest.raises(ValueError, match="put_sender"):
        RedisBackend("redis://127.0.0.1:1/0", put_sender="both")


def test_the_redis_started_here_keeps_freed_pages_unless_told_not_to() -> None:
    for keep in (True, False):
        proc = start_redis(keep_freed_pages=keep)
        try:
            # (glibc cuts the variable up in place as it reads it: look for its first tunable)
            first = b"GLIBC_TUNABLES=" + REDIS_MALLOC_TUNABLES.split(":")[0].encode()
            env = Path(f"/proc/{proc.proc.pid}/environ").read_bytes().split(b"\0")
            assert any(e.startswith(first) for e in env) == keep
        finally:
            proc.stop()
