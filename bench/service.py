"""Service benchmark: `python -m bench.service --json PATH` (a local cluster, the default model).

Measured through the real gRPC port, client side:
  ttft_cold_s_by_policy  median first token of a 2,000-token document nobody asked about before,
                  for `full`, `kvzip` and `kvzap` (when registered), interleaved over --cold-repeats
                  copies of the document (each policy its own keys: cold every time); each request
                  waits until the previous one's compressed cache is stored (runs: ttft_cold_runs_s)
  compressed_stored_after_s  for a policy whose compression follows the first answer (kvzip):
                  median time from sending that request to its compressed cache stored (prefill's
                  record; compressed_stored_after_handoff_s: from the handoff)
  ttft_cold_s     the same for --policy (default: the service's default policy)
  ttft_reused_s   the same document asked again from a new connection (its prefill is reused)
  service_tok_s   decode tokens/s seen by the client (first to last token) vs
  inprocess_tok_s the same prompt, cache and sampling decoded by a ModelRunner in this process
  wire_bytes      bytes of cache that crossed the network for the cold request, vs full_kv_bytes
  concurrent_*    16 streams from 4 tenants at once: how many completed, p50/p95 TTFT
  concurrent_decode_*  then 16 streams over the (now stored) documents decoding at once:
                  tokens/s in all, first token to last (the decode replica batches them)

With --precisions fp32,int8 (default: none, the figures above only), on the same cluster and
document, each precision's compressed cache is stored cold once (the precision is part of the
segment key), then --reused-repeats rounds ask every precision a new question on it, the order
reversed every other round:
  ttft_reused_s_by_precision        median client-side TTFT of the reused document per precision
  ttft_reused_runs_s_by_precision   the per-round TTFTs (ranges: ttft_reused_range_s_by_precision)
  ttft_reused_over_first            each precision's median / the first precision's median;
                  ttft_reused_over_first_round_median and _range: the per-round ratios' median, lowest, highest
  ttft_reused_server_s_by_precision  the same rounds' server-side TTFT (Figures.ttft_s), medians
                  (per round: ttft_reused_server_runs_s_by_precision)
  stored_kv_bytes_by_precision      the cache's bytes as stored (Figures.stored_kv_bytes)
  answers_identical_by_precision    whether each precision's answer tokens equal the first's in
                  every round (answers_differ_rounds: the rounds where they do not)
--only reused-precision measures that alone (no cold-by-policy, decode or concurrency figures);
--only cold measures only the cold TTFT by policy (and the time until each compressed cache is stored).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

from bench import write_json
from cluster.client import Answer, HeadwiseClient
from cluster.engine_demo import FACT, PREFIX, QUESTION, insert_fact
from cluster.local import wait_stored

TENANTS = {"acme": "acme-bench", "globex": "globex-bench", "initech": "initech-bench", "umbrella": "umbrella-bench"}
COLD = ("hooli", "hooli-bench")  # the tenant of the cold TTFT by policy: the others' documents stay cold
PRECISION = ("wayne", "wayne-bench")  # the tenant of the reused TTFT by precision
LONG = "Write out, in words, every number from one to two hundred, separated by commas."


async def timed_ask(addr: str, key: str, prompt: str, doc: str, **opts) -> tuple[Answer, float]:
    """Answer plus the client-side decode rate (tokens after the first / time since the first)."""
    stamps: list[float] = []
    async with HeadwiseClient(addr, key) as c:
        ans = await c.ask(prompt, doc, on_text=lambda s: stamps.append(time.perf_counter()), **opts)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 and stamps[-1] > stamps[0] else 0.0
    return ans, rate


def inprocess_rate(doc: str, policy: str, kept: float, n_tokens: int, threads: int) -> tuple[float, int]:
    """The engine alone, with the decode replica's thread count (its num_cpus), on the same prompt."""
    import torch

    from headwise.models import ModelRunner, SamplingParams, resolve_model_path
    from headwise.policies import get_policy
    from headwise.prompt import build_segments

    torch.set_num_threads(threads)
    runner = ModelRunner.from_pretrained(resolve_model_path(None))
    seg = build_segments(runner.tokenizer, doc, LONG)
    pol = get_policy(policy, kept=kept)
    ctx = runner.prefill_segment(seg.context, policy=pol)
    q = runner.prefill_segment(seg.question, ctx.segment)
    stamps = []
    for _ in runner.generate(q.cache, q.logits, SamplingParams(max_new_tokens=n_tokens)):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


