"""bench.kvstore's measuring loop against a real store and Redis, on a small cache: every figure
the JSON promises is there, the wire bytes are the codec's, and the bench leaves nothing behind."""

from __future__ import annotations

import os

import pytest
import redis
from rich.console import Console

from bench.kvstore import bench_cache, cpu_table, table
from headwise.cache.codec import encode
from tests.kvstore.conftest import big_cache


async def test_bench_cache_measures_and_cleans_up(service, redis_url, redis_proc) -> None:
    cache = big_cache(rows=1500)  # ~3 MiB: several chunks
    client = service.client("bench")
    r = redis.Redis.from_url(redis_url)
    try:
        pids = {"client": os.getpid(), "redis": redis_proc.proc.pid}  # the store runs in this process here
        row = await bench_cache(client, r, "small", cache, repeats=2, warmup=1, pids=pids)
        assert row["wire_bytes"] == encode(cache, include_recall=False).nbytes
        assert row["chunks"] >= 3
        for k in ("put_mb_s", "get_mb_s", "raw_set_mb_s", "raw_get_mb_s", "put_bytes_only_mb_s", "get_bytes_only_mb_s"):
            assert row[k] > 0, k
        for k in ("ratio_put", "ratio_get", "ratio_put_paired", "ratio_get_paired"):
            assert 0 < row[k] < float("inf"), k
        assert set(row["cpu_ms"]) >= {"put", "raw_set", "get", "raw_get"}
        assert row["cpu_ms"]["put"]["client"] > 0 and set(row["cpu_ms"]["put"]) == {"client", "redis"}
        assert (await client.stats())["segments"] == 0  # warm-up and timed rounds deleted
        assert not list(r.scan_iter("raw-*"))
    finally:
        r.close()
    out = Console(width=250, record=True)
    out.print(table({"small": row}))
    out.print(cpu_table({"small": row}))
    text = out.export_text()
    assert text.count("small") == 7 and "raw_set" in text  # one row in the first table, six in the CPU one


@pytest.mark.slow
async def test_bench_eviction_fills_the_quota_and_every_timed_put_evicts() -> None:
    from bench.eviction import run_async
    from bench.eviction import table as eviction_table

    row = await run_async(rows=20, docs_in_quota=2, puts=4, concurrency=2, repeats=1)
    assert row["evictions"] == 2 * 4  # the warm-up and the timed round: each put evicted one document
    assert row["evicted_bytes"] == 8 * row["document_bytes"] and row["full_segments"] == 2
    assert row["full_tenant_bytes"] == 2 * row["document_bytes"] <= row["quota_bytes"]
    assert row["room_puts_s"] > 0 and row["full_puts_s"] > 0 and 0 < row["ratio_full_room_paired"] < float("inf")
    assert row["redis_overhead"] > 1.0  # Redis holds at least the bytes it stores
    assert row["commit_us_full"] > 0 and row["commit_us_room"] > 0
    out = Console(width=250, record=True)
    out.print(eviction_table([row]))
    assert "evicts one document" in out.export_text()
