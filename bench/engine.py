"""Engine benchmark: prefill seconds and decode tokens/s of every cache kind, in process, interleaved.

    python -m bench.engine --json bench/results/engine.json

A real document (CPython's pydoc topics, 2,000 tokens by default) is prefilled under `full`,
`streaming` and every ragged policy (`kvzip`, `razor`, `adakv`, `ems`, `pod`) at kept 0.25,
and under transformers' own forward and DynamicCache (the floor). For each: the prefill's
seconds, a 40-token question prefilled on top of the cache (the first on a freshly loaded copy,
which includes building its attention views, then a second one on the same copy), decode tokens/s of one stream,
and aggregate tokens/s of 16 streams decoding together (`ModelRunner.decode_batch`, each
stream its own copy of the cache: continuous batching). Every repeat runs every cache
kind once, in turn, so machine noise hits them alike; medians and ranges are reported.

The JSON carries the raw figures plus `ratio_decode` = {policy: {"1": x, "16": y}} (decode
tokens/s over the full cache's), `ratio_prefill` = {policy: x} (prefill seconds over the
full cache's), `ratio_question` / `ratio_question_warm` (the same for the first and second question; each ratio is the median over
repeats of the ratio within one repeat) and `bound_decode`: the decode ratio that memory traffic allows (weights +
K/V rows read per step, full over policy), so each ratio can be read as a fraction of it.
"""

from __future__ import annotations

import argparse
import json
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


def _steps(runner: ModelRunner, caches, logits, n: int) -> float:
    """Seconds for n greedy decode steps of len(caches) streams at once (caches grow in place)."""
    tokens = logits.reshape(len(caches), -1).argmax(-1).tolist()
    t = time.perf_counter()
    for _ in range(n):
        out = runner.decode_batch(tokens, caches)
        tokens = out.argmax(-1).tolist()
    return time.perf_counter() - t


@torch.inference_mode()
def _hf(runner: ModelRunner, ids: list[int], question: list[int], n1: int, n16: int, streams: int) -> dict:
    from transformers import DynamicCache

    model = runner.model
    x = torch.tensor([ids])
    t = time.perf_counter()
    out = model(x, cache=DynamicCache(), use_cache=True)
    prefill = time.perf_counter() - t
    past = out.cache
    q = model(torch.tensor([question]), cache=_copy(past, 1), use_cache=True)  # warm
    t = time.perf_counter()
    q = model(torch.tensor([question]), cache=_copy(past, 1), use_cache=True)
    question_s = time.perf_counter() - t
    del q
    res = {"prefill_s": prefill, "question_s": question_s, "question_warm_s": question_s}
    for B, n in ((1, n1), (streams, n16)):
        cache = _copy(past, B)
        nxt = out.logits[:, -1:].argmax(-1).expand(B, 1).contiguous()
        pos = len(ids)
        t = time.perf_counter()
        for _ in range(n):
            o = model(nxt, cache=cache, use_cache=True, cache_position=torch.tensor([pos]))
            nxt, pos = o.logits[:, -1:].argmax(-1), pos + 1
        res[f"decode_tok_s_{B}"] = B * n / (time.perf_counter() - t)
        del cache
    return res


def _copy(past, B: int):
    """A DynamicCache holding B copies of `past`'s one sequence."""
    from transformers import DynamicCache

    c = DynamicCache()
    for i, layer in enumerate(past.layers):
        c.update(layer.keys.expand(B, -1, -1, -1).clone(), layer.values.expand(B, -1, -1, -1).clone(), i)
    return c


def _one(runner: ModelRunner, name: str, ids: list[int], question: list[int], kept: float, n1: int, n16: int,
         streams: int) -> dict:
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
    for B, n in ((1, n1), (streams, n16)):
        caches = [base.clone() for _ in range(B)]
        logits = res.logits.expand(B, -1)
        _steps(runner, caches, logits, 1)  # warm: first tail allocation, attention views
        out[f"decode_tok_s_{B}"] = B * n / _steps(runner, caches, logits, n)
        del caches
    return out


