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


def test_the_floor_bound_is_the_floor_wall_over_the_unavoidable_cpu_per_core() -> None:
    from bench.kvstore import bound_lines, floor_bound

    cpu = {"floor": 80.0, "raw_set": 60.0, "forward": 150.0, "put": 160.0}
    b = floor_bound(cpu, 50.0, 2)  # second hop: min(raw SET 60, forward - floor 70)
    assert b["second_hop_cpu_ms"] == 60.0 and b["unavoidable_put_cpu_ms"] == 140.0
    assert b["put_floor_bound"] == 50.0 * 2 / 140.0 and b["put_floor_bound_own_cpu"] == 50.0 * 2 / 160.0
    assert floor_bound(cpu | {"forward": 100.0}, 50.0, 2)["second_hop_cpu_ms"] == 20.0  # forward's extra is the smaller
    results = {"c/fp32": {"floor_ms": 50.0, "cpu_ms": {"floor": {"client": 30.0, "floor": 50.0},
                                                       "put": {"client": 40.0, "store": 80.0, "redis": 40.0}}}}
    line, = bound_lines({"c/fp32": b | {"measured": 0.5, "measured_paired": 0.52}}, results)
    assert "measured 0.50" in line and "bound 0.71" in line and "out of reach" in line
    far = floor_bound(cpu, 200.0, 2)
    assert "within reach" in bound_lines({"c/fp32": far | {"measured": 0.5, "measured_paired": 0.5}}, results)[0]
