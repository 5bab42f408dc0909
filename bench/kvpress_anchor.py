"""The kvpress anchor: the same cases as bench.quality through NVIDIA's kvpress presses.

kvpress 0.5.5 needs transformers < 5.3, the engine runs transformers 5.x, so the anchor
lives in its own virtualenv and never enters the runtime dependencies:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 "kvpress==0.5.5" "transformers>=4.56,<5.3" rich matplotlib
    .venv-bench/bin/pip install --no-deps -e .
    .venv-bench/bin/python -m bench.kvpress_anchor --json bench/results/kvpress.json

(`make bench-quality` does all of it, then merges the result into bench.quality's table.)
Same token ids as headwise: the context segment and the question segment come from
headwise.prompt.build_segments; the context is prefilled under the press (context-only
compression, as kvpress's pipeline does), every question is asked on that one compressed
cache with explicit positions, and the answer rows are cut off again after each question.
kvpress's head-wise presses (AdaKV, KVzip) mask evicted keys in full-size tensors: the kept
fraction they report saves no bytes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console

from bench import write_json
from bench.quality import DEFAULT_KEPT, build_cases, is_correct, print_table

DEFAULT_PRESSES = ("streaming_llm", "snapkv", "knorm", "expected_attention", "tova", "observed_attention",
                   "adakv_expected_attention", "kvzip")


def make_press(name: str, ratio: float):
    import kvpress as kp

    return {
        "streaming_llm": lambda: kp.StreamingLLMPress(compression_ratio=ratio),
        "snapkv": lambda: kp.SnapKVPress(compression_ratio=ratio),
        "knorm": lambda: kp.KnormPress(compression_ratio=ratio),
        "expected_attention": lambda: kp.ExpectedAttentionPress(compression_ratio=ratio),
        "tova": lambda: kp.TOVAPress(compression_ratio=ratio),
        "observed_attention": lambda: kp.ObservedAttentionPress(compression_ratio=ratio),
        "adakv_expected_attention": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(compression_ratio=ratio)),
        "kvzip": lambda: kp.KVzipPress(compression_ratio=ratio),
    }[name]()


def cache_kwarg(module, cache) -> dict:
    """The cache argument under the name this transformers takes: `cache` (5.24 on; its old name
    `past_key_values` is deprecated, to be removed in 5.40), or `past_key_values` (the older
    transformers kvpress needs, in .venv-bench)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values": cache}


@torch.inference_mode()
def ask(model, tokenizer, cache, q_ids: list[int], context_length: int, max_new_tokens: int = 10) -> str:
    """Greedy answer on top of the compressed cache; stops like headwise (EOS, '.' or newline)."""
    lengths = [cache.get_seq_length(i) for i in range(len(cache))]
    ids = torch.tensor([q_ids])
    pos = torch.arange(context_length, context_length + len(q_ids))[None]
    out = model(input_ids=ids, position_ids=pos, logits_to_keep=1, **cache_kwarg(model, cache))
    text = greedy(model, tokenizer, cache, int(out.logits[0, -1].argmax()), context_length + len(q_ids), max_new_tokens)
    for i, n in enumerate(lengths):  # drop the question and answer rows: the next question starts clean
        cache.layers[i].keys = cache.layers[i].keys[:, :, :n]
        cache.layers[i].values = cache.layers[i].values[:, :, :n]
    return text


def greedy(model, tokenizer, cache, first: int, next_pos: int, max_new_tokens: int = 10) -> str:
    """Greedy decoding from the first token on; stops like headwise (EOS, '.' or newline)."""
    toks = [first]
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    for i in range(max_new_tokens - 1):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        if toks[-1] in eos or "." in text or "\n" in text:
            break
        out = model(input_ids=torch.tensor([[toks[-1]]]), position_ids=torch.tensor([[next_pos + i]]), **cache_kwarg(model, cache))
        toks.append(int(out.logits[0, -1].argmax()))
    return tokenizer.decode(toks, skip_special_tokens=True).strip()


