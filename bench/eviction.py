"""Eviction under load: puts/s into a tenant at its quota (every put evicts its LRU document) vs a
tenant with room, through the KV store on loopback and a real Redis.

    python -m bench.eviction --json bench/results/eviction.json

The store runs as `python -m services.kvstore` in its own process, as deployed. Two tenants:
`room` (no quota) and `full` (a quota of `--docs-in-quota` documents, filled before the clock
starts, so each timed put evicts one document in its commit). A document is a cache of the
default model's shape (30 layers, 3 KV heads, head_dim 64, fp32) with `--rows` random rows per
head: 2,000 tokens at kept 0.25 is 500 rows, about 23 MB. Each round puts `--puts` new documents
per tenant, `--concurrency` at a time (one client each), alternating the two tenants so a load
that comes and goes on a shared machine hits both; the `room` tenant's documents are deleted
between rounds (untimed) so Redis's memory stays bounded. Figures: puts/s of a round (median,
min-max over rounds) and the median of the per-round ratios full/room; the mean time Redis spent
in a commit script (`INFO commandstats`, reset before each round, whose only scripts are its
commits) with and without eviction: Redis runs one command at a time, so that is the longest any
other tenant's call waits behind one. At the end, Redis's used_memory
over the stored bytes it holds (`redis_overhead`), the factor docs/deploy.md sizes maxmemory with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import redis
import torch
from rich.console import Console
from rich.table import Table

from bench import machine, write_json
from bench.kvstore import TOKEN, wait_ready
from headwise.cache.compact import CompactCache, LayerCache
from services.kvstore.client import KVStoreClient
from services.kvstore.redis_proc import free_port, start_redis


def document(rows: int, seed: int, layers: int = 30, heads: int = 3, d: int = 64) -> CompactCache:
    gen = torch.Generator().manual_seed(seed)
    out = [LayerCache.from_dense(torch.randn(heads, rows, d, generator=gen), torch.randn(heads, rows, d, generator=gen),
                                 torch.arange(rows)) for _ in range(layers)]  # [Hkv, n, d] each
    return CompactCache(out, rows)


def start_store(redis_url: str, quota: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "HEADWISE_SERVICE_TOKEN": TOKEN, "HEADWISE_TENANT_QUOTA_BYTES": "0",
           "HEADWISE_TENANT_TTL_S": "0", "HEADWISE_REDIS_DEADLINE_S": "30",
           "HEADWISE_TENANT_LIMITS": json.dumps({"full": {"quota_bytes": quota}})}
    proc = subprocess.Popen([sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", str(port),
                             "--redis-url", redis_url, "--no-metrics"], env=env)
    return proc, port


async def put_round(clients: list[KVStoreClient], docs: list[CompactCache], keys: list[str]) -> float:
    """Seconds to put every key, len(clients) at a time."""
    t = time.perf_counter()
    for i in range(0, len(keys), len(clients)):
        batch = keys[i:i + len(clients)]
        await asyncio.gather(*(c.put(k, docs[(i + j) % len(docs)]) for j, (c, k) in enumerate(zip(clients, batch, strict=False))))
    return time.perf_counter() - t


async def run_async(rows: int, docs_in_quota: int, puts: int, concurrency: int, repeats: int) -> dict:
    docs = [document(rows, s) for s in range(4)]
    probe_redis = start_redis()
    try:  # the stored size of one document, to set the quota from
        proc, port = start_store(probe_redis.url, 0)
        c = KVStoreClient(f"127.0.0.1:{port}", TOKEN, "room", timeout_s=60)
        await wait_ready(c, proc)
        await c.put("probe", docs[0])
        size = (await c.stats())["tenant_bytes"]
        await c.close()
        proc.terminate()
        proc.wait(10)
    finally:
        probe_redis.stop()

    redis_proc = start_redis()
    quota = docs_in_quota * size + size // 2
    store, port = start_store(redis_proc.url, quota)
    clients = {t: [KVStoreClient(f"127.0.0.1:{port}", TOKEN, t, timeout_s=60) for _ in range(concurrency)]
               for t in ("room", "full")}
    try:
        await wait_ready(clients["room"][0], store)
        await put_round(clients["full"], docs, [f"fill-{i}" for i in range(docs_in_quota)])  # full before the clock
        rates: dict[str, list[float]] = {"room": [], "full": []}
        scripts = {"room": [0, 0], "full": [0, 0]}  # commit scripts in Redis: calls, microseconds
        rr = redis.Redis.from_url(redis_proc.url)
        for r in range(repeats + 1):  # round 0 warms up, untimed
            for tenant in (("room", "full") if r % 2 else ("full", "room")):
                keys = [f"r{r}-{i}" for i in range(puts)]
                rr.config_resetstat()  # a round's only scripts are its commits
                s = await put_round(clients[tenant], docs, keys)
                if r:
                    rates[tenant].append(puts / s)
                    ev = rr.info("commandstats").get("cmdstat_evalsha", {})
                    scripts[tenant][0] += int(ev.get("calls", 0))
                    scripts[tenant][1] += int(ev.get("usec", 0))
            for k in [f"r{r}-{i}" for i in range(puts)]:
                await clients["room"][0].delete(k)
        full_stats = await clients["full"][0].stats()
        mem = rr.info("memory")
        used_memory = mem["used_memory"] - mem.get("used_memory_startup", 0)
        rr.close()
        room_bytes = (await clients["room"][0].stats())["tenant_bytes"]
        held = full_stats["tenant_bytes"] + room_bytes
    finally:
        for cs in clients.values():
            for c in cs:
                await c.close()
        store.terminate()
        store.wait(10)
        redis_proc.stop()
    ratios = [f / r for f, r in zip(rates["full"], rates["room"], strict=True)]
    return {
        "document_bytes": size, "quota_bytes": quota, "docs_in_quota": docs_in_quota, "rows": rows, "puts": puts,
        "concurrency": concurrency, "repeats": repeats,
        "room_puts_s": statistics.median(rates["room"]), "room_puts_s_range": [min(rates["room"]), max(rates["room"])],
        "full_puts_s": statistics.median(rates["full"]), "full_puts_s_range": [min(rates["full"]), max(rates["full"])],
        "ratio_full_room_paired": statistics.median(ratios),
        "evictions": full_stats["evictions"], "evicted_bytes": full_stats["evicted_bytes"],
        "full_tenant_bytes": full_stats["tenant_bytes"], "full_segments": full_stats["segments"],
        "commit_us_room": scripts["room"][1] / max(1, scripts["room"][0]),
        "commit_us_full": scripts["full"][1] / max(1, scripts["full"][0]),
        "redis_used_memory": used_memory, "stored_bytes": held, "redis_overhead": used_memory / held if held else 0.0,
    }


def table(results: list[dict]) -> Table:
    t = Table(title="puts/s into a tenant at its quota (each put evicts one document) vs one with room",
              caption="median over rounds (min-max); ratio = median of per-round full/room; commit µs = mean time "
                      "Redis spent in a commit script (Redis runs one command at a time: what others wait at most)")
    for col in ("doc MB", "concurrency", "room puts/s", "full puts/s", "full/room", "commit µs room",
                "commit µs full", "evictions", "usage/quota"):
        t.add_column(col, justify="right")
    for r in results:
        t.add_row(f"{r['document_bytes'] / 1e6:.1f}", str(r["concurrency"]),
                  f"{r['room_puts_s']:.2f} ({r['room_puts_s_range'][0]:.2f}-{r['room_puts_s_range'][1]:.2f})",
                  f"{r['full_puts_s']:.2f} ({r['full_puts_s_range'][0]:.2f}-{r['full_puts_s_range'][1]:.2f})",
                  f"{r['ratio_full_room_paired']:.2f}", f"{r['commit_us_room']:.0f}", f"{r['commit_us_full']:.0f}",
                  str(r["evictions"]),
                  f"{r['full_tenant_bytes'] / r['quota_bytes']:.2f}")
    return t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--rows", type=int, default=500, help="rows per head of a document (500: 2,000 tokens at kept 0.25)")
    ap.add_argument("--docs-in-quota", type=int, default=4)
    ap.add_argument("--puts", type=int, default=8, help="puts per tenant per round")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (figures are their medians)")
    a = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    results = [asyncio.run(run_async(a.rows, a.docs_in_quota, a.puts, c, a.repeats)) for c in a.concurrency]
    console.print(table(results))
    console.print(f"Redis used_memory / stored bytes: {results[-1]['redis_overhead']:.3f}")
    doc = {"runs": results, "machine": machine(),
           "note": "puts/s through the store on loopback; full = tenant at its quota, every timed put evicts one "
                   "document in its commit; room = no quota"}
    if a.json:
        write_json(a.json, doc)
        console.print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
