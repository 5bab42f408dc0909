"""`headwise demo`: the service end to end on one machine, readable in a terminal.

Starts the local cluster, takes a real document (CPython's pydoc topics) with three facts
inserted so answers can be checked, and asks questions from two separate client sessions
(two connections) of one tenant, then once from another tenant. The first question is
answered from the document's exact cache while its compression follows on the prefill
replica (session 1's second question does not wait for it either); the demo waits until the
compressed cache is stored, and session 2's questions reuse it from the KV store; the other
tenant gets no reuse. Answers stream as they arrive; a figures table
closes the run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from cluster.client import Answer, HeadwiseClient
from cluster.engine_demo import insert_fact


@dataclass(frozen=True)
class Fact:
    sentence: str
    question: str
    prefix: str
    answer: str
    depth: float


FACTS = (
    Fact("The access code for the Lisbon archive is 4817.", "What is the access code for the Lisbon archive?",
         "The access code for the Lisbon archive is", "4817", 0.3),
    Fact("The ferry to Tromso leaves from pier 12.", "From which pier does the ferry to Tromso leave?",
         "The ferry to Tromso leaves from pier", "12", 0.6),
    Fact("The museum's night guard is named Arvid.", "What is the name of the museum's night guard?",
         "The museum's night guard is named", "Arvid", 0.85),
)

# (session label, tenant, fact index): session 2 is a second connection asking the same document
PLAN = (("session 1", "acme", 1), ("session 1", "acme", 2), ("session 2", "acme", 1), ("session 2", "acme", 0),
        ("other tenant", "globex", 1))


def demo_document(tokens: int) -> str:
    from transformers import AutoTokenizer

    from headwise.documents import document_tokens
    from headwise.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path(None))
    doc = document_tokens(tok, tokens)
    for f in FACTS:
        doc = insert_fact(doc, f.sentence, f.depth)
    return doc


async def ask_plan(addr: str, keys: dict[str, str], doc: str, policy: str, kept: float, console: Console) -> list[dict]:
    clients: dict[str, HeadwiseClient] = {}
    rows: list[dict] = []
    sent = time.time()
    try:
        for label, tenant, i in PLAN:
            fact = FACTS[i]
            if label != "session 1" and rows and all(r["store_status"] == "compressing" for r in rows):
                await wait_compressed(policy, sent, console)
            client = clients.get(label) or clients.setdefault(label, HeadwiseClient(addr, keys[tenant], tenant))
            console.print(f"\n[bold cyan]{label}[/] ({tenant}) [bold]Q:[/] {fact.question}")
            console.print(f"  [bold]A:[/] [dim]{fact.prefix}[/]", end="")
            ans: Answer = await client.ask(
                fact.question, doc, answer_prefix=" " + fact.prefix, policy=policy, kept=kept,
                max_new_tokens=10, stop=[".", "\n"], on_text=lambda s: console.print(s, end="", markup=False, highlight=False),
            )
            console.print()
            if (note := store_note(ans.figures)) is not None:
                console.print(f"  [yellow]{note}[/]")
            rows.append({"session": label, "tenant": tenant, "question": fact.question, "answer": ans.text.strip(),
                         "ok": fact.answer in ans.text, "first": all(r["tenant"] != tenant for r in rows),
                         **ans.figures})
    finally:
        for c in clients.values():
            await c.close()
    return rows


async def wait_compressed(policy: str, since: float, console: Console) -> None:
    """Session 2 is meant to show reuse: wait until the compression that followed session 1's first
    answer is stored (it runs on the prefill replica after the handoff; its questions did not wait)."""
    import logging

    from cluster.local import wait_stored

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the handle's router start-up line is noise here
    console.print(f"\n[dim]waiting for the {policy} compression of the document to be stored …[/]")
    rec = await asyncio.to_thread(wait_stored, policy.split(":")[0], since, 600.0)
    if rec is None:
        console.print("[yellow]  the compressed cache was not stored in 600 s; the next questions compute it again[/]")
    else:
        console.print(f"[dim]  {rec['outcome']} {rec['handoff_to_stored_s']:.1f} s after the first answer's handoff[/]")


def store_note(figures: dict) -> str | None:
    """A line for an answer whose cache was not kept in the store (None when it was)."""
    status = figures.get("store_status")
    if status == "not_stored":
        return ("not stored: the KV store would not keep this answer's cache (larger than the tenant's quota, "
                "or the store is full); a later question about this document computes it again")
    if status == "bypassed":
        return "not stored: the KV store was unreachable; answered from the cache prefill handed over directly"
    if status == "compressing":
        return ("answered from the document's exact cache without waiting for the compression pass; "
                "the compressed cache is computed now and stored for the next questions")
    return None


COLD = ("stored", "compressing")  # a document's first request: computed here, not reused


def _compressed(rows: list[dict]) -> dict | None:
    """The row that shows the stored (compressed) cache: a reused one, else a cold one stored as computed."""
    return next((r for r in rows if r["store_status"] == "reused"), None) or next(
        (r for r in rows if r["store_status"] == "stored"), rows[0] if rows else None)


def figures_table(rows: list[dict]) -> Table:
    ref = _compressed(rows)
    policy = ref["policy"].split("(")[0] if ref else ""
    t = Table(title=f"figures ({policy}, kept {ref['realised_kept']:.2f} realised)" if ref else "figures")
    for col in ("who", "store", "reused", "TTFT s", "tok/s", "held / full KV", "answer", "ok"):
        t.add_column(col, justify="left" if col in ("who", "store", "answer") else "right")
    for r in rows:
        who = f"{r['session'].replace('session ', 's').replace('other tenant', 'other')}/{r['tenant']}"
        t.add_row(who, r["store_status"], f"{r['reused_tokens']}/{r['prompt_tokens']}", f"{r['ttft_s']:.2f}",
                  f"{r['decode_tok_s']:.1f}", f"{_mb(r['held_kv_bytes'])} / {_mb(r['full_kv_bytes'])}",
                  r["answer"][:12], "yes" if r["ok"] else "no")
    return t


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}MB"


def summary(rows: list[dict]) -> str:
    cold = [r["ttft_s"] for r in rows if r["store_status"] in COLD and r.get("first", True)]
    warm = [r["ttft_s"] for r in rows if r["store_status"] == "reused"]
    same = [r["answer"] for r in rows if r["tenant"] == "acme" and r["question"] == FACTS[PLAN[0][2]].question]
    lines = []
    if cold and warm:
        lines.append(f"cold TTFT {sum(cold) / len(cold):.2f} s vs reused {sum(warm) / len(warm):.2f} s "
                     f"({sum(cold) / len(cold) / max(1e-9, sum(warm) / len(warm)):.0f}x faster)")
    if (ref := _compressed(rows)) is not None:
        lines.append(f"KV cache held {_mb(ref['held_kv_bytes'])} of {_mb(ref['full_kv_bytes'])} "
                     f"({ref['policy']})")
    if len(same) == 2:
        how = ("first from the exact cache, then from the compressed one" if any(r["store_status"] == "compressing" for r in rows)
               else "from two sessions")
        lines.append(f"the same question {how}: " + ("identical answers" if same[0] == same[1] else "different answers"))
    lines.append(f"{sum(r['ok'] for r in rows)}/{len(rows)} answers contain the inserted fact")
    return "\n".join(lines)


def run_demo(tokens: int = 1200, policy: str = "kvzap", kept: float = 0.25, console: Console | None = None) -> list[dict]:
    from cluster.local import DEV_TENANTS, LocalCluster

    console = console or Console()
    console.print(f"[bold]document[/]: CPython pydoc topics, about {tokens} tokens, three facts inserted")
    doc = demo_document(tokens)
    with LocalCluster(log=lambda s: console.print(f"[dim]{s}[/]")) as cluster:
        for line in cluster.endpoints.lines():
            console.print(f"[dim]  {line}[/]")
        rows = asyncio.run(ask_plan(cluster.endpoints.grpc, DEV_TENANTS, doc, policy, kept, console))
        console.print()
        console.print(figures_table(rows))
        console.print(summary(rows))
        console.print("[dim]stopping the local cluster …[/]")
    return rows