def run(model: str | None, tokens: int, kept: float, repeats: int, n1: int, n16: int, streams: int,
        policies: list[str]) -> dict:
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    question = tok(QUESTION, add_special_tokens=False).input_ids[:QUESTION_TOKENS]
    if len(question) != QUESTION_TOKENS:
        raise SystemExit(f"the question is {len(question)} tokens with this tokenizer, not {QUESTION_TOKENS}")
    for name in policies:  # head profiles are computed once and cached on disk, outside the timing
        runner.context(get_policy(name, kept=kept))
    raw: dict[str, list[dict]] = {k: [] for k in [*policies, HF]}
    for r in range(repeats):
        for name in [*policies, HF]:
            if name == HF:
                raw[name].append(_hf(runner, ids, question, n1, n16, streams))
            else:
                raw[name].append(_one(runner, name, ids, question, kept, n1, n16, streams))
            Console(stderr=True).print(f"repeat {r + 1}/{repeats} {name}: {json.dumps(raw[name][-1])}")
    return _summarise(runner, raw, ids, question, kept, n1, n16, streams)


def _stat(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def _summarise(runner, raw, ids, question, kept, n1, n16, streams) -> dict:
    figs = {k: {f: _stat([r[f] for r in runs]) for f in runs[0] if f not in ("kv_bytes", "realised")} for k, runs in raw.items()}
    for k, runs in raw.items():
        if "kv_bytes" in runs[0]:
            figs[k]["kv_bytes"] = runs[0]["kv_bytes"]
            figs[k]["realised"] = runs[0]["realised"]
    full = figs["full"]
    W = _weights_bytes(runner)
    ratio_decode, ratio_prefill, ratio_question, ratio_question_warm, bound = {}, {}, {}, {}, {}
    ref = raw["full"]

    def ratio(k: str, f: str) -> float:
        """Median over repeats of this repeat's figure over the full cache's in the same repeat:
        the two ran back to back, so load that drifts over the run cancels."""
        xs = [r[f] / b[f] for r, b in zip(raw[k], ref, strict=True)]
        return statistics.median(xs)

    for k, f in figs.items():
        ratio_decode[k] = {str(B): ratio(k, f"decode_tok_s_{B}") for B in (1, streams)}
        ratio_prefill[k] = ratio(k, "prefill_s")
        ratio_question[k] = ratio(k, "question_s")
        ratio_question_warm[k] = ratio(k, "question_warm_s")
        kv = f.get("kv_bytes", full["kv_bytes"])
        bound[k] = {str(B): (W + B * full["kv_bytes"]) / (W + B * kv) for B in (1, streams)}
    return {
        "figures": figs, "ratio_decode": ratio_decode, "ratio_prefill": ratio_prefill,
        "ratio_question": ratio_question, "ratio_question_warm": ratio_question_warm, "bound_decode": bound, "weights_bytes": W,
        "prompt_tokens": len(ids), "question_tokens": len(question), "kept": kept, "streams": streams,
        "decode_steps": {"1": n1, str(streams): n16}, "repeats": len(raw["full"]),
        "threads": torch.get_num_threads(), "machine": platform.machine(), "torch": torch.__version__,
        "model": runner.config._name_or_path or "default",
    }


def table(res: dict) -> Table:
    S = res["streams"]
    t = Table(title=f"headwise engine bench: {res['prompt_tokens']} tokens, kept {res['kept']}, {res['threads']} thread(s), "
                    f"median of {res['repeats']} (range)")
    for c in ["cache", "KV MB", "prefill s", "x full", "question s", "x full", "2nd question s", "x full", "decode tok/s 1",
              "x full (bound)",
              f"tok/s {S} streams", "x full (bound)"]:
        t.add_column(c, justify="right")
    for k, f in res["figures"].items():
        rng = lambda name, p=2, f=f: f"{f[name]['median']:.{p}f} ({f[name]['min']:.{p}f}-{f[name]['max']:.{p}f})"  # noqa: E731
        kv = f"{f['kv_bytes'] / 1e6:.1f}" if "kv_bytes" in f else "-"
        rd, b = res["ratio_decode"][k], res["bound_decode"][k]
        t.add_row(k, kv, rng("prefill_s"), f"{res['ratio_prefill'][k]:.2f}", rng("question_s", 3),
                  f"{res['ratio_question'][k]:.2f}", rng("question_warm_s", 3), f"{res['ratio_question_warm'][k]:.2f}",
                  rng("decode_tok_s_1"), f"{rd['1']:.2f} ({b['1']:.2f})",
                  rng(f"decode_tok_s_{S}"), f"{rd[str(S)]:.2f} ({b[str(S)]:.2f})")
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
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the figures of one worker thread)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies (full is always run)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = ["full", *[p for p in a.policies.split(",") if p and p != "full"]]
    res = run(a.model, a.tokens, a.kept, a.repeats, a.steps, a.batch_steps, a.streams, names)
    Console(width=200).print(table(res))
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
