"""int8 rows on the default model's cache: which scale granularity, and where to dequantise.

    python -m bench.kvquant --json bench/results/kvquant.json
    python -m bench.kvquant --int4 --text stdlib --skip-where --json bench/results/kvquant_int4.json

1. Granularity. The kvzip cache (kept 0.25) of every case of bench.quality's default suite has
   its K and V rows quantised to int8 four ways (keys per (head, channel) or per row; values per
   row or per (head, channel)), dequantised, and each question asked on top: KL divergence of
   the first answer token's distribution from the fp32 cache's, whether the greedy answer (10
   tokens) is the fp32 cache's, and the relative error of the rows; plus the bytes of rows and
   scales against fp32 rows. The codec's format is the third line (both per channel); per-row
   scales are this bench's own code (fp16, one per row). `--int4`: int4 rows instead, one bf16
   scale per (head, channel) over the whole head, over 128-row groups or over 32-row groups (the
   codec's), with the int8 codec line beside them; `--text stdlib` builds the cases on the tuning
   text (bench.quality --text), which chose int4's group size.
2. Where to dequantise. On a 2,000-token document's kvzip cache at kept 0.25: one decode step
   over rows dequantised once when the cache is loaded (what decode does) against one step that
   first dequantises every layer's int8 rows (the work an on-the-fly design does each step on a
   CPU without fused int8 attention; this bench's own loop, same runner and attention). The two
   alternate step by step; medians and ranges over the steps, of wall time and of this thread's
   CPU time (torch on one thread runs in it: the figure a loaded shared machine disturbs least).
   Also the codec decode of the stored segment at fp32 and at int8 (the one-off cost at load).
3. Reused TTFT (`--ttft`): the serving path without Ray (PrefillWorker and DecodeWorker in this
   process, the real KV store in its own process over a real Redis, the default model, kvzip at
   kept 0.25 on a 2,000-token document): each precision's document is asked once cold, then
   asked again in alternating turns, fp32 and int8; Figures.ttft_s of the reused turns, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import machine, write_json
from headwise.cache import quant
from headwise.cache.codec import decode, encode
from headwise.cache.compact import CompactCache, LayerCache

SCHEMES = {  # name -> (keys per, values per)
    "K channel / V token (KIVI)": ("channel", "token"),
    "K token / V token": ("token", "token"),
    "K channel / V channel (codec)": ("channel", "channel"),
    "K token / V channel": ("token", "channel"),
}


SCHEMES4 = {  # int4 (headwise.cache.quant.quantise4): rows of one head per bf16 scale, keys and values per channel
    "int4, K/V channel, whole head": ("g0", "g0"),
    "int4, K/V channel, 128 rows": ("g128", "g128"),
    "int4, K/V channel, 32 rows (codec)": ("g32", "g32"),
    "int4, K/V channel, 16 rows": ("g16", "g16"),
    "int4, K channel 32 rows / V token": ("g32", "t4"),
    "int8, K/V channel, whole head (codec)": ("channel", "channel"),
}


def _per_group(x: torch.Tensor, offsets: torch.Tensor, group: int) -> tuple[torch.Tensor, int]:
    """x [R, d] through int4 with one bf16 scale per (group of `group` rows of a head, channel);
    group 0: the whole head. (dequantised, scale bytes)."""
    g = group or max(1, int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 1)
    q, s = quant.quantise4(x, offsets, g)
    return quant.dequantise4(q, s, offsets, x.dtype, g), s.numel() * s.element_size()


def _rows(x: torch.Tensor, offsets: torch.Tensor, per: str) -> tuple[torch.Tensor, int, float]:
    """(dequantised, scale bytes, bytes per element of the rows) for one granularity name."""
    if per.startswith("g"):
        return *_per_group(x, offsets, int(per[1:])), 0.5
    if per == "t4":
        return *_per_token4(x), 0.5
    return *(_per_channel(x, offsets) if per == "channel" else _per_token(x)), 1.0


def _per_token4(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [R, d] through int4 with one bf16 scale per row (rounded up); this bench's own alternative."""
    exact = (x.float().abs().amax(dim=1) / quant.QMAX4).contiguous().numpy()
    s = torch.from_numpy(quant._round_up_bf16(exact)).view(torch.bfloat16).float()[:, None]
    q = torch.round(x.float() / torch.where(s > 0, s, torch.ones_like(s))).clamp(-quant.QMAX4, quant.QMAX4)
    return (q * s).to(x.dtype), 2 * x.shape[0]


