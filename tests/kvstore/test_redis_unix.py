"""A store that reaches Redis over a unix domain socket (a sidecar Redis, as bench.kvstore's
`--redis-unix` measures): start_redis's unix socket, its unix:// URL, and a real put/get round
trip through the store over it, every byte landing in the same Redis the TCP URL reaches."""

from __future__ import annotations

import os
import stat

import redis
import torch

from bench.kvstore import bench_cache
from services.kvstore.redis_proc import RedisProcess, start_redis
from tests.kvstore.conftest import big_cache, settings, start_service


def test_unixsocket_builds_the_socket_arguments_and_url() -> None:
    p = RedisProcess(6399, unixsocket=True)
    try:
        args = p.args()
        sock = os.path.join(p.workdir, "redis.sock")
        i = args.index("--unixsocket")
        assert args[i + 1] == sock and args[args.index("--unixsocketperm") + 1] == "700"
        assert p.unix_url == f"unix://{sock}?db=0"
        tcp_only = RedisProcess(6399)
        assert "--unixsocket" not in tcp_only.args() and tcp_only.socket_path is None
        tcp_only.stop()
    finally:
        p.stop()  # removes the workdir (never started)


async def test_a_put_and_get_through_the_store_over_a_unix_socket_redis() -> None:
    rp = start_redis(unixsocket=True)
    try:
        assert stat.S_ISSOCK(os.stat(rp.socket_path).st_mode)
        svc = await start_service(settings(rp.unix_url, redis_deadline_s=10.0))
        try:
            assert svc.server.kvstore.backend.put_sender == "loop"
            client = svc.client()
            cache = big_cache(rows=3000)  # several chunks
            await client.put("doc", cache)
            got = await client.get("doc")
            assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                       for a, b in zip(got.layers, cache.layers, strict=True))
            over_tcp = redis.Redis.from_url(rp.url)
            try:  # the same Redis: the segment's keys are there over TCP too
                assert any(b":m:doc" in k for k in over_tcp.scan_iter("hw:*"))
            finally:
                over_tcp.close()
            await client.delete("doc")
            assert await client.get("doc") is None
        finally:
            await svc.close()
    finally:
        rp.stop()


async def test_bench_cache_measures_the_unix_socket_store_in_the_same_rounds() -> None:
    rp = start_redis(unixsocket=True)
    r = redis.Redis.from_url(rp.url)
    tcp = await start_service(settings(rp.url, redis_deadline_s=10.0))
    unix = await start_service(settings(rp.unix_url, redis_deadline_s=10.0))
    try:
        row = await bench_cache(tcp.client("bench"), r, "small", big_cache(rows=1500), repeats=2, warmup=1,
                                unix_client=unix.client("bench"))
        assert row["put_unix_ms"] > 0 and 0 < row["ratio_put_unix_paired"] < float("inf")
        assert row["put_unix_mb_s"] > 0
        assert (await unix.client("bench").stats())["segments"] == 0  # its puts deleted too
        assert (await tcp.client("bench").stats())["segments"] == 0
    finally:
        r.close()
        await tcp.close()
        await unix.close()
        rp.stop()
