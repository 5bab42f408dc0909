"""Engine benchmark: prefill seconds and decode tokens/s of every cache kind, in process, interleaved.

    python -m bench.engine --json bench/results/engine.json

A real document (CPython's pydoc topics, 2,000 tokens by default) is prefilled under `full`,
`streaming` and every ragged policy (`kvzip`, `razor`, `adakv`, `ems`, `pod`) at kept 0.25,
and under transformers' own forward and DynamicCache (the floor). Each repeat first prefills
every cache kind in turn: the prefill's seconds and a 40-token question prefilled on top of the
cache (the first on a freshly loaded copy, which includes building its attention views, then a
second one on the same copy). Decode then runs step by step (`--decode steps`, the default;
bench/engine_decode.py): at one stream `--step-rounds` rounds, each one decode step of every
kind in an order rotated per round; at `--streams` streams the full cache and each other kind
alternate, `--rounds` x `--pair-steps` adjacent pairs per kind. `ratio_decode` is then the
median of the ratios of adjacent steps (other processes sharing the memory bandwidth move a
kind's steps by up to 1.8x within a run, over seconds, so only adjacent steps compare), and
the tok/s figures are B over the median step. With `--decode rounds`, `--rounds` decode rounds
run every cache kind once each:
decode tokens/s of one stream, and aggregate tokens/s of 16 streams decoding together
(`ModelRunner.decode_batch`, each stream its own copy of the cache: continuous batching), each
after one untimed warm step. The order of the kinds rotates from repeat to repeat and from round
to round, so no kind always runs first, or right after the heavy prefills; machine noise hits
them alike; medians and ranges are reported.

Decode is timed in wall-clock seconds and in the process's CPU seconds (`time.process_time`):
on a shared machine the wall time also counts the time the process waited for a core, the CPU
time does not (it still counts time stalled on memory that other processes share).

The JSON carries the raw figures plus `ratio_decode` = {policy: {"1": x, "16": y}} (decode
tokens/s over the full cache's, wall; `ratio_decode_cpu` the same in CPU time; each the median
over decode rounds of the ratio within one round), `ratio_prefill` = {policy: x} (prefill
seconds over the full cache's), `ratio_question` / `ratio_question_warm` (the same for the first
and second question; medians over repeats of the ratio within one repeat), `bound_decode`: the
decode ratio that memory traffic allows (weights + K/V rows read per step, full over policy), so
each ratio can be read as a fraction of it, and the 1-minute load average sampled during the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench import write_json
from headwise.documents import document_tokens
from headwise.models import ModelRunner, resolve_model_path
from headwise.policies import get_policy

POLICIES = ["full", "streaming", "kvzip", "razor", "adakv", "ems", "pod"]
HF = "transformers"
QUESTION = (" Question: which statement is used to leave a loop early, what happens to the loop's else clause when"
            " it runs, and which other statement skips only the rest of the current iteration? Answer briefly.")
QUESTION_TOKENS = 40


def _weights_bytes(runner: ModelRunner) -> int:
    """Bytes of the weights a decode step reads (embeddings read one row, so they are left out
    unless tied to the LM head, which reads them all)."""
    return sum(p.numel() * p.element_size() for p in runner.model.parameters())


def _steps(runner: ModelRunner, caches, logits, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds for n greedy decode steps of len(caches) streams at once (caches grow in place)."""
    tokens = logits.reshape(len(caches), -1).argmax(-1).tolist()
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        out = runner.decode_batch(tokens, caches)
        tokens = out.argmax(-1).tolist()
    return time.perf_counter() - t, time.process_time() - c


@torch.inference_mode()
def _hf_prefill(runner: ModelRunner, ids: list[int], question: list[int]) -> tuple[dict, tuple]:
    """transformers' own forward and DynamicCache: prefill and question figures, and what decode needs."""
    from transformers import DynamicCache

    model = runner.model
    t = time.perf_counter()
    out = model(torch.tensor([ids]), cache=DynamicCache(), use_cache=True)
    prefill = time.perf_counter() - t
    past = out.cache
    q = model(torch.tensor([question]), cache=_copy(past, 1), use_cache=True)  # warm
    t = time.perf_counter()
    q = model(torch.tensor([question]), cache=_copy(past, 1), use_cache=True)
    question_s = time.perf_counter() - t
    del q
    return {"prefill_s": prefill, "question_s": question_s, "question_warm_s": question_s}, (past, out.logits[:, -1], len(ids))


