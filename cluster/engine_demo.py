"""The engine alone on the default model: compress a real document, answer, show the figures."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from headwise.documents import document_tokens
from headwise.models import ModelRunner, SamplingParams, resolve_model_path
from headwise.policies import get_policy
from headwise.prompt import build_segments

FACT = "The access code for the Lisbon archive is 4817."
QUESTION = "What is the access code for the Lisbon archive?"
PREFIX = "The access code for the Lisbon archive is"
ANSWER = "4817"


def insert_fact(doc: str, fact: str, depth: float) -> str:
    """Put `fact` on its own line at a relative depth of the document."""
    lines = doc.split("\n")
    at = int(len(lines) * depth)
    return "\n".join(lines[:at] + ["", fact, ""] + lines[at:])


def run_engine_demo(model: str | None = None, tokens: int = 1500, console: Console | None = None) -> list[dict]:
    console = console or Console()
    path = resolve_model_path(model)
    runner = ModelRunner.from_pretrained(path)
    doc = insert_fact(document_tokens(runner.tokenizer, tokens), FACT, 0.5)
    seg = build_segments(runner.tokenizer, doc, QUESTION, answer_prefix=" " + PREFIX)
    console.print(f"[bold]document[/bold]: CPython pydoc topics, {len(seg.context)} tokens, fact at depth 0.5")
    console.print(f"[bold]question[/bold]: {QUESTION}")
    rows = []
    for name, kept in (("full", 1.0), ("streaming", 0.25), ("razor", 0.25), ("kvzip", 0.25), ("kvzip", 0.1)):
        policy = get_policy(name, kept=kept)
        t0 = time.perf_counter()
        ctx = runner.prefill_segment(seg.context, policy=policy)
        t1 = time.perf_counter()
        q = runner.prefill_segment(seg.question, ctx.cache)
        ttft = time.perf_counter() - t0
        t2 = time.perf_counter()
        toks = list(runner.generate(q.cache, q.logits, SamplingParams(max_new_tokens=12, stop=(".", "\n"))))
        dt = time.perf_counter() - t2
        text = runner.tokenizer.decode(toks, skip_special_tokens=True).strip()
        rows.append({
            "policy": name, "kept": kept, "answer": text, "correct": ANSWER in text,
            "prefill_s": t1 - t0, "ttft_s": ttft, "decode_tok_s": len(toks) / dt if dt else 0.0,
            "kv_bytes": ctx.segment.nbytes, "full_kv_bytes": ctx.segment.full_nbytes(),
            "realised": ctx.segment.kept_fraction(),
        })
    table = Table(title="headwise engine: one document, one question")
    for col in ("policy", "kept", "realised", "KV bytes", "full bytes", "prefill s", "decode tok/s", "answer", "ok"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["policy"], f"{r['kept']:.2f}", f"{r['realised']:.3f}", f"{r['kv_bytes']:,}", f"{r['full_kv_bytes']:,}",
                      f"{r['prefill_s']:.2f}", f"{r['decode_tok_s']:.1f}", r["answer"][:40], "yes" if r["correct"] else "no")
    console.print(table)
    return rows