async def concurrent(addr: str, doc: str, opts: dict, question: str = QUESTION, prefix: str = " " + PREFIX,
                     max_new_tokens: int = 16) -> list[Answer | BaseException]:
    jobs = [timed_ask(addr, key, question, doc, answer_prefix=prefix, max_new_tokens=max_new_tokens, **opts)
            for key in TENANTS.values() for _ in range(4)]
    res = await asyncio.gather(*jobs, return_exceptions=True)
    return [r[0] if isinstance(r, tuple) else r for r in res]


def cold_by_policy(addr: str, key: str, doc: str, policies: list[str], kept: float, repeats: int) -> dict:
    """Cold TTFT of each policy on the same document, interleaved: repeat r asks every policy about
    copy r of the document (its own keys: cold every time). A compression that follows the answer is
    waited for before the next request, so nothing queues behind it."""
    runs: dict[str, list[float]] = {p: [] for p in policies}
    stored: dict[str, list[float]] = {}
    handoff: dict[str, list[float]] = {}
    for r in range(repeats):
        copy = f"Copy {r + 1}.\n{doc}"
        for policy in policies:
            sent = time.time()
            try:
                ans, _ = asyncio.run(timed_ask(addr, key, QUESTION, copy, answer_prefix=" " + PREFIX, max_new_tokens=8,
                                               policy=policy, kept=kept))
            except Exception as e:  # noqa: BLE001 - e.g. a policy whose trained scorer is missing: the others go on
                print(f"cold {policy}: failed: {e}", flush=True)
                continue
            runs[policy].append(ans.first_delta_s)
            print(f"cold {policy} #{r + 1}: TTFT {ans.first_delta_s:.2f} s, {ans.figures.get('store_status')}, "
                  f"kept {ans.figures.get('realised_kept', 0):.2f}: {ans.text!r}", flush=True)
            if ans.figures.get("store_status") == "compressing":
                rec = wait_stored(policy, sent)
                if rec is not None:
                    stored.setdefault(policy, []).append(rec["done_at"] - sent)
                    handoff.setdefault(policy, []).append(rec["handoff_to_stored_s"])
                    print(f"  compressed cache {rec['outcome']} {rec['done_at'] - sent:.2f} s after the request "
                          f"({rec['handoff_to_stored_s']:.2f} s after the handoff)", flush=True)
    return {"runs": {p: v for p, v in runs.items() if v}, "stored": stored, "handoff": handoff}


def parse_precisions(text: str) -> list[str]:
    """`fp32,int8` -> ["fp32", "int8"]: known precisions, each once, in the order given."""
    from headwise.cache.quant import PRECISIONS

    out: list[str] = []
    for name in (t.strip() for t in text.split(",")):
        if not name:
            continue
        if name not in PRECISIONS:
            raise ValueError(f"unknown precision {name!r}; allowed: {', '.join(PRECISIONS)}")
        if name not in out:
            out.append(name)
    return out


def precision_orders(precisions: list[str], repeats: int) -> list[list[str]]:
    """The order of each round: as given in even rounds, reversed in odd ones (no precision always first)."""
    return [list(precisions) if r % 2 == 0 else list(reversed(precisions)) for r in range(repeats)]


def reused_question(r: int) -> str:
    """Round r's question: new to every precision's stored document (the question's rows are never reused)."""
    return f"Question {r + 1}. {QUESTION}"


