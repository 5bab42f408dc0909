"""bench.kvstore with int8 rows and the bare gRPC floor measured in the same rounds."""

from __future__ import annotations


import grpc
import pytest
import redis
from rich.console import Console

from bench.grpc_floor import floor_stub, forward_stub, start_floor
from bench.kvstore import bench_cache, table
from headwise.cache.codec import encode, stored_nbytes
from services.kvstore.protocol import GRPC_OPTIONS
from tests.kvstore.conftest import big_cache


@pytest.mark.slow  # the floor server is a process of its own (imports torch through the codec)
async def test_int8_rows_and_the_floor(service, redis_url) -> None:
    cache = big_cache(rows=600)
    client = service.client("bench")
    r = redis.Redis.from_url(redis_url)
    proc, port = start_floor(redis_url)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=GRPC_OPTIONS) as ch:
            rows = {p: await bench_cache(client, r, f"c-{p}", cache, 1, 0, None, p, floor_stub(ch), forward_stub(ch))
                    for p in ("fp32", "int8")}
    finally:
        proc.kill()
        proc.wait()
        r.close()
    for p, row in rows.items():
        assert row["precision"] == p and row["wire_bytes"] == encode(cache, include_recall=False, precision=p).nbytes
        assert row["stored_bytes"] == stored_nbytes(cache, p) and row["held_kv_bytes"] == cache.nbytes
        for k in ("floor_mb_s", "put_ms", "get_ms", "ratio_put_floor", "ratio_put_floor_paired", "prepare_ms",
                  "put_from_cache_ms", "ratio_put_from_cache_floor", "forward_mb_s", "forward_ms", "ratio_put_forward",
                  "ratio_put_forward_paired", "floor_then_set_ms", "ratio_put_floor_then_set_paired"):
            assert 0 < row[k] < float("inf"), k
    assert 3.5 < rows["fp32"]["stored_bytes"] / rows["int8"]["stored_bytes"] < 4
    assert (await client.stats())["segments"] == 0
    assert not r.keys("fwd:*")  # the forward floor drops its keys before each reply
    out = Console(width=300, record=True)
    out.print(table({f"c/{p}": row for p, row in rows.items()}))
    assert "c/int8" in out.export_text()