@torch.inference_mode()
def run_case_query_aware(models: dict, tokenizer, case, press_name: str | None, ratio: float):
    """Query-aware regime: per question, document + question prefilled together under the press (the
    question is in the compressed context, as kvpress's pipeline does when given a question in the
    context); the first token comes from that prefill's logits, the rest is decoded on the compressed cache."""
    import contextlib

    from transformers import DynamicCache

    from headwise.prompt import build_segments

    model = models["eager" if press_name == "observed_attention" else "sdpa"]
    oks, det, secs = [], [], []
    for q in case.questions:
        s = build_segments(tokenizer, case.context, q.text, " " + q.prefix)
        ids = s.context + s.question
        press = make_press(press_name, ratio) if press_name else None
        cache = DynamicCache()
        t = time.perf_counter()
        with press(model) if press is not None else contextlib.nullcontext():
            out = model(input_ids=torch.tensor([ids]), logits_to_keep=1, **cache_kwarg(model, cache))
        secs.append(time.perf_counter() - t)
        text = greedy(model, tokenizer, cache, int(out.logits[0, -1].argmax()), len(ids))
        oks.append(is_correct(text, q.answer))
        det.append({"case": case.name, "press": press_name or "full", "kept": 1 - ratio, "question": q.text,
                    "answer": q.answer, "output": text, "correct": oks[-1]})
    return oks, sum(secs) / len(secs), det


@torch.inference_mode()
def run_case(models: dict, tokenizer, case, press_name: str | None, ratio: float) -> tuple[list[bool], float, list[dict]]:
    import contextlib

    from transformers import DynamicCache

    from headwise.prompt import build_segments

    segs = [build_segments(tokenizer, case.context, q.text, " " + q.prefix) for q in case.questions]
    ctx_ids = torch.tensor([segs[0].context])
    model = models["eager" if press_name == "observed_attention" else "sdpa"]
    press = make_press(press_name, ratio) if press_name else None
    cache = DynamicCache()
    t = time.perf_counter()
    with press(model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx_ids, **cache_kwarg(model.model, cache))
    dt = time.perf_counter() - t
    oks, det = [], []
    for q, s in zip(case.questions, segs, strict=True):
        text = ask(model, tokenizer, cache, s.question, ctx_ids.shape[1])
        oks.append(is_correct(text, q.answer))
        det.append({"case": case.name, "press": press_name or "full", "kept": 1 - ratio, "question": q.text,
                    "answer": q.answer, "output": text, "correct": oks[-1]})
    return oks, dt, det


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/kvpress.json"))
    ap.add_argument("--presses", default=",".join(DEFAULT_PRESSES))
    ap.add_argument("--kept", default=",".join(map(str, DEFAULT_KEPT)))
    ap.add_argument("--suite", choices=("default", "full"), default="default")
    ap.add_argument("--regime", choices=("reuse", "query-aware"), default="reuse",
                    help="query-aware: each question prefilled with its document under the press (one-shot)")
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--keyed-length", type=int, default=900)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 is much faster on a shared, busy CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import kvpress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headwise.models.loader import resolve_model_path

    console = Console()
    path = str(resolve_model_path(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    models = {impl: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    torch.manual_seed(0)
    kept = [float(x) for x in args.kept.split(",")]
    cases = build_cases(tokenizer, args.suite, args.length, args.keyed_length)
    presses = [p for p in args.presses.split(",") if p]
    res = {"kvpress_version": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
           "full": None, "policies": {}, "details": [], "errors": {}, "regime": args.regime}
    t0 = time.perf_counter()
    for name in presses + [None]:  # the full cache last: every press's figure is written as soon as it exists
        for k in ([1.0] if name is None else kept):
            oks, secs = [], []
            try:
                for case in cases:
                    run = run_case_query_aware if args.regime == "query-aware" else run_case
                    o, dt, det = run(models, tokenizer, case, name, round(1 - k, 6))
                    oks += o; secs.append(dt); res["details"] += det
            except Exception as e:  # a press that cannot run here is reported, not fatal
                res["errors"][f"{name}@{k}"] = f"{type(e).__name__}: {e}"[:300]
                console.print(f"[red]{name} at kept {k} failed: {e}[/red]")
                continue
            entry = {"accuracy": sum(oks) / len(oks), "realised": k, "prefill_s": sum(secs) / len(secs),
                     "correct": sum(oks), "total": len(oks), "bytes_saved": name not in ("adakv_expected_attention", "kvzip")}
            if name is None:
                res["full"], res["full_detail"] = entry["accuracy"], entry
            else:
                res["policies"].setdefault(name, {})[str(k)] = entry
            console.print(f"[dim]{name or 'full'} kept {k}: {sum(oks)}/{len(oks)}[/dim]")
            write_json(args.json, res, indent=1)  # partial results survive an interrupted run
    res["seconds"] = time.perf_counter() - t0
    print_table(console, res, f"kvpress anchor, {args.regime} regime (full cache accuracy {res['full']:.2f})", kept)
    write_json(args.json, res, indent=1)
    console.print(f"wrote {args.json} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
