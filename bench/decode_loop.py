"""Decode loop benchmark: tokens/s of 1 and 16 streams through a replica's decode loop, and its threads.

    python -m bench.decode_loop --json bench/results/decode_loop.json
    python -m bench.decode_loop --compare OTHER_TREE --repeats 3 --json bench/results/decode_loop.json
    python -m bench.decode_loop --omp-teams 3   # what one more OpenMP team costs a decode step

The decode path of services/decode over the default model, without the store or gRPC: a real
document (pydoc topics) is prefilled once; each stream decodes its own copy of the cache
(sampled at temperature 0.7, its own seed, EOS ignored, so every stream gives `--tokens`
tokens), read by one asyncio task per stream, as the worker reads them. Tokens/s counts the
tokens after each stream's first (that one comes from the prefill's logits, not a step) over
the time from the first stream's first token to the last token. Threads: the most alive in
the process at any token, and how many of them were started for the streams.

`--compare TREE` runs the measurement in subprocesses, alternating TREE's services/decode
(first) with this tree's, `--repeats` times each, and reports medians, ranges and the ratio
this/TREE per repeat. A tree whose batcher has no `open` is the earlier design (a thread per
stream running `ModelRunner.generate(step=batcher.step)`); it is driven the way that
design's worker drove it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


# ---- one measurement (run in a process whose PYTHONPATH names the tree measured) ----------
async def _stream_threaded(batcher, pool, runner, cache, logits, params, seen: list[float], threads: list[int]):
    """The earlier design: the stream's `generate` in a pool thread, each step queued on the batcher."""
    gen = runner.generate(cache, logits, params, None, None, step=batcher.step)
    loop = asyncio.get_running_loop()
    batcher.join()
    try:
        while await loop.run_in_executor(pool, next, gen, None) is not None:
            seen.append(time.perf_counter())
            threads.append(threading.active_count())
    finally:
        batcher.leave()


async def _stream_loop(batcher, cache, logits, params, seen: list[float], threads: list[int]):
    async for _ in batcher.open(cache, logits, params):
        seen.append(time.perf_counter())
        threads.append(threading.active_count())