def precision_figures(precisions: list[str], orders: list[list[str]], runs: dict[str, list[float]],
                      answers: dict[str, list[list[int]]], figures: dict[str, dict],
                      server: dict[str, list[float]] | None = None) -> dict:
    """The JSON of the reused-TTFT-by-precision measurement from its raw per-round records
    (`server`: the same rounds' Figures.ttft_s, request received to first delta sent)."""
    server = server or {p: [] for p in precisions}
    first = precisions[0]
    meds = {p: median(runs[p]) for p in precisions}
    rounds = range(len(orders))
    ratios = {p: [a / b for a, b in zip(runs[p], runs[first], strict=True) if b] for p in precisions}  # per round
    differ = [r for r in rounds if any(answers[p][r] != answers[first][r] for p in precisions)]
    return {
        "precisions": list(precisions), "precision_orders": orders,
        "ttft_reused_s_by_precision": meds, "ttft_reused_runs_s_by_precision": {p: runs[p] for p in precisions},
        "ttft_reused_range_s_by_precision": {p: [min(runs[p]), max(runs[p])] if runs[p] else [] for p in precisions},
        "ttft_reused_over_first": {p: meds[p] / meds[first] if meds[first] else 0.0 for p in precisions},
        "ttft_reused_over_first_range": {p: [min(x), max(x)] if (x := ratios[p]) else [] for p in precisions},
        "ttft_reused_over_first_round_median": {p: median(ratios[p]) for p in precisions},
        "ttft_reused_server_s_by_precision": {p: median(server[p]) for p in precisions},
        "ttft_reused_server_runs_s_by_precision": {p: server[p] for p in precisions},
        "stored_kv_bytes_by_precision": {p: figures[p].get("stored_kv_bytes", 0) for p in precisions},
        "held_kv_bytes_by_precision": {p: figures[p].get("held_kv_bytes", 0) for p in precisions},
        "reused_tokens_by_precision": {p: figures[p].get("reused_tokens", 0) for p in precisions},
        "reused_store_status_by_precision": {p: figures[p].get("store_status", "") for p in precisions},
        "kv_precision_reported": {p: figures[p].get("kv_precision", "") for p in precisions},
        "answers_identical_by_precision": {p: all(answers[p][r] == answers[first][r] for r in rounds)
                                           for p in precisions},
        "answers_differ_rounds": differ,
        "answers_by_precision": answers,
    }


def reused_by_precision(addr: str, key: str, doc: str, precisions: list[str], policy: str, kept: float,
                        repeats: int) -> dict:
    """Each precision's compressed cache stored cold once, then `repeats` interleaved rounds of a new
    question on the stored document per precision (the order reversed every other round)."""
    opts = {"policy": policy, "kept": kept}
    for p in precisions:
        sent = time.time()
        ans, _ = asyncio.run(timed_ask(addr, key, QUESTION, doc, answer_prefix=" " + PREFIX, max_new_tokens=8,
                                       kv_precision=p, **opts))
        print(f"store {p}: cold TTFT {ans.first_delta_s:.2f} s, {ans.figures.get('store_status')}: {ans.text!r}",
              flush=True)
        if ans.figures.get("store_status") == "compressing":
            wait_stored(policy, sent)
    orders = precision_orders(precisions, repeats)
    runs: dict[str, list[float]] = {p: [] for p in precisions}
    server: dict[str, list[float]] = {p: [] for p in precisions}
    answers: dict[str, list[list[int]]] = {p: [] for p in precisions}
    figures: dict[str, dict] = {}
    for r, order in enumerate(orders):
        for p in order:
            ans, _ = asyncio.run(timed_ask(addr, key, reused_question(r), doc, answer_prefix=" " + PREFIX,
                                           max_new_tokens=8, kv_precision=p, **opts))
            runs[p].append(ans.first_delta_s)
            server[p].append(ans.figures.get("ttft_s", 0.0))
            answers[p].append(list(ans.token_ids))
            figures.setdefault(p, ans.figures)
            f = ans.figures
            print(f"reused {p} #{r + 1}: TTFT {ans.first_delta_s:.3f} s (server {f.get('ttft_s', 0):.3f}), "
                  f"{f.get('store_status')}, {f.get('kv_precision')}, stored {f.get('stored_kv_bytes', 0)} B, "
                  f"reused {f.get('reused_tokens')}/{f.get('prompt_tokens')}: {ans.text!r}", flush=True)
    return precision_figures(precisions, orders, runs, answers, figures, server)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else 0.0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else 0.0


def cold_figures(cold_runs: dict, default: str) -> dict:
    """The cold-TTFT-by-policy figures of cold_by_policy's runs: medians, the default policy over `full`
    (of medians, and the range of the per-copy ratios) and the time until each compressed cache was stored."""
    by_policy = {p: median(v) for p, v in cold_runs["runs"].items()}
    full_runs, default_runs = cold_runs["runs"].get("full", []), cold_runs["runs"].get(default, [])
    ratios = [d / f for d, f in zip(default_runs, full_runs, strict=True)] if len(default_runs) == len(full_runs) else []
    return {
        "ttft_cold_s_by_policy": by_policy, "ttft_cold_runs_s": cold_runs["runs"],
        "compressed_stored_after_s": {p: median(v) for p, v in cold_runs["stored"].items()},
        "compressed_stored_after_handoff_s": {p: median(v) for p, v in cold_runs["handoff"].items()},
        "ttft_cold_default_over_full": by_policy[default] / by_policy["full"] if {"full", default} <= set(by_policy) else 0.0,
        "ttft_cold_default_over_full_range": [min(ratios), max(ratios)] if ratios else [],
    }