@torch.inference_mode()
def _hf_decode(runner: ModelRunner, state: tuple, B: int, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of n greedy steps of B copies of the prefilled sequence under transformers."""
    past, logits, pos = state
    model = runner.model
    cache = _copy(past, B)
    nxt = logits.argmax(-1).expand(B, 1).contiguous()
    o = model(nxt, cache=cache, use_cache=True, cache_position=torch.tensor([pos]))  # warm, as the engine's first step
    nxt, pos = o.logits[:, -1:].argmax(-1), pos + 1
    t, c = time.perf_counter(), time.process_time()
    for _ in range(n):
        o = model(nxt, cache=cache, use_cache=True, cache_position=torch.tensor([pos]))
        nxt, pos = o.logits[:, -1:].argmax(-1), pos + 1
    return time.perf_counter() - t, time.process_time() - c


def _copy(past, B: int):
    """A DynamicCache holding B copies of `past`'s one sequence."""
    from transformers import DynamicCache

    c = DynamicCache()
    for i, layer in enumerate(past.layers):
        c.update(layer.keys.expand(B, -1, -1, -1).clone(), layer.values.expand(B, -1, -1, -1).clone(), i)
    return c


def _prefill(runner: ModelRunner, name: str, ids: list[int], question: list[int], kept: float) -> tuple[dict, tuple]:
    """Prefill and question figures of one policy, and what its decode needs (the cache, the logits)."""
    policy = get_policy(name, kept=kept)
    ctx = runner.context(policy)
    t = time.perf_counter()
    res = runner.prefill_segment(ids, policy=policy, ctx=ctx)
    prefill = time.perf_counter() - t
    base = res.cache
    runner.prefill(question, base.clone())  # warm (code paths, allocator), on a copy: its attention views stay there
    fresh = base.clone()
    t = time.perf_counter()
    runner.prefill(question, fresh)  # the first question on a loaded cache: includes building its attention views
    question_s = time.perf_counter() - t
    t = time.perf_counter()
    runner.prefill(question, fresh)  # a second question: the views are already built
    question_warm_s = time.perf_counter() - t
    del fresh
    out = {"prefill_s": prefill, "question_s": question_s, "question_warm_s": question_warm_s, "kv_bytes": res.segment.nbytes,
           "realised": res.segment.kept_fraction()}
    return out, (base, res.logits)


def _decode(runner: ModelRunner, state: tuple, B: int, n: int) -> tuple[float, float]:
    """(wall, CPU) seconds of n decode steps of B streams, each its own copy of the cache."""
    base, logits = state
    caches = [base.clone() for _ in range(B)]
    logits = logits.expand(B, -1)
    _steps(runner, caches, logits, 1)  # warm: first tail allocation, attention views
    return _steps(runner, caches, logits, n)


def _rotated(names: list[str], k: int) -> list[str]:
    k %= len(names)
    return names[k:] + names[:k]


def run(model: str | None, tokens: int, kept: float, repeats: int, n1: int, n16: int, streams: int,
        policies: list[str], rounds: int = 3, interleave: bool = False, step_rounds: int = 60, pair_steps: int = 4) -> dict:
    """Per repeat: every cache kind prefilled (and its questions timed), then `rounds` rounds of
    decode, each running every cache kind once at 1 and at `streams` streams, in an order rotated
    from round to round (so no kind always runs first, right after the prefills, or last)."""
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    question = tok(QUESTION, add_special_tokens=False).input_ids[:QUESTION_TOKENS]
    if len(question) != QUESTION_TOKENS:
        raise SystemExit(f"the question is {len(question)} tokens with this tokenizer, not {QUESTION_TOKENS}")
    for name in policies:  # head profiles are computed once and cached on disk, outside the timing
        runner.context(get_policy(name, kept=kept))
    names = [*policies, HF]
    raw: dict[str, list[dict]] = {k: [] for k in names}
    decode: dict[str, list[dict]] = {k: [] for k in names}  # one entry per (repeat, round)
    load = [os.getloadavg()[0]]
    console = Console(stderr=True)
    for r in range(repeats):
        states = {}
        for name in _rotated(names, r):
            figs, states[name] = (_hf_prefill(runner, ids, question) if name == HF
                                  else _prefill(runner, name, ids, question, kept))
            raw[name].append(figs)
            console.print(f"repeat {r + 1}/{repeats} {name}: {json.dumps(figs)}")
        if interleave:  # decode step by step (bench.engine_decode): ratios of adjacent steps
            from bench.engine_decode import many_streams, one_stream

            dstates = {n: (st if n == HF else st[:2]) for n, st in states.items()}
            order = ["full", *[n for n in names if n != "full"]]
            runs = {1: one_stream(runner, dstates, order, step_rounds, 30)}
            load.append(os.getloadavg()[0])
            runs[streams] = many_streams(runner, dstates, order, streams, max(1, rounds), pair_steps, 30)
            load.append(os.getloadavg()[0])
            for name in names:
                rec = {}
                for B, res in runs.items():
                    f = res[name]
                    rec[f"decode_tok_s_{B}"], rec[f"decode_cpu_tok_s_{B}"] = f["tok_s"], f["cpu_tok_s"]
                    rec[f"x_full_{B}"], rec[f"x_full_cpu_{B}"] = f["x_full"]["median"], f["x_full_cpu"]["median"]
                    rec[f"x_full_cpu_q1_{B}"], rec[f"x_full_cpu_q3_{B}"] = f["x_full_cpu"]["q1"], f["x_full_cpu"]["q3"]
                decode[name].append(rec)
            console.print(f"repeat {r + 1}/{repeats} decode step by step, load {load[-1]:.2f}: "
                          + json.dumps({n: [round(decode[n][-1][f"x_full_cpu_{B}"], 3) for B in (1, streams)] for n in names}))
            del states
            continue
        for k in range(rounds):
            for name in _rotated(names, r * rounds + k):
                rec = {}
                for B, n in ((1, n1), (streams, n16)):
                    wall, cpu = (_hf_decode if name == HF else _decode)(runner, states[name], B, n)
                    rec[f"decode_tok_s_{B}"], rec[f"decode_cpu_tok_s_{B}"] = B * n / wall, B * n / cpu
                decode[name].append(rec)
            load.append(os.getloadavg()[0])
            console.print(f"repeat {r + 1}/{repeats} decode round {k + 1}/{rounds}, load {load[-1]:.2f}: "
                          + json.dumps({name: [round(decode[name][-1][f"decode_tok_s_{B}"], 2) for B in (1, streams)]
                                        for name in names}))
        del states
    return _summarise(runner, raw, decode, ids, question, kept, n1, n16, streams, load)


def _stat(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _summarise(runner, raw, decode, ids, question, kept, n1, n16, streams, load) -> dict:
    figs = {k: {f: _stat([r[f] for r in runs]) for f in runs[0] if f not in ("kv_bytes", "realised")} for k, runs in raw.items()}
    for k, recs in decode.items():
        figs[k].update({f: _stat([r[f] for r in recs]) for f in recs[0]})
    for k, runs in raw.items():
        if "kv_bytes" in runs[0]:
            figs[k]["kv_bytes"] = runs[0]["kv_bytes"]
            figs[k]["realised"] = runs[0]["realised"]
    full = figs["full"]
    W = _weights_bytes(runner)

    def ratio(src: dict, k: str, f: str) -> float:
        """Median over repeats (prefill) or decode rounds of the figure over the full cache's in
        the same repeat or round: the two ran in one stretch, so load that drifts over the run cancels."""
        return statistics.median([r[f] / b[f] for r, b in zip(src[k], src["full"], strict=True)])

    ratio_decode, ratio_decode_cpu, ratio_prefill, ratio_question, ratio_question_warm, bound = {}, {}, {}, {}, {}, {}
    steps = "x_full_1" in decode["full"][0]  # decoded step by step: the ratios of adjacent steps (median per repeat)
    for k, f in figs.items():
        if steps:
            ratio_decode[k] = {str(B): statistics.median([r[f"x_full_{B}"] for r in decode[k]]) for B in (1, streams)}
            ratio_decode_cpu[k] = {str(B): statistics.median([r[f"x_full_cpu_{B}"] for r in decode[k]]) for B in (1, streams)}
        else:
            ratio_decode[k] = {str(B): ratio(decode, k, f"decode_tok_s_{B}") for B in (1, streams)}
            ratio_decode_cpu[k] = {str(B): ratio(decode, k, f"decode_cpu_tok_s_{B}") for B in (1, streams)}
        ratio_prefill[k] = ratio(raw, k, "prefill_s")
        ratio_question[k] = ratio(raw, k, "question_s")
        ratio_question_warm[k] = ratio(raw, k, "question_warm_s")
        kv = f.get("kv_bytes", full["kv_bytes"])
        bound[k] = {str(B): (W + B * full["kv_bytes"]) / (W + B * kv) for B in (1, streams)}
    return {
        "figures": figs, "ratio_decode": ratio_decode, "ratio_decode_cpu": ratio_decode_cpu, "ratio_prefill": ratio_prefill,
        "ratio_question": ratio_question, "ratio_question_warm": ratio_question_warm, "bound_decode": bound, "weights_bytes": W,
        "prompt_tokens": len(ids), "question_tokens": len(question), "kept": kept, "streams": streams,
        "decode_steps": {"1": n1, str(streams): n16}, "repeats": len(raw["full"]), "decode_rounds": len(decode["full"]),
        "decode_method": "steps" if steps else "rounds",
        "load_average_1min": {"min": min(load), "max": max(load), "samples": load},
        "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "model": runner.config._name_or_path or "default",
    }


def table(res: dict) -> Table:
    S = res["streams"]
    ld = res["load_average_1min"]
    t = Table(title=f"headwise engine bench: {res['prompt_tokens']} tokens, kept {res['kept']}, {res['threads']} thread(s); "
                    f"prefill: median (range) of {res['repeats']} repeats, decode: "
                    + ("step by step, ratios of adjacent steps (tok/s: medians of steps); "
                       if res.get("decode_method") == "steps" else f"of {res['decode_rounds']} rounds; ")
                    +
                    f"wall-clock figures, CPU-time ratios in 'x full CPU'; load average {ld['min']:.1f}-{ld['max']:.1f}")
    for c in ["cache", "KV MB", "prefill s", "x full", "question s", "x full", "2nd question s", "x full", "decode tok/s 1",
              "x full (bound)", "x full CPU", f"tok/s {S} streams", "x full (bound)", "x full CPU"]:
        t.add_column(c, justify="right")
    for k, f in res["figures"].items():
        rng = lambda name, p=2, f=f: f"{f[name]['median']:.{p}f} ({f[name]['min']:.{p}f}-{f[name]['max']:.{p}f})"  # noqa: E731
        kv = f"{f['kv_bytes'] / 1e6:.1f}" if "kv_bytes" in f else "-"
        rd, rc, b = res["ratio_decode"][k], res["ratio_decode_cpu"][k], res["bound_decode"][k]
        t.add_row(k, kv, rng("prefill_s"), f"{res['ratio_prefill'][k]:.2f}", rng("question_s", 3),
                  f"{res['ratio_question'][k]:.2f}", rng("question_warm_s", 3), f"{res['ratio_question_warm'][k]:.2f}",
                  rng("decode_tok_s_1"), f"{rd['1']:.2f} ({b['1']:.2f})", f"{rc['1']:.2f}",
                  rng(f"decode_tok_s_{S}"), f"{rd[str(S)]:.2f} ({b[str(S)]:.2f})", f"{rc[str(S)]:.2f}")
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--model", default=None, help="HF model directory (default: the installed default model)")
    ap.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    ap.add_argument("--kept", type=float, default=0.25, help="kept fraction of every compressing policy")
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed, one stream")
    ap.add_argument("--batch-steps", type=int, default=6, help="decode steps timed, all streams together")
    ap.add_argument("--streams", type=int, default=16, help="streams decoding together")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs; medians and ranges reported")
    ap.add_argument("--rounds", type=int, default=3, help="decode rounds per repeat (every cache kind, order rotated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures of one worker thread)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies (full is always run)")
    ap.add_argument("--decode", choices=("steps", "rounds"), default="steps",
                    help="steps: the kinds take turns step by step (bench.engine_decode; --step-rounds one-stream "
                         "rounds, --rounds x --pair-steps adjacent pairs with full per kind at --streams); "
                         "rounds: --rounds rounds of --steps / --batch-steps steps per kind")
    ap.add_argument("--step-rounds", type=int, default=60, help="one-stream rounds of one step per kind (--decode steps)")
    ap.add_argument("--pair-steps", type=int, default=4, help="steps per kind and round at --streams (--decode steps)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = ["full", *[p for p in a.policies.split(",") if p and p != "full"]]
    res = run(a.model, a.tokens, a.kept, a.repeats, a.steps, a.batch_steps, a.streams, names, a.rounds,
              a.decode == "steps", a.step_rounds, a.pair_steps)
    Console(width=200).print(table(res))
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