async def _run(runner, batcher, res, caches: list, tokens: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from headwise.models.sampling import SamplingParams

    streams = len(caches)
    new = hasattr(batcher, "open")
    pool = None if new else ThreadPoolExecutor(max_workers=64, thread_name_prefix="decode-stream")
    before = threading.active_count()
    firsts, seen, threads = [], [], []

    async def one(i: int):
        params = SamplingParams(max_new_tokens=tokens, temperature=0.7, seed=i, ignore_eos=True)
        mine: list[float] = []
        if new:
            await _stream_loop(batcher, caches[i], res.logits, params, mine, threads)
        else:
            await _stream_threaded(batcher, pool, runner, caches[i], res.logits, params, mine, threads)
        firsts.append(mine[0])
        seen.extend(mine[1:])

    r0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.gather(*(one(i) for i in range(streams)))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    if pool is not None:
        pool.shutdown()
    elapsed = max(seen) - min(firsts)
    return {"design": "decode loop" if new else "thread per stream", "streams": streams,
            "tok_s": len(seen) / elapsed, "tokens": len(seen) + len(firsts),
            "cpu_ms_per_token": 1000 * (r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) / len(seen),
            "switches_per_token": (r1.ru_nvcsw - r0.ru_nvcsw) / len(seen),
            "threads_max": max(threads), "threads_before": before, "threads_added": max(threads) - before}


def measure(tokens: int, doc_tokens: int, threads: int) -> dict:
    import torch

    from headwise.documents import document_tokens
    from headwise.models import ModelRunner
    from headwise.models.loader import resolve_model_path
    from services.decode.batcher import DecodeBatcher

    torch.set_num_threads(threads)
    made: dict = {}

    def prefill() -> None:  # a decode replica prefills nothing: its caches come from the store
        made["runner"] = runner = ModelRunner.from_pretrained(resolve_model_path(None))
        res = runner.prefill_segment(runner.tokenizer(document_tokens(runner.tokenizer, doc_tokens)).input_ids)
        made.update(res=res, caches={n: [res.cache.clone() for _ in range(n)] for n in (2, 1, 16)})

    # in a thread that ends here, so that its OpenMP team goes with it (services/decode/batcher.py)
    t = threading.Thread(target=prefill)
    t.start()
    t.join()
    runner, res, caches = made["runner"], made["res"], made["caches"]
    batcher = DecodeBatcher(runner, 32)  # one per replica, as the worker holds it
    asyncio.run(_run(runner, batcher, res, caches[2], 4))  # warm: the batcher's thread, the decode views, the allocator
    return {"1": asyncio.run(_run(runner, batcher, res, caches[1], tokens)),
            "16": asyncio.run(_run(runner, batcher, res, caches[16], tokens)),
            "tree": str(Path(sys.modules["services"].__file__).parents[1])}


# ---- OpenMP teams: what one more thread with a team costs a decode step ----------------------
def omp_teams(doc_tokens: int, rounds: int, batches: tuple[int, ...] = (1, 16)) -> dict:
    """decode_batch steps of B copies of one cache at 1 and 2 torch threads, with the calling
    thread the only one that ran a parallel region, then with one more thread alive that ran one
    (as an event loop that ran a parallel op is), interleaved in each round."""
    import torch

    from headwise.documents import document_tokens
    from headwise.models import ModelRunner
    from headwise.models.loader import resolve_model_path

    runner = ModelRunner.from_pretrained(resolve_model_path(None))
    res = runner.prefill_segment(runner.tokenizer(document_tokens(runner.tokenizer, doc_tokens)).input_ids)
    caches = {b: [res.cache.clone() for _ in range(b)] for b in batches}
    out: dict = {}

    def steps(label: str) -> None:
        for b in batches:
            for n in (1, 2):
                torch.set_num_threads(n)
                runner.decode_batch([1] * b, caches[b])  # views built, team woken
                k = max(4, 16 // b)
                r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                for _ in range(k):
                    runner.decode_batch([1] * b, caches[b])
                dt, r1 = (time.perf_counter() - t0) / k, resource.getrusage(resource.RUSAGE_SELF)
                cell = out.setdefault(f"{label}, B={b}, {n} threads", {"ms": [], "switches": []})
                cell["ms"].append(1000 * dt)
                cell["switches"].append((r1.ru_nvcsw - r0.ru_nvcsw) / k)
                print(f"{label}, B={b}, {n} threads: {1000 * dt:.1f} ms per step, "
                      f"{(r1.ru_nvcsw - r0.ru_nvcsw) / k:.0f} switches, load {os.getloadavg()[0]:.1f}", flush=True)

    def team(gone: threading.Event) -> None:
        (torch.ones(1 << 20) * 2).sum()  # a parallel region: this thread holds a team while it lives
        gone.wait()

    for _ in range(rounds):  # interleaved: the extra team lives for the second half of each round
        steps("one team")
        gone = threading.Event()
        t = threading.Thread(target=team, args=(gone,))
        t.start()
        time.sleep(0.2)
        steps("one more team")
        gone.set()
        t.join()  # its team goes with it
    return {k: {"ms_median": statistics.median(v["ms"]), "ms_range": [min(v["ms"]), max(v["ms"])],
                "switches_median": statistics.median(v["switches"])} for k, v in out.items()}


# ---- the interleaved comparison ------------------------------------------------------------
def _subprocess(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "--tokens", str(args.tokens),
           "--doc-tokens", str(args.doc_tokens), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _summary(runs: list[dict], key: str, n: str) -> dict:
    vals = [r[n][key] for r in runs]
    return {"median": statistics.median(vals), "range": [min(vals), max(vals)]}


def compare(args) -> dict:
    trees = {"other": Path(args.compare).resolve(), "this": HERE}
    runs: dict[str, list[dict]] = {"other": [], "this": []}
    for i in range(args.repeats):
        for name in ("other", "this"):
            runs[name].append(_subprocess(trees[name], args))
            r = runs[name][-1]
            print(f"repeat {i + 1} {name:5s} ({r['1']['design']}): 1 stream {r['1']['tok_s']:.1f} tok/s "
                  f"({r['1']['switches_per_token']:.0f} switches/token), 16 streams {r['16']['tok_s']:.1f} tok/s, "
                  f"threads added at 16: {r['16']['threads_added']}, load {os.getloadavg()[0]:.1f}", flush=True)
    out = {"tokens": args.tokens, "doc_tokens": args.doc_tokens, "torch_threads": args.threads,
           "repeats": args.repeats, "runs": runs, "summary": {}, "ratio_this_over_other": {}}
    for n in ("1", "16"):
        for name in runs:
            out["summary"][f"{name}_{n}"] = {k: _summary(runs[name], k, n) for k in
                                             ("tok_s", "threads_max", "threads_added", "cpu_ms_per_token", "switches_per_token")}
        ratios = [t[n]["tok_s"] / o[n]["tok_s"] for t, o in zip(runs["this"], runs["other"], strict=True)]
        out["ratio_this_over_other"][n] = {"median": statistics.median(ratios), "range": [min(ratios), max(ratios)]}
    return out


def table(out: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"decode loop: {out['tokens']} tokens per stream, {out['torch_threads']} torch threads, "
                    f"{out['repeats']} repeats (median [range])")
    for col in ("streams", "design", "tok/s", "threads (max)", "threads added", "CPU ms / token", "switches / token",
                "this/other tok/s"):
        t.add_column(col)
    for n in ("1", "16"):
        for name in ("other", "this"):
            s = out["summary"][f"{name}_{n}"]
            ratio = out["ratio_this_over_other"][n]
            t.add_row(n, out["runs"][name][0][n]["design"],
                      f"{s['tok_s']['median']:.1f} [{s['tok_s']['range'][0]:.1f}, {s['tok_s']['range'][1]:.1f}]",
                      f"{s['threads_max']['median']:.0f}", f"{s['threads_added']['median']:.0f}",
                      f"{s['cpu_ms_per_token']['median']:.0f}", f"{s['switches_per_token']['median']:.0f}",
                      f"{ratio['median']:.2f} [{ratio['range'][0]:.2f}, {ratio['range'][1]:.2f}]" if name == "this" else "")
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    ap.add_argument("--doc-tokens", type=int, default=500, help="document length in tokens")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each tree (--compare)")
    ap.add_argument("--compare", help="another checkout of headwise to measure against, interleaved")
    ap.add_argument("--omp-teams", type=int, metavar="ROUNDS",
                    help="instead: decode steps at 1 and 2 torch threads with and without one more OpenMP team")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one run, JSON on stdout
    args = ap.parse_args()
    if args.omp_teams:
        out = omp_teams(args.doc_tokens, args.omp_teams)
        for k, v in out.items():
            print(f"{k}: {v['ms_median']:.1f} ms [{v['ms_range'][0]:.1f}, {v['ms_range'][1]:.1f}], "
                  f"{v['switches_median']:.0f} switches per step")
        if args.json:
            from bench import machine, write_json

            write_json(args.json, out | {"machine": machine(), "date": time.strftime("%Y-%m-%d")})
        return
    if args.measure:
        print(json.dumps(measure(args.tokens, args.doc_tokens, args.threads)))
        return
    if args.compare:
        out = compare(args)
        table(out)
    else:
        out = measure(args.tokens, args.doc_tokens, args.threads)
        for n in ("1", "16"):
            r = out[n]
            print(f"{n} streams ({r['design']}): {r['tok_s']:.1f} tok/s, threads {r['threads_max']} "
                  f"({r['threads_added']} added), {r['cpu_ms_per_token']:.0f} CPU ms and "
                  f"{r['switches_per_token']:.0f} switches per token")
    if args.json:
        from bench import machine, write_json

        write_json(args.json, out | {"machine": machine(), "date": time.strftime("%Y-%m-%d")})


if __name__ == "__main__":
    main()