def run(tokens: int, policy: str, kept: float, decode_tokens: int, cold_repeats: int = 3,
        precisions: list[str] | None = None, reused_repeats: int = 6, only: str = "all") -> dict:
    from transformers import AutoTokenizer

    from cluster.local import LocalCluster
    from headwise.documents import document_tokens
    from headwise.models import resolve_model_path
    from headwise.policies import policy_names
    from services.settings import Settings

    settings = Settings(tenant_max_streams=8)
    default = settings.default_policy  # registered: Settings checks it
    policy = policy or default
    policy = policy if policy in policy_names() else "streaming"
    cold_policies = [p for p in ("full", "kvzip", "kvzap") if p in policy_names()]
    cold_policies += [p for p in (default, policy) if p not in cold_policies]
    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    doc = insert_fact(document_tokens(tok, tokens), FACT, 0.5)
    opts = {"policy": policy, "kept": kept}
    out: dict = {"policy": policy, "kept": kept, "document_tokens": tokens, "default_policy": default}
    if only == "reused-precision":
        precisions = precisions or [settings.default_kv_precision]
    with LocalCluster(settings, tenants=TENANTS | dict([COLD, PRECISION]), log=lambda s: print(s, flush=True)) as cluster:
        addr, key = cluster.endpoints.grpc, TENANTS["acme"]
        if precisions:  # its own tenant: the other figures' documents stay cold
            out["default_kv_precision"] = settings.default_kv_precision
            out["reused_repeats"] = reused_repeats
            out.update(reused_by_precision(addr, PRECISION[1], doc, precisions, policy, kept, reused_repeats))
        if only == "reused-precision":
            return out
        cold_runs = cold_by_policy(addr, COLD[1], doc, cold_policies, kept, cold_repeats)
        if only == "cold":
            out.update(cold_figures(cold_runs, default))
            return out
        sent = time.time()
        cold, _ = asyncio.run(timed_ask(addr, key, QUESTION, doc, answer_prefix=" " + PREFIX, max_new_tokens=8, **opts))
        if cold.figures.get("store_status") == "compressing":
            wait_stored(policy, sent)  # the reused request below would wait for it
        warm, _ = asyncio.run(timed_ask(addr, key, QUESTION, doc, answer_prefix=" " + PREFIX, max_new_tokens=8, **opts))
        print(f"cold: {cold.text!r} {cold.figures}\nreused: {warm.text!r} {warm.figures}", flush=True)
        asyncio.run(timed_ask(addr, key, LONG, doc, max_new_tokens=2, **opts))  # store the document for LONG's chain
        long_ans, service_rate = asyncio.run(timed_ask(addr, key, LONG, doc, max_new_tokens=decode_tokens, **opts))
        print(f"service decode: {len(long_ans.token_ids)} tokens at {service_rate:.2f} tok/s", flush=True)
        t0 = time.perf_counter()
        conc = asyncio.run(concurrent(addr, doc, opts))
        conc_s = time.perf_counter() - t0
        ok = [a for a in conc if isinstance(a, Answer) and a.figures]
        for a in conc:
            if not isinstance(a, Answer):
                print("concurrent stream failed:", a, flush=True)
        ttfts = [a.first_delta_s for a in ok]
        # every tenant's document is stored now: 16 reused streams decoding at once (continuous batching)
        t0 = time.perf_counter()
        dec = [a for a in asyncio.run(concurrent(addr, doc, opts, LONG, "", decode_tokens))
               if isinstance(a, Answer) and a.figures]
        dec_s = time.perf_counter() - t0
        dec_tokens = sum(len(a.token_ids) for a in dec)
        dec_rate = dec_tokens / max(1e-9, dec_s - min((a.first_delta_s for a in dec), default=0.0))
        print(f"16 reused streams: {len(dec)} complete, {dec_tokens} tokens, {dec_rate:.1f} tok/s in all", flush=True)
    threads = settings.torch_threads or max(1, int(settings.decode_num_cpus))
    inproc_rate, n_inproc = inprocess_rate(doc, policy, kept, len(long_ans.token_ids), threads)
    out.update(cold_figures(cold_runs, default))
    out.update({
        "ttft_cold_s": cold.first_delta_s, "ttft_reused_s": warm.first_delta_s,
        "ttft_cold_server_s": cold.figures["ttft_s"], "ttft_reused_server_s": warm.figures["ttft_s"],
        "reused_tokens": warm.figures["reused_tokens"], "prompt_tokens": warm.figures["prompt_tokens"],
        "service_tok_s": service_rate, "inprocess_tok_s": inproc_rate, "decode_tokens": len(long_ans.token_ids),
        "inprocess_tokens": n_inproc, "torch_threads": threads, "wire_bytes": cold.figures["wire_bytes"],
        "wire_bytes_reused": warm.figures["wire_bytes"], "held_kv_bytes": cold.figures["held_kv_bytes"],
        "full_kv_bytes": cold.figures["full_kv_bytes"], "answers_identical": cold.token_ids == warm.token_ids,
        "concurrent_ok": len(ok), "concurrent_total": len(conc), "concurrent_wall_s": conc_s,
        "concurrent_ttft_p50_s": pct(ttfts, 0.5), "concurrent_ttft_p95_s": pct(ttfts, 0.95),
        "concurrent_decode_ok": len(dec), "concurrent_decode_tokens": dec_tokens,
        "concurrent_decode_tok_s": dec_rate,
    })
    return out


