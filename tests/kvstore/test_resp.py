"""BulkReader and LoopPipe against a real Redis: exact values, misses, AUTH and SELECT, error
replies, a restarted server, URLs left to redis-py; the pipelined put writer's commit and abort."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis
from redis.exceptions import ResponseError

from headwise.cache.codec import encode
from services.kvstore.backend import BackendUnavailable, Limits, Manifest
from services.kvstore.redis_backend import RedisBackend
from services.kvstore.resp import BulkReader, LoopConnections, command, set_head
from tests.kvstore.conftest import big_cache
from tests.test_codec import assert_same


def test_values_come_back_exact(redis_url) -> None:
    r = redis.Redis.from_url(redis_url)
    values = {"a": b"", "b": b"x\r\n$-1\r\n*2\r\n", "c": os.urandom(3 << 20)}  # empty, RESP-looking, > socket buffers
    for k, v in values.items():
        r.set(k, v)
    reader = BulkReader.for_url(redis_url, 5.0)
    try:
        got = reader.get(["c", "missing", "a", "b"])
        assert [None if g is None else bytes(g) for g in got] == [values["c"], None, values["a"], values["b"]]
        assert bytes(reader.get(["b"])[0]) == values["b"]  # the pooled connection is reused cleanly
    finally:
        reader.close()
        r.close()


def test_error_reply_raises_and_the_next_call_works(redis_url) -> None:
    r = redis.Redis.from_url(redis_url)
    r.hset("h", "f", "v")
    r.set("s", b"ok")
    reader = BulkReader.for_url(redis_url, 5.0)
    try:
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            reader.get(["s", "h", "s"])  # replies after the error are left unread: that connection goes
        assert [bytes(v) for v in reader.get(["s", "s"])] == [b"ok", b"ok"]
    finally:
        reader.close()
        r.close()


def test_auth_and_db_from_the_url(own_redis) -> None:
    with redis.Redis.from_url(own_redis.url) as admin:
        admin.config_set("requirepass", "s3cr*t")
    base = own_redis.url.rsplit("/", 1)[0].replace("redis://", "redis://:s3cr%2At@")  # '*' quoted in the URL
    r = redis.Redis.from_url(f"{base}/3")
    r.set("k", b"in db 3")
    good = BulkReader.for_url(f"{base}/3", 5.0)
    other_db = BulkReader.for_url(f"{base}/0", 5.0)
    wrong = BulkReader.for_url(own_redis.url.replace("redis://", "redis://:nope@"), 5.0)
    try:
        assert bytes(good.get(["k"])[0]) == b"in db 3"
        assert other_db.get(["k"]) == [None]
        with pytest.raises(ResponseError):
            wrong.get(["k"])
    finally:
        for reader in (good, other_db, wrong):
            reader.close()
        r.close()

    async def loop_writes() -> None:  # the put path's connections say AUTH and SELECT too
        conns = LoopConnections.for_url(f"{base}/3", 5.0)
        try:
            pipe = await conns.acquire()
            await pipe.send([command(b"SET", b"w", b"from the loop")])
            assert await pipe.replies() == [b"OK"]
            conns.release(pipe)
        finally:
            conns.close()
        with pytest.raises(ResponseError):
            await LoopConnections.for_url(own_redis.url.replace("redis://", "redis://:nope@"), 5.0).acquire()

    asyncio.run(loop_writes())
    with redis.Redis.from_url(f"{base}/3") as r3:
        assert r3.get("w") == b"from the loop"


def test_a_restarted_redis_is_reconnected_and_a_dead_one_raises(own_redis) -> None:
    reader = BulkReader.for_url(own_redis.url, 2.0)
    try:
        redis.Redis.from_url(own_redis.url).set("k", b"1")
        assert bytes(reader.get(["k"])[0]) == b"1"  # leaves a pooled connection behind
        own_redis.kill()
        with pytest.raises(OSError):
            reader.get(["k"])
        own_redis.start()
        redis.Redis.from_url(own_redis.url).set("k", b"2")
        assert bytes(reader.get(["k"])[0]) == b"2"
    finally:
        reader.close()


def test_urls() -> None:
    assert BulkReader.for_url("rediss://127.0.0.1:6380/0", 1.0) is None  # TLS: redis-py's
    assert BulkReader.for_url("unix:///tmp/redis.sock?db=2", 1.0).addr == "/tmp/redis.sock"
    assert BulkReader.for_url("redis://h:7000/1", 1.0).addr == ("h", 7000)


@pytest.mark.parametrize("bulk_reader", [True, False])
async def test_store_get_reads_chunks_with_or_without_the_reader(service, bulk_reader) -> None:
    """The store's Get through BulkReader (redis://) and through redis-py's MGET (what a TLS URL gets)."""
    backend = service.server.kvstore.backend
    assert backend._bulk is not None
    if not bulk_reader:
        backend._bulk.close()
        backend._bulk = None
    cache = big_cache(rows=1500)
    client = service.client()
    await client.put("doc", cache)
    assert_same(cache, await client.get("doc"), recall_data=False)
    header, frames = await client.get_encoded("doc")
    enc = encode(cache, include_recall=False)
    assert len(frames) == len(enc.chunks) > 2 and [len(f) for f in frames] == [len(c) for c in enc.chunks]


async def test_a_paused_redis_gives_unavailable_within_the_deadline(own_redis) -> None:
    """Redis stopped (SIGSTOP, not dead: connections stay open) under a chunk read: the backend
    raises BackendUnavailable at its deadline instead of hanging, and reads again once it resumes."""
    backend = RedisBackend(own_redis.url, deadline_s=0.5)
    key = backend._ckey("acme", "up", 0)
    redis.Redis.from_url(own_redis.url).set(key, b"frame")
    m = Manifest("doc", "up", b"", 1, 5, 5)
    try:
        assert [bytes(f) for f in await backend.chunks("acme", m, 0, 1)] == [b"frame"]
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            t = time.monotonic()
            with pytest.raises(BackendUnavailable, match="chunks 0..0"):
                await asyncio.wait_for(backend.chunks("acme", m, 0, 1), 10)
            assert time.monotonic() - t < 3
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        assert [bytes(f) for f in await backend.chunks("acme", m, 0, 1)] == [b"frame"]
    finally:
        await backend.close()


# ---- LoopPipe / the pipelined put writer ------------------------------------------------
async def test_loop_pipe_writes_values_exactly_and_reads_replies_in_order(redis_url) -> None:
    conns = LoopConnections.for_url(redis_url, 5.0)
    big = os.urandom(5 << 20)  # larger than the socket buffers: the send has to wait for Redis
    try:
        pipe = await conns.acquire()
        head, tail = set_head(b"big", len(big), 60_000)
        pipe.send_nowait([head, memoryview(big)[: len(big)], tail]) or await pipe.finish_sends()
        await pipe.send([command(b"SET", b"s", b"x\r\n$-1\r\n")])  # RESP-looking value
        await pipe.send([command(b"HSET", b"s", b"f", b"v")])  # WRONGTYPE: an error reply, not an exception
        await pipe.send([command(b"GET", b"s"), command(b"GET", b"missing")])  # two commands in one send
        pipe.pending += 1  # (a send counts one)
        await pipe.send([command(b"EVAL", b"return {1, -2, 'x'}", b"0")])
        replies = await pipe.replies()
        assert replies[:2] == [b"OK", b"OK"] and isinstance(replies[2], ResponseError) and "WRONGTYPE" in str(replies[2])
        assert replies[3:] == [b"x\r\n$-1\r\n", None, [1, -2, b"x"]]
        conns.release(pipe)
        again = await conns.acquire()
        assert again is pipe  # clean: reused
        await again.send([command(b"PTTL", b"big")])
        assert 0 < (await again.replies())[0] <= 60_000
        conns.release(again)
        with redis.Redis.from_url(redis_url) as r:
            assert r.get("big") == big
    finally:
        conns.close()


async def test_loop_pipe_pool_drops_a_connection_redis_closed(own_redis) -> None:
    conns = LoopConnections.for_url(own_redis.url, 2.0)
    try:
        pipe = await conns.acquire()
        await pipe.send([command(b"PING")])
        assert await pipe.replies() == [b"PONG"]
        conns.release(pipe)
        own_redis.kill()
        own_redis.start()
        fresh = await conns.acquire()  # the pooled one reads EOF: replaced
        assert fresh is not pipe
        await fresh.send([command(b"PING")])
        assert await fresh.replies() == [b"PONG"]
        conns.release(fresh)
    finally:
        conns.close()


async def test_a_put_whose_staged_chunk_vanished_is_not_committed(redis_url) -> None:
    """The commit checks every staged key first: a write that did not land (refused, expired,
    deleted) makes the commit change nothing, and the put is refused as retryable."""
    backend = RedisBackend(redis_url, deadline_s=5.0)
    seg = encode(big_cache(rows=1500), include_recall=False)
    try:
        w = await backend.begin_put("acme", "doc", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), Limits())
        assert type(w).__name__ == "_PipeWriter"
        for i, ch in enumerate(seg.chunks):
            await w.chunk(i, ch)
        await w._pipe.replies()  # every write landed; then one goes
        with redis.Redis.from_url(redis_url) as r:
            assert r.delete(backend._ckey("acme", w.upload, 1)) == 1
            with pytest.raises(BackendUnavailable, match="lost a staged chunk"):
                await w.commit()
            assert await backend.manifest("acme", "doc") is None and not r.keys("hw:acme:*")
    finally:
        await backend.close()


async def test_an_aborted_pipelined_put_leaves_nothing(redis_url) -> None:
    backend = RedisBackend(redis_url, deadline_s=5.0)
    seg = encode(big_cache(rows=3000), include_recall=False)
    try:
        w = await backend.begin_put("acme", "doc", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), Limits())
        for i, ch in enumerate(seg.chunks[:-1]):
            await w.chunk(i, ch)
        await w.recall(0, 0, 0, b"blob")
        await w.abort()  # writes still unanswered: the delete goes after them on the same connection
        with redis.Redis.from_url(redis_url) as r:
            assert not r.keys("hw:acme:*")
    finally:
        await backend.close()


async def test_a_pipelined_commit_after_redis_lost_its_scripts_still_commits(redis_url) -> None:
    """EVALSHA on the put's connection answers NOSCRIPT (a restarted or flushed Redis): the commit
    goes again through redis-py's script call, which loads it; the segment is stored once."""
    backend = RedisBackend(redis_url, deadline_s=5.0)
    seg = encode(big_cache(rows=600), include_recall=False)
    try:
        with redis.Redis.from_url(redis_url) as r:
            r.script_flush()
        w = await backend.begin_put("acme", "doc", seg.header, len(seg.chunks), sum(map(len, seg.chunks)), Limits())
        for i, ch in enumerate(seg.chunks):
            await w.chunk(i, ch)
        stored, used, _ = await w.commit()
        m = await backend.manifest("acme", "doc")
        assert m is not None and [bytes(c) for c in await backend.chunks("acme", m, 0, m.num_chunks)] == seg.chunks
        assert used == stored == seg.nbytes and (await backend.usage("acme")) == (stored, 1)
    finally:
        await backend.close()
