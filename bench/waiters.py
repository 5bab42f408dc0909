"""Requests during a deferred compression: `python -m bench.waiters --json PATH` (in process).

One prefill worker and one decode worker over the real model and a real kvstore (Redis child
process, kvstore server on loopback): what the service's replicas run, without Ray. Each round
asks a new copy of a 2,000-token document cold with `full` (the reference), then cold with
`kvzip` (its first answer is exact; the compression follows), and while that compression runs,
both sent together:
  waiter   the same document and policy again, another question (answered from the exact rows
           the compressing worker holds; before, it waited for the compressed cache)
  other    a different document nobody asked about, `full` (it shares the model thread with the
           compression; the pass runs one model job per layer of each reconstruction chunk)

then records when the compressed cache was stored. Rounds alternate the pass in steps (`steps`:
what the service runs) and as one model job (`one_job`), so the two are measured under the same
load. TTFT is first token seen by the decode worker's caller.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench import machine, write_json
from cluster.engine_demo import FACT, PREFIX, QUESTION, insert_fact

TOKEN = "bench-waiters-token"
OTHER_QUESTION = "What is this report about?"


def one_job_worker(cls):
    """The prefill worker whose reconstruction pass is one model job (the pass before chunking)."""

    class OneJob(cls):
        async def _compressed(self, ids, out, policy, precision):
            scores = await self._model(self.runner.reconstruction_scores, list(ids), None, out.states, out.start)
            return await self._model(self._compress, out, scores, policy, precision)

    return OneJob


async def ttft(dw, context: str, prompt: str, **opts) -> tuple[float, str, str]:
    from services.protos.headwise.v1 import generate_pb2 as pb

    req = pb.GenerateRequest(context=context, prompt=prompt, answer_prefix=" " + PREFIX, max_new_tokens=8, **opts)
    t0, first, text, status = time.perf_counter(), None, "", ""
    async for m in dw.generate(req, {"authorization": "Bearer bench-key"}):
        if m.HasField("delta"):
            first = first or time.perf_counter() - t0
            text += m.delta.text
        else:
            status = m.figures.store_status
    return first or 0.0, status, text


async def one_round(dw, pw, doc: str, other: str, kept: float, delay_s: float) -> dict:
    full, _, full_text = await ttft(dw, doc, QUESTION, policy="full")
    sent = time.time()
    first, status, text = await ttft(dw, doc, QUESTION, policy="kvzip", kept=kept)
    row = {"full_ttft_s": full, "first_ttft_s": first, "first_status": status, "first_equals_full": text == full_text}
    await asyncio.sleep(delay_s)  # the compression starts once decode fetched the exact rows
    asks = {"waiter": (doc, OTHER_QUESTION, {"policy": "kvzip", "kept": kept}),
            "other": (other, QUESTION, {"policy": "full"})}
    running = bool(pw._background)

    async def timed(name: str, ctx: str, q: str, opts: dict) -> None:
        t, st, _ = await ttft(dw, ctx, q, **opts)
        row[f"{name}_ttft_s"], row[f"{name}_status"] = t, st
        row[f"{name}_during_compression"] = running and bool(pw._background)  # still running when answered

    await asyncio.gather(*(timed(name, *a) for name, a in asks.items()))  # both at once
    await pw.drain()
    rec = pw.stats()["deferred"][-1]
    row["stored_after_s"], row["outcome"] = rec["done_at"] - sent, rec["outcome"]  # from sending the first
    return row


async def run(tokens: int, rounds: int, kept: float, delay_s: float, threads: int) -> dict:
    import torch

    from headwise.documents import document_tokens
    from headwise.models import ModelRunner, resolve_model_path
    from services.decode.worker import DecodeWorker
    from services.kvstore.redis_proc import start_redis
    from services.kvstore.server import close_server, create_server, start_server
    from services.kvstore.settings import KVStoreSettings
    from services.prefill.worker import PrefillWorker
    from services.settings import Settings
    from services.store import StoreClients
    from services.tenancy import TenantRegistry

    torch.set_num_threads(threads)
    runner = ModelRunner.from_pretrained(resolve_model_path(None))
    base = document_tokens(runner.tokenizer, tokens)
    redis = start_redis()
    server, port = create_server("127.0.0.1:0", KVStoreSettings(service_token=TOKEN, redis_url=redis.url,
                                                               metrics_enabled=False, tenant_ttl_s=0))
    await start_server(server)
    settings = Settings(tenants="bench:bench-key:16", default_policy="kvzip", max_prompt_tokens=4000)
    rows = []
    try:
        workers = {}
        for mode, cls in (("steps", PrefillWorker), ("one_job", one_job_worker(PrefillWorker))):
            pw = cls(runner, StoreClients(f"127.0.0.1:{port}", TOKEN), settings)
            workers[mode] = (pw, DecodeWorker(runner, StoreClients(f"127.0.0.1:{port}", TOKEN), pw.prefill,
                                              TenantRegistry.from_settings(settings), settings))
        await ttft(workers["steps"][1], base[:2000], QUESTION, policy="full")  # warm-up
        for r in range(rounds):
            for mode, (pw, dw) in workers.items():
                tag = f"{mode} {r + 1}"
                doc = insert_fact(f"Report {tag}.\n" + base, FACT, 0.5)
                other = f"Appendix {tag}.\n" + base
                row = {"mode": mode, "round": r + 1} | await one_round(dw, pw, doc, other, kept, delay_s)
                rows.append(row)
                print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        await close_server(server)
        redis.stop()
    return {"tokens": tokens, "kept": kept, "rounds": rounds, "threads": threads, "rows": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    out = {}
    for mode in sorted({r["mode"] for r in rows}):
        rs = [r for r in rows if r["mode"] == mode]
        out[mode] = {}
        for k in ("full_ttft_s", "first_ttft_s", "waiter_ttft_s", "other_ttft_s", "stored_after_s"):
            xs = [r[k] for r in rs]
            out[mode][k] = {"median": statistics.median(xs), "range": [min(xs), max(xs)]}
        for k in ("waiter", "other"):
            xs = [r[f"{k}_ttft_s"] / r["full_ttft_s"] for r in rs]
            out[mode][f"{k}_over_full"] = {"median": statistics.median(xs), "range": [min(xs), max(xs)]}
    return out


def print_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"TTFT during a deferred kvzip compression, {res['tokens']}-token documents, kept {res['kept']}")
    for col in ("pass", "full cold s", "kvzip first s", "waiter s", "waiter / full", "other doc s", "other / full",
                "stored after s"):
        t.add_column(col)
    def cell(x: dict) -> str:
        return f"{x['median']:.2f} ({x['range'][0]:.2f}-{x['range'][1]:.2f})"

    for mode, s in res["summary"].items():
        t.add_row(mode, *(cell(s[k]) for k in ("full_ttft_s", "first_ttft_s", "waiter_ttft_s", "waiter_over_full",
                                               "other_ttft_s", "other_over_full", "stored_after_s")))
    Console().print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds after the first answer before the others ask")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = asyncio.run(run(args.tokens, args.rounds, args.kept, args.delay, args.threads))
    res["machine"] = machine()
    print_table(res)
    if args.json:
        write_json(args.json, res)


if __name__ == "__main__":
    main()
