"""KV store benchmark: put/get of a real cache through the service vs raw redis-py on the same Redis.

    python -m bench.kvstore --json bench/results/kvstore.json

A 2,000-token real document (CPython's pydoc topics) is prefilled by the default model; its
cache (full, and streaming at kept 0.25), each with fp32 and with int8 rows (`--precisions`; also int4), is
put and fetched through the KV store on loopback, the store running as `python -m
services.kvstore` in its own process, as deployed. The same bytes are SET/GET as one value with
redis-py on the same Redis, and sent as one bare gRPC client stream to a server that only counts
them (bench.grpc_floor, its own process): the two floors under a put on this machine.

What each timed figure includes (wall clock, one call, in this client process):
  put             KVStoreClient.put(key, prepared), as the prefill worker puts: the cache was made
                  store-ready by codec.prepare in the model thread (rows in the wire format, int8
                  quantised; recall blobs), before the clock here (`prepare_ms` times it apart);
                  the put builds the header, every chunk's CRC and the copy of each frame out of
                  the tensors, streams them, the store checks and pipelines them to Redis,
                  commits, replies.
  put from cache  KVStoreClient.put(key, cache, precision): the same with prepare inside (int8:
                  quantising, in a worker thread).
  get             KVStoreClient.get(key): the stream back, the store's and the client's checks,
                  decoding into tensors (views of one buffer).
  put/get bytes-only   put_encoded / get_encoded of the already encoded segment: the same
                  minus encoding / decoding.
  raw SET / GET   redis.Redis.set(key, blob) / get(key) of the encoded bytes as one value,
                  blob prepared before the clock starts (raw pays no encoding).
  floor           the header and chunk frames as messages of one bare grpc.aio client stream
                  (no checks, no Redis): what any gRPC Put from Python can reach here.
  forward         the same stream to a server that SETs each message in Redis as it arrives
                  (pipelined from the loop as the store writes; no checks, no commit): the
                  floor under any proxy in front of Redis. floor+SET: floor then raw SET, per round.
MB/s are of wire bytes (codec header + chunk frames), 1 MB = 1e6 bytes; each figure is the
median over the timed rounds (7), after one untimed round that warms up the connections and
the memory of Redis and the store. Each round runs service put, raw SET, service get, raw GET (and the
bytes-only variants) in turn, so a load that comes and goes on a shared machine hits both
sides; `ratio_*_paired` is the median of the per-round ratios. Targets: put/floor >= 0.8
(JSON `ratio_put_floor`: the lowest over the caches); int8 stored bytes 1/4 of fp32's
(`stored_bytes` of the kept cache). get includes dequantising int8 rows; put from cache quantising.
`put_unix` (`--redis-unix`): the same put through a third store that reaches Redis over a unix
domain socket (a sidecar Redis), in the same rounds, the puts rotating which goes first.
`cpu_ms` (a second table): CPU time the client, store, Redis and floor-server processes spent per
call of each op (from /proc), which on a 2-core machine bounds how fast an op can be whatever its
design; `ratio_cpu_floor_put` = the floor's CPU (client + floor server) / a put's (client + store +
Redis), which a loaded machine does not distort as it does wall time. `put_floor_bound` (JSON, per
cache, and a printed line): the most put/floor can reach on this machine's cores whatever the
store does, from the same CPU figures: a put costs at least the floor's CPU (client send + server
receive) plus the second hop's (send to Redis + Redis's receive: the smaller of raw SET's CPU and
forward's over floor's), and no op runs faster than its CPU over the cores (`floor_bound`).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import redis
from rich.console import Console
from rich.table import Table

from bench import machine, write_json
from bench.grpc_floor import floor_put, floor_stub, forward_stub, start_floor
from headwise.cache.codec import encode, prepare, stored_nbytes
from headwise.cache.compact import CompactCache
from headwise.documents import document_tokens
from headwise.models import ModelRunner, resolve_model_path
from headwise.policies import get_policy
from services.kvstore.client import KVStoreClient
from services.kvstore.errors import StoreError
from services.kvstore.memtune import tune_malloc
from services.kvstore.protocol import GRPC_OPTIONS
from services.kvstore.redis_proc import free_port, start_redis

TOKEN = "bench-token"


def real_caches(model: str | None, tokens: int, kept: float) -> dict[str, CompactCache]:
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    full = runner.prefill_segment(ids).segment
    streaming = runner.prefill_segment(ids, policy=get_policy("streaming", kept=kept)).segment
    return {"full": full, f"streaming_{kept:g}": streaming}


def _median_rate(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e6


async def _timed(fn, i: int) -> float:
    """Seconds `fn(i)` takes; raw redis-py calls run right here (blocking), as a plain client would."""
    t = time.perf_counter()
    out = fn(i)
    if inspect.isawaitable(out):
        await out
    return time.perf_counter() - t


def _minflt(pid: int) -> int:
    """Minor page faults of process `pid` so far; 0 off Linux."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
    except (OSError, IndexError, ValueError):
        return 0


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, all threads) of process `pid` so far, in seconds; 0 off Linux."""
    if pid == os.getpid():
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench_cache(client: KVStoreClient, r: redis.Redis, name: str, cache: CompactCache, repeats: int,
                      warmup: int = 1, pids: dict[str, int] | None = None, precision: str = "fp32", floor=None,
                      forward=None, thread_client: KVStoreClient | None = None,
                      unix_client: KVStoreClient | None = None) -> dict:
    """Service, raw redis-py and (with `floor`, a bench.grpc_floor stub) the bare gRPC stream
    measured in turns within each round, so load that comes and goes on the machine hits all
    alike; figures are medians over the rounds. `pids` (name -> process id): CPU time each of
    those processes spent per call of each op, averaged over the timed rounds (`cpu_ms`; /proc
    counts in clock ticks, 10 ms here, hence the average). Rows go at `precision`. `thread_client`:
    a client of a second store whose puts are written to Redis by a sender thread per put
    (HEADWISE_KVSTORE_PUT_SENDER=thread; the store's default writes from its event loop): its put
    is `put_thread`, measured in the same rounds, put and put_thread taking turns at going first.
    `unix_client`: a client of a store that reaches the same Redis over a unix domain socket (a
    sidecar Redis): its put is `put_unix`, in the same rounds; the puts rotate which goes first."""
    pids = pids or {}
    seg = encode(cache, include_recall=False, precision=precision)
    blob = seg.header + b"".join(seg.chunks)
    nbytes = seg.nbytes
    assert len(blob) == nbytes
    prepared = prepare(cache, precision)
    ops = {
        "prepare": lambda i: prepare(cache, precision),
        "put": lambda i: client.put(f"{name}-{i}", prepared),
        **({"put_thread": lambda i: thread_client.put(f"{name}-t-{i}", prepared)} if thread_client is not None else {}),
        **({"put_unix": lambda i: unix_client.put(f"{name}-u-{i}", prepared)} if unix_client is not None else {}),
        "put_from_cache": lambda i: client.put(f"{name}-c-{i}", cache, precision),
        "raw_set": lambda i: r.set(f"raw-{name}-{i}", blob),
        "get": lambda i: _expect(client.get(f"{name}-{i}")),
        "raw_get": lambda i: _check(r.get(f"raw-{name}-{i}"), nbytes),
        "put_bytes_only": lambda i: client.put_encoded(f"{name}-enc-{i}", seg),
        "get_bytes_only": lambda i: _expect(client.get_encoded(f"{name}-enc-{i}")),
    }
    if floor is not None:
        ops["floor"] = lambda i: floor_put(floor, [seg.header, *seg.chunks])
    if forward is not None:
        ops["forward"] = lambda i: floor_put(forward, [seg.header, *seg.chunks])
    times: dict[str, list[float]] = {op: [] for op in ops}
    cpu = {op: dict.fromkeys(pids, 0.0) for op in ops}
    faults = dict.fromkeys(ops, 0)  # Redis's minor page faults per op
    for i in range(-warmup, repeats):  # rounds below 0: connections, Redis's and the store's memory warm up
        order = list(ops.items())
        # the puts (order[1:1 + k], after prepare) rotate which goes first
        k = 1 + (thread_client is not None) + (unix_client is not None)
        puts = order[1:1 + k]
        order[1:1 + k] = puts[i % k:] + puts[:i % k]
        for op, fn in order:
            before = {k: _cpu_s(p) for k, p in pids.items()}
            f0 = _minflt(pids["redis"]) if "redis" in pids else 0
            t = await _timed(fn, i)
            if i >= 0:
                times[op].append(t)
                for k, p in pids.items():
                    cpu[op][k] += _cpu_s(p) - before[k]
                faults[op] += (_minflt(pids["redis"]) - f0) if "redis" in pids else 0
        for k in (f"{name}-{i}", f"{name}-c-{i}", f"{name}-enc-{i}"):
            await client.delete(k)
        if thread_client is not None:
            await thread_client.delete(f"{name}-t-{i}")
        if unix_client is not None:
            await unix_client.delete(f"{name}-u-{i}")
        r.delete(f"raw-{name}-{i}")
    row = {"precision": precision, "wire_bytes": nbytes, "stored_bytes": stored_nbytes(cache, precision),
           "chunks": len(seg.chunks), "held_kv_bytes": cache.nbytes}
    row.update({f"{op}_mb_s": _median_rate(nbytes, t) for op, t in times.items()})
    row["raw_set_mb_s"], row["raw_get_mb_s"] = row.pop("raw_set_mb_s"), row.pop("raw_get_mb_s")
    row["ratio_put"] = row["put_mb_s"] / row["raw_set_mb_s"]
    row["ratio_get"] = row["get_mb_s"] / row["raw_get_mb_s"]
    # the same ratios paired round by round: less sensitive to load that changes between rounds
    row["ratio_put_paired"] = statistics.median(s / p for s, p in zip(times["raw_set"], times["put"], strict=True))
    row["ratio_get_paired"] = statistics.median(g / s for g, s in zip(times["raw_get"], times["get"], strict=True))
    row["put_ms"], row["get_ms"], row["prepare_ms"], row["put_from_cache_ms"] = (
        statistics.median(times[op]) * 1e3 for op in ("put", "get", "prepare", "put_from_cache"))
    if thread_client is not None:
        row["put_thread_ms"] = statistics.median(times["put_thread"]) * 1e3
        row["ratio_put_thread_paired"] = statistics.median(t / p for t, p in zip(times["put_thread"], times["put"], strict=True))
    if unix_client is not None:  # < 1: the unix-socket store's put is faster than the TCP one's
        row["put_unix_ms"] = statistics.median(times["put_unix"]) * 1e3
        row["ratio_put_unix_paired"] = statistics.median(u / p for u, p in zip(times["put_unix"], times["put"], strict=True))
    del row["prepare_mb_s"]
    if floor is not None:
        row["floor_mb_s"] = row.pop("floor_mb_s")
        row["ratio_put_floor"] = row["put_mb_s"] / row["floor_mb_s"]
        row["ratio_put_floor_paired"] = statistics.median(f / p for f, p in zip(times["floor"], times["put"], strict=True))
        if thread_client is not None:
            row["ratio_put_thread_floor"] = row["put_thread_mb_s"] / row["floor_mb_s"]
        if unix_client is not None:
            row["ratio_put_unix_floor"] = row["put_unix_mb_s"] / row["floor_mb_s"]
            row["ratio_put_unix_floor_paired"] = statistics.median(
                f / u for f, u in zip(times["floor"], times["put_unix"], strict=True))
        # the transport alone: the already encoded segment (no quantising, no CRCs) against the same bytes bare
        row["ratio_put_bytes_only_floor"] = row["put_bytes_only_mb_s"] / row["floor_mb_s"]
        row["ratio_put_from_cache_floor"] = row["put_from_cache_mb_s"] / row["floor_mb_s"]
        # the floor under a proxy: the stream, then the raw SET of the same bytes (sequential, per round)
        seq = [f + s for f, s in zip(times["floor"], times["raw_set"], strict=True)]
        row["floor_then_set_ms"] = statistics.median(seq) * 1e3
        row["floor_ms"] = statistics.median(times["floor"]) * 1e3
        row["ratio_put_floor_then_set_paired"] = statistics.median(q / p for q, p in zip(seq, times["put"], strict=True))
    if forward is not None:  # ... and overlapped: each message SET as it arrives, no checks, no commit
        row["forward_mb_s"] = row.pop("forward_mb_s")
        row["forward_ms"] = statistics.median(times["forward"]) * 1e3
        row["ratio_put_forward"] = row["put_mb_s"] / row["forward_mb_s"]
        row["ratio_put_forward_paired"] = statistics.median(f / p for f, p in zip(times["forward"], times["put"], strict=True))
    if pids:
        row["cpu_ms"] = {op: {k: v / repeats * 1e3 for k, v in per.items()} for op, per in cpu.items()}
        if "redis" in pids:
            row["redis_minor_faults"] = {op: n / repeats for op, n in faults.items()}
        if floor is not None:  # load-proof: the CPU the floor's two processes spend over what a put's three do
            total = {op: sum(per.values()) for op, per in row["cpu_ms"].items()}
            row["ratio_cpu_floor_put"] = total["floor"] / total["put"] if total["put"] else float("nan")
            if forward is not None:
                row["ratio_cpu_forward_put"] = total["forward"] / total["put"] if total["put"] else float("nan")
                row.update(floor_bound(total, row["floor_ms"], cores()))
    return row


def cores() -> int:
    """CPUs this process may run on: what every process of the bench shares."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def floor_bound(total_cpu_ms: dict[str, float], floor_ms: float, ncores: int) -> dict:
    """The most put/floor (floor wall / put wall) can reach on `ncores`, from CPU time alone.

    No op finishes faster than its processes' CPU time over the cores: wall >= CPU / cores. A put
    through the store moves every byte over two hops, so it costs at least what the bare floor
    costs (client send + server receive: the floor op's client and server CPU) plus the second
    hop (store send to Redis + Redis receive), taken as the smaller of two measurements of it:
    raw SET (a client's send to Redis + Redis's receive of the same bytes) and forward - floor
    (the forward server's extra CPU over the floor server's, with Redis's). The store's checks,
    commit and the client's frame builds come on top, so the bound is generous:
        put/floor <= floor_ms / (unavoidable_cpu_ms / cores).
    `own` is the same bound from the put's own measured CPU (how near the put runs to what its CPU allows)."""
    hop = min(total_cpu_ms["raw_set"], total_cpu_ms["forward"] - total_cpu_ms["floor"])
    unavoidable = total_cpu_ms["floor"] + max(hop, 0.0)
    return {
        "cores": ncores,
        "unavoidable_put_cpu_ms": unavoidable,
        "second_hop_cpu_ms": max(hop, 0.0),
        "put_floor_bound": floor_ms * ncores / unavoidable if unavoidable else float("inf"),
        "put_floor_bound_own_cpu": floor_ms * ncores / total_cpu_ms["put"] if total_cpu_ms["put"] else float("inf"),
    }


async def _expect(awaitable) -> None:
    assert await awaitable is not None


def _check(blob: bytes | None, nbytes: int) -> None:
    assert blob is not None and len(blob) == nbytes


def start_store(redis_url: str, put_sender: str | None = None) -> tuple[subprocess.Popen, int]:
    """The store in its own process, as deployed (client and server do not share a GIL);
    `put_sender`: HEADWISE_KVSTORE_PUT_SENDER (None: the store's default)."""
    port = free_port()
    env = {**os.environ, "HEADWISE_SERVICE_TOKEN": TOKEN, "HEADWISE_TENANT_QUOTA_BYTES": "0",
           "HEADWISE_TENANT_TTL_S": "0", "HEADWISE_REDIS_DEADLINE_S": "30"}
    if put_sender is not None:
        env["HEADWISE_KVSTORE_PUT_SENDER"] = put_sender
    proc = subprocess.Popen([sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", str(port),
                             "--redis-url", redis_url, "--no-metrics"], env=env)
    return proc, port


async def wait_ready(client: KVStoreClient, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await client.stats()
            return
        except StoreError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_async(caches: dict[str, CompactCache], repeats: int, warmup: int = 1,
                    precisions: tuple[str, ...] = ("fp32",), compare_thread: bool = True,
                    keep_freed_pages: bool = True, redis_unix: bool = False) -> dict:
    """Every cache at every precision (results named `cache/precision`). `compare_thread`: a second
    store whose puts write to Redis from a sender thread, measured as `put_thread` in the same rounds.
    `keep_freed_pages`: Redis runs with redis_proc.REDIS_MALLOC_TUNABLES (False: glibc's defaults).
    `redis_unix`: Redis also listens on a unix socket and a third store (default writer) reaches it
    there (`unix_url`), measured as `put_unix` in the same rounds."""
    redis_proc = start_redis(keep_freed_pages=keep_freed_pages, unixsocket=redis_unix)
    store, port = start_store(redis_proc.url)
    thread_store, thread_port = start_store(redis_proc.url, "thread") if compare_thread else (None, None)
    unix_store, unix_port = start_store(redis_proc.unix_url) if redis_unix else (None, None)
    floor_proc, floor_port = start_floor(redis_proc.url)
    r = redis.Redis.from_url(redis_proc.url)
    try:
        client = KVStoreClient(f"127.0.0.1:{port}", TOKEN, "bench", timeout_s=60)
        thread_client = KVStoreClient(f"127.0.0.1:{thread_port}", TOKEN, "bench", timeout_s=60) if compare_thread else None
        unix_client = KVStoreClient(f"127.0.0.1:{unix_port}", TOKEN, "bench", timeout_s=60) if redis_unix else None
        await wait_ready(client, store)
        if thread_client is not None:
            await wait_ready(thread_client, thread_store)
        if unix_client is not None:
            await wait_ready(unix_client, unix_store)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{floor_port}", options=GRPC_OPTIONS) as ch:
                pids = {"client": os.getpid(), "store": store.pid, "redis": redis_proc.proc.pid, "floor": floor_proc.pid}
                if thread_store is not None:
                    pids["thread_store"] = thread_store.pid
                if unix_store is not None:
                    pids["unix_store"] = unix_store.pid
                return {f"{name}/{p}": await bench_cache(client, r, f"{name}-{p}", cache, repeats, warmup, pids, p,
                                                         floor_stub(ch), forward_stub(ch), thread_client, unix_client)
                        for name, cache in caches.items() for p in precisions}
        finally:
            await client.close()
            if thread_client is not None:
                await thread_client.close()
            if unix_client is not None:
                await unix_client.close()
    finally:
        r.close()
        for proc in (store, thread_store, unix_store):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
        floor_proc.kill()
        floor_proc.wait(10)
        redis_proc.stop()


def table(results: dict) -> Table:
    t = Table(title="KV store on loopback vs raw redis-py SET/GET and the bare gRPC stream (MB/s, median)",
              caption="put/get = KVStoreClient.put/get incl. encode/decode, stream, checks, Redis, commit; "
                      "raw = redis-py SET/GET of the same encoded bytes as one value; floor = bare gRPC stream of them; "
                      "bytes-only = put/get_encoded")
    for col in ("cache", "wire MB", "chunks", "put", "get", "put ms", "get ms", "raw SET", "raw GET", "floor",
                "put/raw", "get/raw", "put/floor", "put/floor paired", "put/raw paired", "get/raw paired",
                "put bytes-only", "get bytes-only", "prepare ms", "put from cache ms", "from cache/floor",
                "forward ms", "put/forward paired", "put/(floor+SET) paired"):
        t.add_column(col, justify="right")
    for name, r in results.items():
        fl = (f"{r['floor_mb_s']:.0f}", f"{r['ratio_put_floor']:.2f}", f"{r['ratio_put_floor_paired']:.2f}") \
            if "floor_mb_s" in r else ("-",) * 3
        t.add_row(name, f"{r['wire_bytes'] / 1e6:.1f}", str(r["chunks"]), f"{r['put_mb_s']:.0f}", f"{r['get_mb_s']:.0f}",
                  f"{r['put_ms']:.0f}", f"{r['get_ms']:.0f}", f"{r['raw_set_mb_s']:.0f}", f"{r['raw_get_mb_s']:.0f}", fl[0],
                  f"{r['ratio_put']:.2f}", f"{r['ratio_get']:.2f}", fl[1], fl[2],
                  f"{r['ratio_put_paired']:.2f}", f"{r['ratio_get_paired']:.2f}", f"{r['put_bytes_only_mb_s']:.0f}",
                  f"{r['get_bytes_only_mb_s']:.0f}", f"{r['prepare_ms']:.1f}", f"{r['put_from_cache_ms']:.0f}",
                  f"{r.get('ratio_put_from_cache_floor', float('nan')):.2f}", f"{r.get('forward_ms', float('nan')):.0f}",
                  f"{r.get('ratio_put_forward_paired', float('nan')):.2f}",
                  f"{r.get('ratio_put_floor_then_set_paired', float('nan')):.2f}")
    return t


def cpu_table(results: dict) -> Table:
    t = Table(title="CPU time per call, ms (client, store, Redis processes; mean over the timed rounds)",
              caption="what each op costs the machine as a whole: on 2 cores a put's total bounds its wall time from below")
    t.add_column("cache")
    t.add_column("op")
    for col in ("client", "store", "redis", "floor server", "total", "redis faults"):
        t.add_column(col, justify="right")
    for name, r in results.items():
        for op in ("prepare", "put", "put_thread", "put_unix", "put_from_cache", "raw_set", "floor", "forward", "get", "raw_get"):
            c = r.get("cpu_ms", {}).get(op)
            if c:
                store = c.get("store", 0) + c.get("thread_store", 0) + c.get("unix_store", 0)
                t.add_row(name, op, f"{c.get('client', 0):.1f}", f"{store:.1f}", f"{c.get('redis', 0):.1f}",
                          f"{c.get('floor', 0):.1f}", f"{sum(c.values()):.1f}",
                          f"{r.get('redis_minor_faults', {}).get(op, 0):.0f}")
    return t


def bound_lines(bounds: dict, results: dict, target: float = 0.8) -> list[str]:
    """One line per cache: put/floor measured against the most the machine's cores allow (floor_bound)."""
    out = []
    for name, b in bounds.items():
        cpu = results[name]["cpu_ms"]
        verdict = "out of reach on this machine" if b["put_floor_bound"] < target else "within reach"
        out.append(f"put/floor {name}: measured {b['measured']:.2f} (paired {b['measured_paired']:.2f}); bound "
                   f"{b['put_floor_bound']:.2f} = floor {results[name]['floor_ms']:.1f} ms x {b['cores']} cores / "
                   f"unavoidable CPU {b['unavoidable_put_cpu_ms']:.1f} ms (floor {sum(cpu['floor'].values()):.1f} + "
                   f"second hop {b['second_hop_cpu_ms']:.1f}); from the put's own CPU "
                   f"{sum(cpu['put'].values()):.1f} ms: {b['put_floor_bound_own_cpu']:.2f}; target {target}: {verdict}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--model", default=None, help="model directory (default: the installed default model)")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds per cache (figures are their medians)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first, per cache")
    ap.add_argument("--precisions", default="fp32,int8", help="row precisions to store each cache at")
    ap.add_argument("--no-thread-compare", action="store_true",
                    help="do not also measure puts through a store that writes to Redis from a sender thread (put_thread)")
    ap.add_argument("--redis-unix", action="store_true",
                    help="also measure puts through a store that reaches the same Redis over a unix domain socket "
                         "(a sidecar Redis; put_unix, in the same rounds as the TCP put)")
    ap.add_argument("--redis-glibc-defaults", action="store_true",
                    help="run Redis with glibc malloc's defaults (freed values' pages go back to the kernel)")
    a = ap.parse_args(argv)
    tune_malloc()  # this process is the bulk client (each put's frames are fresh 1 MiB buffers), as memtune says
    console = Console(width=None if sys.stdout.isatty() else 200)  # the table stays whole in logs
    with console.status("prefilling the document"):
        caches = real_caches(a.model, a.tokens, a.kept)
    precisions = tuple(p for p in a.precisions.split(",") if p)
    results = asyncio.run(run_async(caches, a.repeats, a.warmup, precisions, not a.no_thread_compare,
                                    not a.redis_glibc_defaults, a.redis_unix))
    console.print(table(results))
    console.print(cpu_table(results))
    full = results[f"full/{precisions[0]}"]
    kept = f"streaming_{a.kept:g}"
    doc = {k: full[k] for k in ("put_mb_s", "get_mb_s", "raw_set_mb_s", "raw_get_mb_s", "ratio_get", "ratio_put")}
    doc["stored_bytes"] = {p: results[f"{kept}/{p}"]["stored_bytes"] for p in precisions}
    doc["stored_bytes_full"] = {p: results[f"full/{p}"]["stored_bytes"] for p in precisions}
    doc["ms_per_document"] = {name: {"put": r["put_ms"], "get": r["get_ms"], "prepare": r["prepare_ms"],
                                     "put_from_cache": r["put_from_cache_ms"]} for name, r in results.items()}
    doc["ratio_put_floor"] = min(r["ratio_put_floor"] for r in results.values())
    doc["ratio_put_floor_paired"] = min(r["ratio_put_floor_paired"] for r in results.values())
    doc["ratio_put_bytes_only_floor"] = min(r["ratio_put_bytes_only_floor"] for r in results.values())
    doc["ratio_put_from_cache_floor"] = min(r["ratio_put_from_cache_floor"] for r in results.values())
    doc["ratio_put_floor_per_cache"] = {name: r["ratio_put_floor"] for name, r in results.items()}
    if not a.no_thread_compare:
        doc["ratio_put_thread_floor_per_cache"] = {name: r["ratio_put_thread_floor"] for name, r in results.items()}
        doc["ratio_put_thread_paired_per_cache"] = {name: r["ratio_put_thread_paired"] for name, r in results.items()}
        for name, r in results.items():
            console.print(f"{name}: put {r['put_ms']:.1f} ms (put/floor {r['ratio_put_floor']:.2f}), through the sender "
                          f"thread {r['put_thread_ms']:.1f} ms (put/floor {r['ratio_put_thread_floor']:.2f}); put_thread/put "
                          f"paired {r['ratio_put_thread_paired']:.2f}")
    if a.redis_unix:
        doc["ratio_put_unix_floor_per_cache"] = {name: r["ratio_put_unix_floor"] for name, r in results.items()}
        doc["ratio_put_unix_floor_paired_per_cache"] = {name: r["ratio_put_unix_floor_paired"] for name, r in results.items()}
        doc["ratio_put_unix_paired_per_cache"] = {name: r["ratio_put_unix_paired"] for name, r in results.items()}
        doc["ratio_put_unix_floor"] = min(doc["ratio_put_unix_floor_per_cache"].values())
        for name, r in results.items():
            console.print(f"{name}: put over TCP to Redis {r['put_ms']:.1f} ms (put/floor {r['ratio_put_floor']:.2f}, paired "
                          f"{r['ratio_put_floor_paired']:.2f}), over a unix socket {r['put_unix_ms']:.1f} ms (put/floor "
                          f"{r['ratio_put_unix_floor']:.2f}, paired {r['ratio_put_unix_floor_paired']:.2f}); unix/TCP "
                          f"paired {r['ratio_put_unix_paired']:.2f}")
    doc["redis_malloc"] = "glibc defaults" if a.redis_glibc_defaults else "freed pages kept (redis_proc.REDIS_MALLOC_TUNABLES)"
    doc["ratio_cpu_floor_put_per_cache"] = {name: r.get("ratio_cpu_floor_put") for name, r in results.items()}
    doc["ratio_put_forward_per_cache"] = {name: r.get("ratio_put_forward") for name, r in results.items()}
    doc["ratio_put_forward_paired_per_cache"] = {name: r.get("ratio_put_forward_paired") for name, r in results.items()}
    doc["ratio_put_floor_then_set_paired_per_cache"] = {name: r.get("ratio_put_floor_then_set_paired")
                                                       for name, r in results.items()}
    doc["ratio_put_floor_paired_per_cache"] = {name: r["ratio_put_floor_paired"] for name, r in results.items()}
    doc["ratio_put_raw_per_cache"] = {name: r["ratio_put"] for name, r in results.items()}
    doc["put_floor_bound"] = {name: {k: r[k] for k in ("put_floor_bound", "put_floor_bound_own_cpu", "unavoidable_put_cpu_ms",
                                                      "second_hop_cpu_ms", "cores")} | {
                                  "measured": r["ratio_put_floor"], "measured_paired": r["ratio_put_floor_paired"]}
                              for name, r in results.items() if "put_floor_bound" in r}
    for line in bound_lines(doc["put_floor_bound"], results):
        console.print(line)
    for p in precisions:
        if p != "fp32" and "fp32" in precisions:
            doc[f"ratio_stored_fp32_{p}"] = doc["stored_bytes"]["fp32"] / doc["stored_bytes"][p]
    if {"fp32", "int8"} <= set(precisions):
        console.print(f"stored bytes of the kept-{a.kept:g} cache: fp32 {doc['stored_bytes']['fp32']:,}, int8 "
                      f"{doc['stored_bytes']['int8']:,} ({doc['ratio_stored_fp32_int8']:.2f}x); put/floor lowest "
                      f"{doc['ratio_put_floor']:.2f} (paired {doc['ratio_put_floor_paired']:.2f}; bytes-only "
                      f"{doc['ratio_put_bytes_only_floor']:.2f})")
    if {"fp32", "int4"} <= set(precisions):
        console.print(f"stored bytes of the kept-{a.kept:g} cache at int4: {doc['stored_bytes']['int4']:,} "
                      f"({doc['ratio_stored_fp32_int4']:.2f}x smaller than fp32)")
    doc.update({"caches": results, "tokens": a.tokens, "kept": a.kept, "repeats": a.repeats, "warmup": a.warmup,
                "machine": machine(),
                "note": "top-level MB/s figures are the full cache at the first precision (every cache has its own under caches); "
                        "MB = 1e6 bytes of codec wire bytes; put = of a prepared cache (codec.prepare, timed apart as "
                        "prepare_ms), put_from_cache with prepare inside; get includes decoding; *_bytes_only skip encoding; "
                        "stored_bytes: the kept cache; ratio_put_floor: lowest over the caches"})
    if a.json:
        write_json(a.json, doc)
        console.print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
