"""Engine benchmark: prefill and decode speed, KV bytes, full vs streaming, on the default model.

    python -m bench.engine --json bench/results/engine.json

A 2,000-token real document (CPython's pydoc topics), prefill tokens/s, decode tokens/s
over the full cache and over a streaming cache at kept 0.25, and the KV bytes each holds.
transformers' own generate on the same prompt is timed too, as the reference.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from headwise.documents import document_tokens
from headwise.models import ModelRunner, SamplingParams, resolve_model_path
from headwise.policies import get_policy


def _decode(runner: ModelRunner, cache, logits, n: int) -> float:
    t = time.perf_counter()
    toks = list(runner.generate(cache, logits, SamplingParams(max_new_tokens=n + 1, ignore_eos=True)))
    return (len(toks) - 1) / (time.perf_counter() - t)  # n decode steps; the first token comes from prefill


def run(model: str | None, tokens: int, new_tokens: int, kept: float, repeats: int) -> dict:
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    best = {"prefill_tok_s": 0.0, "decode_tok_s_full": 0.0, "decode_tok_s_streaming": 0.0, "hf_decode_tok_s": 0.0}
    for _ in range(repeats):
        t = time.perf_counter()
        full = runner.prefill_segment(ids)
        best["prefill_tok_s"] = max(best["prefill_tok_s"], len(ids) / (time.perf_counter() - t))
        best["decode_tok_s_full"] = max(best["decode_tok_s_full"], _decode(runner, full.cache, full.logits, new_tokens))
        st = runner.prefill_segment(ids, policy=get_policy("streaming", kept=kept))
        best["decode_tok_s_streaming"] = max(best["decode_tok_s_streaming"], _decode(runner, st.cache, st.logits, new_tokens))
        with torch.inference_mode():
            x = torch.tensor([ids])
            out = runner.model(x, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = time.perf_counter()
            for _ in range(new_tokens):
                out = runner.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best["hf_decode_tok_s"] = max(best["hf_decode_tok_s"], new_tokens / (time.perf_counter() - t))
    return {
        **best,
        "kv_bytes_full": full.segment.nbytes,
        "kv_bytes_streaming": st.segment.nbytes,
        "realised_streaming": st.segment.kept_fraction(),
        "prompt_tokens": len(ids),
        "new_tokens": new_tokens,
        "kept": kept,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "model": runner.config._name_or_path or "default",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--model", default=None, help="HF model directory (default: the installed default model)")
    ap.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed")
    ap.add_argument("--kept", type=float, default=0.25, help="kept fraction for the streaming policy")
    ap.add_argument("--repeats", type=int, default=2, help="runs; the best of them is reported")
    a = ap.parse_args()
    res = run(a.model, a.tokens, a.new_tokens, a.kept, a.repeats)
    t = Table(title=f"headwise engine bench: {res['prompt_tokens']} prompt tokens, {res['new_tokens']} decode steps, {res['threads']} threads")
    t.add_column("figure"); t.add_column("value", justify="right")
    t.add_row("prefill tokens/s (full)", f"{res['prefill_tok_s']:.1f}")
    t.add_row("decode tokens/s, full cache", f"{res['decode_tok_s_full']:.2f}")
    t.add_row(f"decode tokens/s, streaming kept {res['kept']}", f"{res['decode_tok_s_streaming']:.2f}")
    t.add_row("decode tokens/s, transformers (reference)", f"{res['hf_decode_tok_s']:.2f}")
    t.add_row("KV bytes, full", f"{res['kv_bytes_full']:,}")
    t.add_row(f"KV bytes, streaming (realised {res['realised_streaming']:.3f})", f"{res['kv_bytes_streaming']:,}")
    Console().print(t)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
