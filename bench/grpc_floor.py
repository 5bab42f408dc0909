"""The floor under the KV store's Put: the same bytes through a bare grpc.aio stream, nothing else.

    python -m bench.grpc_floor                  # 95.8 MB and 23.9 MB (the bench.kvstore caches)
    python -m bench.grpc_floor --mb 24 --repeats 20

A server process (grpc.aio, the store's message limits, malloc tuned as the store's) receives a
client stream of 1 MiB messages and only counts them; no checks, no Redis. What is timed: one
stream call from the first write to the reply, the messages built before the clock starts.
It bounds what any gRPC-over-Python Put can reach on this machine, next to raw redis-py SET of
the same bytes (measured here too, on a Redis started for the purpose). bench.kvstore measures
the same floor, with `start_floor` and `floor_put`, in the same rounds as the store's Put.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc
import redis

from headwise.cache.codec import MAX_CHUNK_BYTES
from services.kvstore.memtune import tune_malloc
from services.kvstore.protocol import GRPC_OPTIONS as OPTS
from services.kvstore.redis_proc import start_redis
from services.kvstore.resp import LoopConnections, command, set_head


def _ident(b: bytes) -> bytes:
    return b


async def _serve(redis_url: str | None = None) -> None:
    async def put(requests, _context) -> bytes:
        n = 0
        async for m in requests:
            n += len(m)
        return n.to_bytes(8, "little")

    conns = LoopConnections.for_url(redis_url, 30.0) if redis_url else None
    calls = iter(range(1 << 62))

    async def forward(requests, _context) -> bytes:
        """The least a proxy can do: each message SET in Redis as it arrives (pipelined on one
        connection from the loop, one writev per message, as the store writes), then one UNLINK
        of those keys on the same connection (where the store sends its commit) and every reply
        read: one round trip at the end, as the store's. No checks, no commit."""
        pipe, n, call, keys = await conns.acquire(), 0, next(calls), []
        async for m in requests:
            keys.append(b"fwd:%d:%d" % (call, len(keys)))
            head, tail = set_head(keys[-1], len(m), 60_000)
            await pipe.send([head, m, tail])
            n += len(m)
        await pipe.send([command(b"UNLINK", *keys)])
        replies = await pipe.replies()
        assert all(r == b"OK" for r in replies[:-1]) and replies[-1] == len(keys), replies
        conns.release(pipe)
        return n.to_bytes(8, "little")

    server = grpc.aio.server(options=OPTS)
    handlers = {"Put": grpc.stream_unary_rpc_method_handler(put, request_deserializer=_ident, response_serializer=_ident)}
    if conns is not None:
        handlers["Forward"] = grpc.stream_unary_rpc_method_handler(forward, request_deserializer=_ident,
                                                                   response_serializer=_ident)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def start_floor(redis_url: str | None = None) -> tuple[subprocess.Popen, int]:
    """The counting server in its own process (as the store runs): (process, port). With
    `redis_url` it also serves Forward (`forward_stub`): the same stream, each message SET in Redis."""
    extra = ["--redis-url", redis_url] if redis_url else []
    proc = subprocess.Popen([sys.executable, "-m", "bench.grpc_floor", "--serve", *extra], stdout=subprocess.PIPE,
                            text=True)
    return proc, int(proc.stdout.readline())


def floor_stub(channel: grpc.aio.Channel):
    return channel.stream_unary("/floor.Floor/Put", request_serializer=_ident, response_deserializer=_ident)


def forward_stub(channel: grpc.aio.Channel):
    return channel.stream_unary("/floor.Floor/Forward", request_serializer=_ident, response_deserializer=_ident)


async def floor_put(put, msgs: list[bytes]) -> None:
    """One bare client stream of `msgs`, written by hand as the store client writes its Put."""
    call = put()
    for m in msgs:
        await call.write(m)
    await call.done_writing()
    assert int.from_bytes(await call, "little") == sum(map(len, msgs))


async def _measure(sizes_mb: list[float], repeats: int) -> None:
    proc, port = start_floor()
    rp = start_redis()
    try:
        r = redis.Redis.from_url(rp.url)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTS) as ch:
            put = floor_stub(ch)
            for mb in sizes_mb:
                total = int(mb * 1e6)
                msgs = [os.urandom(min(MAX_CHUNK_BYTES, total - i)) for i in range(0, total, MAX_CHUNK_BYTES)]
                blob = b"".join(msgs)
                grpc_t, raw_t = [], []
                for i in range(repeats + 1):
                    t = time.perf_counter()
                    await floor_put(put, msgs)
                    dt = time.perf_counter() - t
                    t = time.perf_counter()
                    r.set(f"floor-{i}", blob)
                    rt = time.perf_counter() - t
                    r.delete(f"floor-{i}")
                    if i:  # the first round warms the connection up
                        grpc_t.append(dt)
                        raw_t.append(rt)
                g, s = total / statistics.median(grpc_t) / 1e6, total / statistics.median(raw_t) / 1e6
                print(f"{mb:6.1f} MB in {len(msgs)} messages: bare gRPC stream {g:6.0f} MB/s, raw SET {s:6.0f} MB/s, "
                      f"gRPC/raw {g / s:.2f} (median of {repeats})")
        r.close()
    finally:
        proc.kill()
        proc.wait()
        rp.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, nargs="+", default=[95.8, 23.9])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--redis-url", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve:
        tune_malloc()
        asyncio.run(_serve(a.redis_url))
    else:
        asyncio.run(_measure(a.mb, a.repeats))


if __name__ == "__main__":
    main()