def _per_token(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [R, d] through int8 with one fp16 scale per row (rounded up, so |x / s| <= 127);
    (dequantised, scale bytes). This bench's own alternative; the codec is per channel."""
    exact = x.float().abs().amax(dim=1) / quant.QMAX
    s = exact.half()
    s = torch.where(s.float() < exact, torch.nextafter(s, torch.full_like(s, float("inf"))), s).float()[:, None]
    q = torch.round(x.float() / torch.where(s > 0, s, torch.ones_like(s))).clamp(-quant.QMAX, quant.QMAX)
    return (q * s).to(x.dtype), 2 * x.shape[0]


def _per_channel(x: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x [R, d] through int8 with one fp32 scale per (head, channel), as the codec; (dequantised, scale bytes)."""
    q, s = quant.quantise(x, offsets)
    return quant.dequantise(q, s, offsets, x.dtype), s.numel() * s.element_size()


def quantised(cache: CompactCache, keys_per: str, values_per: str) -> tuple[CompactCache, dict]:
    """The cache with its rows through int8 at the given granularity, and error/byte figures."""
    layers, err, nbytes = [], {"keys": [], "values": []}, {"rows": 0, "scales": 0, "fp32_rows": 0}
    for lc in cache.layers:
        k, ks, kb = _rows(lc.keys, lc.key_offsets(), keys_per)
        v, vs, vb = _rows(lc.values, lc.head_offsets, values_per)
        for name, a, b in (("keys", lc.keys, k), ("values", lc.values, v)):
            err[name].append(float((a - b).norm() / a.norm().clamp_min(1e-30)))
        nbytes["rows"] += kb * lc.keys.numel() + vb * lc.values.numel()
        nbytes["scales"] += ks + vs
        nbytes["fp32_rows"] += 4 * (lc.keys.numel() + lc.values.numel())
        layers.append(LayerCache(k, v, lc.head_offsets, lc.positions, lc.log_weights, lc.recall_ids, lc.recall,
                                 distant=lc.distant, distant_from=lc.distant_from))
    figures = {"rel_err_keys": statistics.mean(err["keys"]), "rel_err_values": statistics.mean(err["values"]),
               "ratio_fp32": nbytes["fp32_rows"] / (nbytes["rows"] + nbytes["scales"]), **nbytes}
    return CompactCache(layers, cache.seq_len, cache.start, dict(cache.meta)), figures


def granularity(runner, kept: float, console: Console, schemes: dict = SCHEMES, text: str = "pydoc") -> dict:
    from bench.quality import answer, build_cases
    from headwise.policies import get_policy
    from headwise.prompt import build_segments

    policy = get_policy("kvzip", kept=kept)
    out = {name: {"kl": [], "same_answer": 0, "questions": 0, "figures": []} for name in schemes}
    for case in build_cases(runner.tokenizer, "default", text=text):
        segs = [build_segments(runner.tokenizer, case.context, q.text, " " + q.prefix) for q in case.questions]
        base = runner.prefill_segment(segs[0].context, policy=policy).segment
        for s in segs:
            ref = runner.prefill_segment(s.question, base)
            ref_logp, ref_text = torch.log_softmax(ref.logits.float(), -1), answer(runner, base, s.question)
            for name, (kp, vp) in schemes.items():
                cache, fig = quantised(base, kp, vp)
                logp = torch.log_softmax(runner.prefill_segment(s.question, cache).logits.float(), -1)
                row = out[name]
                row["kl"].append(float((ref_logp.exp() * (ref_logp - logp)).sum()))
                row["same_answer"] += answer(runner, cache, s.question) == ref_text
                row["questions"] += 1
                row["figures"].append(fig)
        console.print(f"[dim]{case.name} done[/dim]")
    res = {}
    for name, row in out.items():
        figs = row.pop("figures")
        res[name] = {"kl_mean": statistics.mean(row["kl"]), "kl_max": max(row["kl"]),
                     "same_answer": row["same_answer"] / row["questions"], "questions": row["questions"],
                     **{k: statistics.mean(f[k] for f in figs) for k in ("rel_err_keys", "rel_err_values", "ratio_fp32")}}
    return res


def where_to_dequantise(runner, tokens: int, kept: float, steps: int) -> dict:
    from headwise.documents import document_tokens
    from headwise.policies import get_policy

    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    res = runner.prefill_segment(ids, policy=get_policy("kvzip", kept=kept))
    seg = res.segment
    enc = {p: encode(seg, include_recall=False, precision=p) for p in ("fp32", "int8")}
    load = {p: [] for p in enc}
    for _ in range(5):
        for p, e in enc.items():
            t = time.thread_time()
            decode(e.header, e.chunks)
            load[p].append(time.thread_time() - t)
    held = decode(enc["int8"].header, enc["int8"].chunks)  # dequantised once, at load
    stored = [(quant.quantise(lc.keys, lc.key_offsets()), quant.quantise(lc.values, lc.head_offsets)) for lc in seg.layers]
    on_the_fly = held.clone()
    token = int(res.logits.argmax())
    times = {clock: {"at_load": [], "per_step": []} for clock in ("wall", "cpu")}

    def per_step() -> None:
        for lc, ((kq, ks), (vq, vs)) in zip(on_the_fly.layers, stored, strict=True):  # every step, every layer
            lc.keys = quant.dequantise(kq, ks, lc.key_offsets(), torch.float32)
            lc.values = quant.dequantise(vq, vs, lc.head_offsets, torch.float32)
        runner.decode_step(token, on_the_fly)

    with torch.inference_mode():
        for i in range(steps + 2):
            for name, fn in (("at_load", lambda: runner.decode_step(token, held)), ("per_step", per_step)):
                w, c = time.perf_counter(), time.thread_time()
                fn()
                if i >= 2:  # two warm-up steps
                    times["wall"][name].append(time.perf_counter() - w)
                    times["cpu"][name].append(time.thread_time() - c)
    out = {"tokens": len(ids), "kept": kept, "steps": steps, "realised": seg.kept_fraction()}
    for clock, t in times.items():
        med = {k: statistics.median(v) for k, v in t.items()}
        out[f"step_ms_{clock}"] = {k: {"median": med[k] * 1e3, "min": min(v) * 1e3, "max": max(v) * 1e3} for k, v in t.items()}
        out[f"ratio_per_step_at_load_{clock}"] = med["per_step"] / med["at_load"]
        out[f"paired_ratio_{clock}"] = statistics.median(b / a for a, b in zip(t["at_load"], t["per_step"], strict=True))
    return out | {
        "load_ms": {p: statistics.median(v) * 1e3 for p, v in load.items()},
        "wire_bytes": {p: e.nbytes for p, e in enc.items()},
        "held_bytes": {"at_load": held.nbytes, "int8_rows": sum(kq.numel() + vq.numel() for (kq, _), (vq, _) in stored)},
    }


async def _ask(dw, doc: str, precision: str) -> dict:
    from services.protos.headwise.v1 import generate_pb2 as pb

    req = pb.GenerateRequest(context=doc, prompt="What is this document about?", max_new_tokens=4, kv_precision=precision,
                             policy="kvzip", kept=0.25)
    figures = None
    async for m in dw.generate(req, {"authorization": "Bearer bench-key"}):
        if m.HasField("figures"):
            figures = m.figures
    return {f.name: v for f, v in figures.ListFields()}


async def _reused_ttft(runner, tokens: int, rounds: int) -> dict:
    from bench.kvstore import TOKEN, start_store, wait_ready
    from headwise.documents import document_tokens
    from services.decode.worker import DecodeWorker
    from services.kvstore.client import KVStoreClient
    from services.kvstore.redis_proc import start_redis
    from services.prefill.worker import PrefillWorker
    from services.settings import Settings
    from services.store import StoreClients
    from services.tenancy import TenantRegistry

    doc = document_tokens(runner.tokenizer, tokens)
    redis_proc = start_redis()
    store, port = start_store(redis_proc.url)
    try:
        probe = KVStoreClient(f"127.0.0.1:{port}", TOKEN, "acme", timeout_s=60)
        await wait_ready(probe, store)
        await probe.close()
        settings = Settings(tenants="acme:bench-key", service_token=TOKEN, kvstore_addr=f"127.0.0.1:{port}",
                            decode_max_batch=1, store_timeout_s=60)
        stores = StoreClients(settings.kvstore_addr, TOKEN, timeout_s=60)
        pw = PrefillWorker(runner, stores, settings)
        dw = DecodeWorker(runner, stores, pw.prefill, TenantRegistry.from_settings(settings), settings)
        cold = {p: await _ask(dw, doc, p) for p in ("fp32", "int8")}
        turns = {p: [] for p in cold}
        for _ in range(rounds):
            for p in cold:
                turns[p].append(await _ask(dw, doc, p))
        await stores.close()
    finally:
        store.terminate()
        store.wait(10)
        redis_proc.stop()
    ttft = {p: [t["ttft_s"] for t in ts] for p, ts in turns.items()}
    return {
        "rounds": rounds, "status": {p: [t["store_status"] for t in ts] for p, ts in turns.items()},
        "ttft_reused_s": {p: {"median": statistics.median(v), "min": min(v), "max": max(v)} for p, v in ttft.items()},
        "ttft_reused_runs_s": ttft,  # turn by turn, fp32 and int8 alternating
        "ratio_int8_fp32": statistics.median(ttft["int8"]) / statistics.median(ttft["fp32"]),
        "paired_ratio_int8_fp32": statistics.median(b / a for a, b in zip(ttft["fp32"], ttft["int8"], strict=True)),
        "ttft_cold_s": {p: c["ttft_s"] for p, c in cold.items()},
        "figures": {p: {k: turns[p][-1].get(k) for k in ("held_kv_bytes", "stored_kv_bytes", "wire_bytes", "realised_kept")}
                    for p in turns},
    }


def _print_where(console: Console, w: dict, a) -> None:
    t = Table(title=f"decode step over a {w['tokens']}-token kvzip cache at kept {a.kept} (ms, {a.steps} steps)")
    for col in ("rows", "clock", "median", "min", "max", "per-step / at-load (paired)"):
        t.add_column(col, justify="right")
    for clock in ("cpu", "wall"):
        for k, v in w[f"step_ms_{clock}"].items():
            t.add_row({"at_load": "dequantised at load", "per_step": "int8, dequantised each step"}[k], clock,
                      f"{v['median']:.1f}", f"{v['min']:.1f}", f"{v['max']:.1f}",
                      f"{w[f'ratio_per_step_at_load_{clock}']:.3f} ({w[f'paired_ratio_{clock}']:.3f})" if k == "per_step" else "")
    console.print(t)
    console.print(f"codec decode (CPU) fp32 {w['load_ms']['fp32']:.1f} ms, int8 {w['load_ms']['int8']:.1f} ms; "
                  f"wire fp32 {w['wire_bytes']['fp32'] / 1e6:.2f} MB, int8 {w['wire_bytes']['int8'] / 1e6:.2f} MB")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=Path("bench/results/kvquant.json"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-granularity", action="store_true")
    ap.add_argument("--skip-where", action="store_true")
    ap.add_argument("--int4", action="store_true", help="the granularity table of int4 rows (row groups per scale) instead")
    ap.add_argument("--text", choices=("pydoc", "stdlib"), default="pydoc",
                    help="the cases' text (bench.quality --text): stdlib, the tuning text, for choosing a format")
    ap.add_argument("--ttft", type=int, default=0, metavar="ROUNDS", help="also reused TTFT through the workers, ROUNDS turns each")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from headwise.models import ModelRunner, resolve_model_path

    console = Console(width=None if console_tty() else 160)
    runner = ModelRunner.from_pretrained(resolve_model_path(a.model))
    out = {"machine": machine(), "threads": a.threads}
    if a.ttft:
        import asyncio

        out["ttft"] = t = asyncio.run(_reused_ttft(runner, a.tokens, a.ttft))
        console.print(f"reused TTFT (s, median of {a.ttft}): fp32 {t['ttft_reused_s']['fp32']['median']:.3f} "
                      f"[{t['ttft_reused_s']['fp32']['min']:.3f}-{t['ttft_reused_s']['fp32']['max']:.3f}], int8 "
                      f"{t['ttft_reused_s']['int8']['median']:.3f} [{t['ttft_reused_s']['int8']['min']:.3f}-"
                      f"{t['ttft_reused_s']['int8']['max']:.3f}]; int8/fp32 {t['ratio_int8_fp32']:.2f} "
                      f"(paired {t['paired_ratio_int8_fp32']:.2f}); figures {t['figures']}")
    if not a.skip_where:
        out["where"] = where_to_dequantise(runner, a.tokens, a.kept, a.steps)
        _print_where(console, out["where"], a)
    if not a.skip_granularity:
        key = "granularity_int4" if a.int4 else "granularity"
        out[key] = granularity(runner, a.kept, console, SCHEMES4 if a.int4 else SCHEMES, a.text)
        out["text"] = a.text
        g = Table(title=f"{'int4' if a.int4 else 'int8'} granularity on kvzip caches at kept {a.kept} "
                        f"(bench.quality default suite's cases, {a.text} text)")
        for col in ("scheme", "KL mean", "KL max", "same answer", "rel err K", "rel err V", "fp32 / quantised bytes"):
            g.add_column(col, justify="right")
        for name, r in out[key].items():
            g.add_row(name, f"{r['kl_mean']:.2e}", f"{r['kl_max']:.2e}", f"{r['same_answer']:.2f}",
                      f"{r['rel_err_keys']:.4f}", f"{r['rel_err_values']:.4f}", f"{r['ratio_fp32']:.3f}")
        console.print(g)
    write_json(a.json, out, indent=1)
    console.print(f"wrote {a.json}")
    return out


def console_tty() -> bool:
    import sys

    return sys.stdout.isatty()


if __name__ == "__main__":
    main()