def brief(v):
    """A figure as printed: floats to 3 places, lists and dicts element by element."""
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, dict):
        return ", ".join(f"{p} {brief(x)}" for p, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(brief(x) for x in v) + "]"
    return str(v)


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    a = ap.parse_args(argv)
    if a.reused_repeats < 1:
        ap.error("--reused-repeats must be at least 1")
    return a


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.service", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    ap.add_argument("--policy", default="", help="policy of the reuse, decode and concurrency figures "
                    "(default: the service's default policy)")
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--cold-repeats", type=int, default=3, help="copies of the document asked cold of every policy")
    ap.add_argument("--precisions", type=parse_precisions, default=[],
                    help="comma-separated kv_precision values (e.g. fp32,int8): also measure the reused TTFT of "
                         "each, interleaved on the same cluster and document (default: none)")
    ap.add_argument("--reused-repeats", type=int, default=6, help="rounds of the reused TTFT by precision")
    ap.add_argument("--only", choices=("all", "reused-precision", "cold"), default="all",
                    help="reused-precision: only the reused TTFT by precision (of --precisions, default the "
                         "server's default_kv_precision); cold: only the cold TTFT by policy (full, kvzip, kvzap "
                         "and the default, interleaved over --cold-repeats copies of the document)")
    return ap


def main(argv: list[str] | None = None) -> None:
    a = parse_args(parser(), argv)
    res = run(a.tokens, a.policy, a.kept, a.decode_tokens, a.cold_repeats, a.precisions, a.reused_repeats, a.only)
    width = max(map(len, res))
    for k, v in res.items():
        if k == "answers_by_precision":
            v = {p: len(x) for p, x in v.items()}
        print(f"{k:{width}s}  {brief(v)}")
    if "ttft_reused_s_by_precision" in res:
        print("reused TTFT by precision: " + ", ".join(
            f"{p} {m:.3f} s ({brief(res['ttft_reused_range_s_by_precision'][p])}, x{res['ttft_reused_over_first'][p]:.3f})"
            for p, m in res["ttft_reused_s_by_precision"].items())
              + f"; answers identical: {res['answers_identical_by_precision']}")
    if a.only == "reused-precision":
        if a.json:
            write_json(a.json, res)
        return
    if a.only == "cold":
        print(f"cold TTFT by policy (medians, s): {res['ttft_cold_s_by_policy']}; {res['default_policy']} / full "
              f"{res['ttft_cold_default_over_full']:.2f} of medians, {res['ttft_cold_default_over_full_range']} per "
              f"copy (target <= 1.15); compressed stored after {res['compressed_stored_after_s']}")
        if a.json:
            write_json(a.json, res)
        return
    print(f"cold TTFT {res['default_policy']} / full {res['ttft_cold_default_over_full']:.2f} of medians, "
          f"{res['ttft_cold_default_over_full_range']} per copy (target <= 1.15); "
          f"reused/cold TTFT {res['ttft_reused_s'] / res['ttft_cold_s']:.3f} (target <= 0.1); "
          f"service/in-process tok/s {res['service_tok_s'] / max(1e-9, res['inprocess_tok_s']):.2f} (target >= 0.85); "
          f"concurrent {res['concurrent_ok']}/{res['concurrent_total']}")
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
