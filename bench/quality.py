"""Quality benchmark: answer accuracy against the kept fraction, per policy, on the default model.

    python -m bench.quality --json bench/results/quality.json [--policies snapkv,razor] [--kept 0.5,0.25,0.1]
    python -m bench.quality --calibrate            # full-cache accuracy against context length
    python -m bench.quality --cost --json bench/results/prefill_cost.json   # prefill time with each scorer

Cases are built deterministically from CPython's pydoc topics (real text, offline) with
inserted facts whose exact answers are checked:
  * single: one fact at several depths of a long document;
  * keyed:  several facts of the same form (access codes of four archives), one asked;
  * multi:  several different facts in ONE document; the context is compressed once and
            every question is asked on top of that same compressed cache (the reuse path).
The context segment is compressed before any question is seen (query-agnostic), exactly
as the service does by default. `--regime query-aware` instead prefills document + question
and compresses the document with the question's queries as the window (the papers' and
kvpress's regime; the service's `query_aware` request field): every policy that supports it,
one prefill per question shared by all of them, same table and JSON layout. Each case's context is prefilled once; every policy and kept fraction
compresses the same prefill state, so the comparison is paired.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEFAULT_POLICIES = ("streaming", "snapkv", "adakv", "razor", "taskkv", "ems", "ahakv", "kvzip", "kvzap")
DEFAULT_KEPT = (0.5, 0.25, 0.1)
CITIES = ("Lisbon", "Oslo", "Quito", "Hanoi", "Dakar", "Perth", "Tbilisi", "Lima")
WORDS = ("marigold", "tangerine", "basalt", "juniper", "cobalt", "lantern", "saffron", "harbor")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday")


@dataclass(frozen=True)
class Question:
    text: str
    prefix: str  # starts the assistant turn: restates the subject so the answer comes first
    answer: str


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # single | keyed | multi
    context: str
    questions: tuple[Question, ...]


def code_fact(city: str, code: str) -> tuple[str, Question]:
    return (f"The access code for the {city} archive is {code}.",
            Question(f"What is the access code for the {city} archive?", f"The access code for the {city} archive is", code))


def word_fact(city: str, word: str) -> tuple[str, Question]:
    return (f"The password of the {city} vault is {word}.",
            Question(f"What is the password of the {city} vault?", f"The password of the {city} vault is", word))


def day_fact(city: str, day: str) -> tuple[str, Question]:
    return (f"The {city} delegation arrives on {day}.",
            Question(f"On which day does the {city} delegation arrive?", f"The {city} delegation arrives on", day))


def insert_facts(doc: str, facts: list[tuple[float, str]]) -> str:
    """Each fact on its own line at its relative depth (by line) of the document."""
    lines = doc.split("\n")
    for depth, fact in sorted(facts, reverse=True):  # deepest first keeps earlier indices valid
        at = int(len(lines) * depth)
        lines[at:at] = ["", fact, ""]
    return "\n".join(lines)


def _doc(tokenizer, tokens: int, rng: random.Random, text: str = "pydoc") -> str:
    from headwise.documents import document_tokens, pydoc_topics

    if text == "stdlib":
        return _stdlib_doc(tokenizer, tokens, rng)
    names = sorted(pydoc_topics())
    start = rng.randrange(len(names))
    return document_tokens(tokenizer, tokens, tuple(names[start:] + names[:start]))


def _stdlib_doc(tokenizer, tokens: int, rng: random.Random) -> str:
    """A document of standard-library docstrings (modules after those kvzap's scorer trains on),
    for tuning on text the benchmark does not own (`--text stdlib`)."""
    from headwise.profiles.texts import MODULES, module_text

    names = MODULES[MODULES.index("doctest") + 1 :]
    start = rng.randrange(len(names))
    parts, ids = [], []
    for name in names[start:] + names[:start]:
        parts.append(module_text(name))
        ids = tokenizer("\n\n".join(parts), add_special_tokens=False).input_ids
        if len(ids) > tokens:
            break
    cut = tokenizer.decode(ids[:tokens])
    return cut[: cut.rfind("\n")] if "\n" in cut else cut


def build_cases(tokenizer, suite: str = "default", length: int = 1500, keyed_length: int = 900, seed: int = 0,
                text: str = "pydoc") -> list[Case]:
    """The benchmark's cases; same tokenizer + arguments -> same cases, byte for byte. `text`
    "stdlib" builds the same kinds of case on standard-library docstrings instead (tuning text)."""
    rng = random.Random(seed)
    big = suite == "full"
    depths = (0.1, 0.3, 0.5, 0.7, 0.9) if big else (0.25, 0.5, 0.75)
    cases = []
    for depth in depths:
        fact, q = code_fact(rng.choice(CITIES), str(rng.randrange(1000, 10000)))
        cases.append(Case(f"single@{depth}", "single", insert_facts(_doc(tokenizer, length, rng, text), [(depth, fact)]), (q,)))
    for i in range(4 if big else 2):
        cities = rng.sample(CITIES, 4)
        facts = [code_fact(c, str(rng.randrange(1000, 10000))) for c in cities]
        doc = insert_facts(_doc(tokenizer, keyed_length, rng, text), [(0.15 + 0.2 * j, f) for j, (f, _) in enumerate(facts)])
        cases.append(Case(f"keyed#{i}", "keyed", doc, (facts[rng.randrange(4)][1],)))
    for i in range(2 if big else 1):
        c = rng.sample(CITIES, 3)
        facts = [code_fact(c[0], str(rng.randrange(1000, 10000))), word_fact(c[1], rng.choice(WORDS)), day_fact(c[2], rng.choice(DAYS))]
        doc = insert_facts(_doc(tokenizer, length, rng, text), [(0.2 + 0.3 * j, f) for j, (f, _) in enumerate(facts)])
        cases.append(Case(f"multi#{i}", "multi", doc, tuple(q for _, q in facts)))
    return cases



def select_cases(cases: list, names: str | None) -> list:
    """The cases named in `names` (comma-separated; None or empty: all), refusing a name the suite lacks."""
    if not names:
        return cases
    wanted = names.split(",")
    unknown = sorted(set(wanted) - {c.name for c in cases})
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; this suite has {[c.name for c in cases]}")
    return [c for c in cases if c.name in wanted]

def is_correct(text: str, answer: str) -> bool:
    return answer.lower() in text.lower()


# ---- the headwise side ------------------------------------------------------------------
def answer(runner, cache, q_ids: list[int], max_new_tokens: int = 10) -> str:
    """Ask one question on top of a (compressed) context cache; the cache is not modified."""
    from headwise.models import SamplingParams

    res = runner.prefill_segment(q_ids, cache)
    toks = list(runner.generate(res.cache, res.logits, SamplingParams(max_new_tokens=max_new_tokens, stop=(".", "\n"))))
    return runner.tokenizer.decode(toks, skip_special_tokens=True).strip()


def make_policy(spec: str, kept: float):
    """`name` or `name:setting=value:...` (e.g. razor:induction=0.2), at the given kept fraction."""
    from headwise.policies import get_policy

    name, *settings = spec.split(":")
    if name == "full":
        return get_policy("full")
    params = {}
    for item in settings:
        key, _, raw = item.partition("=")
        params[key] = json.loads(raw) if raw not in ("", None) and raw[0] in "0123456789-[{tf" else raw
    return get_policy(name, kept=kept, **params)


def precision_variants(configs: list, precisions: list[str]) -> dict:
    """(policy, kept) -> [(result name, row precision)]: fp32 keeps the policy's name, another
    precision is reported as `policy+int8`; the full cache stays fp32 (the reference)."""
    return {(p, k): [((p, k) if x == "fp32" else (f"{p}+{x}", k), x) for x in (["fp32"] if p == "full" else precisions)]
            for p, k in configs}


def run_headwise(runner, cases: list[Case], policies: list[str], kept: list[float], console: Console,
                 precisions: list[str] = ("fp32",)) -> dict:
    from headwise.cache.quant import as_stored
    from headwise.errors import InvalidInput
    from headwise.policies.base import Capture
    from headwise.prompt import build_segments

    configs = [("full", 1.0)] + [(p, k) for p in policies for k in kept]
    built = {(p, k): make_policy(p, k) for p, k in configs}
    capture = Capture()
    for pol in built.values():
        capture = capture.merge(pol.capture)
    # reconstruction passes of other spans (kvzip:span=N beside kvzip): run over the same prefill's states
    passes = {(pol.capture.reconstruction_span, pol.capture.reconstruction_precision)
              for pol in built.values() if pol.capture.reconstruction}
    passes.discard((capture.reconstruction_span, capture.reconstruction_precision))
    needs_profile = [p for p in built.values() if getattr(p, "needs_profile", False)]
    ctx = runner.context(needs_profile[0] if needs_profile else None)  # model id (kvzap's scorer) + profile
    variants = precision_variants(configs, list(precisions))
    rows = {name: {"correct": 0, "total": 0, "realised": [], "compress_s": []} for vs in variants.values() for name, _ in vs}
    details, prefill_s = [], {}
    for ci, case in enumerate(cases):
        segs = [build_segments(runner.tokenizer, case.context, q.text, " " + q.prefix) for q in case.questions]
        ctx_ids = segs[0].context
        if ci == 0:  # time both capture kinds once: the column sums (EMS) cost a second pass
            t = time.perf_counter(); runner.prefill(ctx_ids, capture=Capture(window=capture.window))
            prefill_s["window"] = time.perf_counter() - t
        t = time.perf_counter()
        out = runner.prefill(ctx_ids, capture=capture)
        if ci == 0:
            prefill_s["column_sums" if capture.column_sums else "window"] = time.perf_counter() - t
        by_pass = {(capture.reconstruction_span, capture.reconstruction_precision): out.states}
        for span, precision in sorted(passes):
            got = runner.reconstruction_scores(ctx_ids, None, out.states, out.start, span, precision)
            by_pass[span, precision] = [replace(st, reconstruction=x) for st, x in zip(out.states, got, strict=True)]
        for cfg, pol in built.items():
            t = time.perf_counter()
            try:
                cap = pol.capture
                states = by_pass[cap.reconstruction_span, cap.reconstruction_precision] if cap.reconstruction else out.states
                seg = pol.compress(states, out.start, ctx)
            except InvalidInput as e:  # e.g. pod below its reachable range: reported, not fatal
                for name, _ in variants[cfg]:
                    rows[name]["error"] = str(e)
                continue
            spent = time.perf_counter() - t
            for name, precision in variants[cfg]:
                stored = seg if precision == "fp32" else as_stored(seg, precision)  # the rows decode gets back
                rows[name]["compress_s"].append(spent)
                rows[name]["realised"].append(seg.kept_fraction())
                for q, s in zip(case.questions, segs, strict=True):
                    text = answer(runner, stored, s.question)
                    ok = is_correct(text, q.answer)
                    rows[name]["correct"] += ok; rows[name]["total"] += 1
                    details.append({"case": case.name, "tokens": len(ctx_ids), "policy": name[0], "kept": cfg[1],
                                    "precision": precision, "question": q.text, "answer": q.answer, "output": text,
                                    "correct": ok})
        done = ", ".join(f"{p}@{k}:{r['correct']}/{r['total']}" for (p, k), r in rows.items() if p in ("full", "razor"))
        console.print(f"[dim]{case.name} ({len(ctx_ids)} tokens) done: {done}[/dim]")
        del out
    return _summarise(rows, built, prefill_s, details)


QUERY_AWARE_POLICIES = ("snapkv", "adakv", "ahakv", "taskkv", "ems", "pod")


def run_query_aware(runner, cases: list[Case], policies: list[str], kept: list[float], console: Console) -> dict:
    """Query-aware regime: per question, one prefill of document + question (the question's queries
    captured as the window); each policy compresses the document rows of that same prefill and the
    answer is decoded from the compressed document + the exact question rows."""
    from headwise.errors import InvalidInput
    from headwise.models import SamplingParams
    from headwise.models.query_aware import compress_prefilled, document_reconstruction, supports_query_aware
    from headwise.policies.base import Capture
    from headwise.prompt import build_segments

    configs = [("full", 1.0)] + [(p, k) for p in policies for k in kept]
    built = {(p, k): make_policy(p, k) for p, k in configs}
    skipped = sorted({p for (p, k), pol in built.items() if p != "full" and not supports_query_aware(pol)})
    if skipped:
        console.print(f"[yellow]no query-aware form (no observation window), skipped: {', '.join(skipped)}[/yellow]")
    built = {c: pol for c, pol in built.items() if c[0] == "full" or c[0] not in skipped}
    column_sums = any(pol.query_aware_form().capture.column_sums for pol in built.values())
    rec_capture = next((pol.query_aware_form().capture for pol in built.values() if pol.query_aware_form().capture.reconstruction), None)
    ctx = runner.context(next((p for p in built.values() if getattr(p, "needs_profile", False)), None))
    rows = {c: {"correct": 0, "total": 0, "realised": [], "compress_s": []} for c in built}
    details, prefill_s = [], {}
    params = SamplingParams(max_new_tokens=10, stop=(".", "\n"))
    for case in cases:
        rec = None  # the document's reconstruction scores (signal window+kvzip): once per case, question-independent
        for q in case.questions:
            s = build_segments(runner.tokenizer, case.context, q.text, " " + q.prefix)
            t = time.perf_counter()
            out = runner.prefill(s.context + s.question, capture=Capture(window=len(s.question), column_sums=column_sums))
            prefill_s.setdefault("window", time.perf_counter() - t)
            prefill_s.setdefault("column_sums", prefill_s["window"])
            if rec_capture is not None and rec is None:
                t = time.perf_counter()
                rec = document_reconstruction(runner, out, s.context, rec_capture)
                prefill_s.setdefault("reconstruction", time.perf_counter() - t)
            for cfg, pol in built.items():
                t = time.perf_counter()
                try:
                    res = compress_prefilled(out, len(s.context), pol, ctx, rec)
                except InvalidInput as e:  # e.g. pod below its reachable range: reported, not fatal
                    rows[cfg]["error"] = str(e)
                    continue
                rows[cfg]["compress_s"].append(time.perf_counter() - t)
                rows[cfg]["realised"].append(res.document.kept_fraction())
                toks = list(runner.generate(res.cache, res.logits, params))
                text = runner.tokenizer.decode(toks, skip_special_tokens=True).strip()
                ok = is_correct(text, q.answer)
                rows[cfg]["correct"] += ok; rows[cfg]["total"] += 1
                details.append({"case": case.name, "tokens": len(s.context), "policy": cfg[0], "kept": cfg[1],
                                "question": q.text, "answer": q.answer, "output": text, "correct": ok})
                console.print(f"[dim]  {case.name} {q.answer!r} {cfg[0]}@{cfg[1]}: {text[:16]!r} {'ok' if ok else 'miss'}[/dim]")
            del out
        done = ", ".join(f"{p}@{k}:{r['correct']}/{r['total']}" for (p, k), r in rows.items() if p in ("full", "snapkv"))
        console.print(f"[dim]{case.name} done: {done}[/dim]")
    res = _summarise(rows, built, prefill_s, details)
    res["regime"], res["skipped"] = "query-aware", skipped
    return res


def _summarise(rows: dict, built: dict, prefill_s: dict, details: list) -> dict:
    res = {"full": None, "policies": {}, "prefill_s": prefill_s, "details": details}
    for (p, k), r in rows.items():
        if not r["total"] and r.get("error"):
            res["policies"].setdefault(p, {})[str(k)] = {"accuracy": None, "realised": None, "error": r["error"]}
            continue
        acc = r["correct"] / r["total"] if r["total"] else 0.0
        pol = built.get((p, k)) or built[(p.rsplit("+", 1)[0], k)]  # `policy+int8`: a precision variant's policy
        cap = "column_sums" if pol.capture.column_sums else "window"
        entry = {"accuracy": acc, "realised": sum(r["realised"]) / len(r["realised"]),
                 "prefill_s": prefill_s.get(cap, prefill_s.get("window", 0.0)) + sum(r["compress_s"]) / len(r["compress_s"]),
                 "correct": r["correct"], "total": r["total"]}
        if p == "full":
            res["full"] = acc
            res["full_detail"] = entry
        else:
            res["policies"].setdefault(p, {})[str(k)] = entry
    return res


def calibrate(runner, lengths: list[int], depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> list[dict]:
    """Full-cache accuracy of the single-fact case against context length (the usable range)."""
    from headwise.prompt import build_segments

    rng = random.Random(seed)
    curve = []
    for n in lengths:
        ok = 0
        for d in depths:
            fact, q = code_fact(rng.choice(CITIES), str(rng.randrange(1000, 10000)))
            seg = build_segments(runner.tokenizer, insert_facts(_doc(runner.tokenizer, n, rng), [(d, fact)]), q.text, " " + q.prefix)
            res = runner.prefill_segment(seg.context)
            ok += is_correct(answer(runner, res.cache, seg.question), q.answer)
        curve.append({"tokens": n, "accuracy": ok / len(depths), "cases": len(depths)})
    return curve


def prefill_cost(runner, tokens: int = 2000, rounds: int = 5, kept: float = 0.25,
                 policies: tuple[str, ...] = ("full", "kvzap", "kvzip")) -> dict:
    """Wall time of prefill + compression of one context segment per policy, interleaved round by round.

    Each policy's own capture only (what the service runs). Ratios to `full` per round (paired),
    then median and range over rounds.
    """
    import statistics

    from headwise.documents import document_tokens
    from headwise.prompt import build_segments

    ids = build_segments(runner.tokenizer, document_tokens(runner.tokenizer, tokens), "").context
    built = {p: make_policy(p, kept) for p in policies}
    ctx = runner.context()
    runner.prefill_segment(ids[:256], policy=built["full"], ctx=ctx)  # warm-up
    times: dict[str, list[float]] = {p: [] for p in policies}
    cpu: dict[str, list[float]] = {p: [] for p in policies}
    for _ in range(rounds):
        for p, pol in built.items():
            t, c = time.perf_counter(), time.process_time()
            runner.prefill_segment(ids, policy=pol, ctx=ctx)
            times[p].append(time.perf_counter() - t)
            cpu[p].append(time.process_time() - c)
    out = {"tokens": len(ids), "kept": kept, "rounds": rounds, "by_policy": {}}
    for p in policies:
        ratios = [a / b for a, b in zip(times[p], times["full"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu[p], cpu["full"], strict=True)]
        out["by_policy"][p] = {"median_s": statistics.median(times[p]), "min_s": min(times[p]), "max_s": max(times[p]),
                               "seconds": times[p], "ratio_to_full_median": statistics.median(ratios),
                               "ratio_to_full_range": [min(ratios), max(ratios)],
                               # CPU seconds of this process: on a shared machine, what the call cost, not what it waited
                               "cpu_s": cpu[p], "cpu_median_s": statistics.median(cpu[p]),
                               "cpu_ratio_to_full_median": statistics.median(cpu_ratios),
                               "cpu_ratio_to_full_range": [min(cpu_ratios), max(cpu_ratios)]}
    return out


def print_cost(console: Console, cost: dict) -> None:
    t = Table(title=f"prefill + compression of {cost['tokens']} tokens at kept {cost['kept']} ({cost['rounds']} interleaved rounds)")
    for col in ("policy", "wall median s", "wall range s", "wall x full (median, range)", "CPU median s", "CPU x full (median, range)"):
        t.add_column(col, justify="right")
    for p, e in cost["by_policy"].items():
        lo, hi = e["ratio_to_full_range"]
        clo, chi = e["cpu_ratio_to_full_range"]
        t.add_row(p, f"{e['median_s']:.2f}", f"{e['min_s']:.2f}-{e['max_s']:.2f}", f"{e['ratio_to_full_median']:.3f} ({lo:.3f}-{hi:.3f})",
                  f"{e['cpu_median_s']:.2f}", f"{e['cpu_ratio_to_full_median']:.3f} ({clo:.3f}-{chi:.3f})")
    console.print(t)


# ---- output -----------------------------------------------------------------------------
def print_table(console: Console, res: dict, title: str, kept: list[float]) -> None:
    t = Table(title=title)
    t.add_column("method")
    for k in kept:
        t.add_column(f"kept {k}: acc / realised / prefill s", justify="right")
    if res.get("full") is not None:
        f = res.get("full_detail", {})
        t.add_row("full", *[f"{res['full']:.2f} / 1.000 / {f.get('prefill_s', 0):.1f}"] * len(kept))
    for name, by_k in res.get("policies", {}).items():
        cells = []
        for k in kept:
            e = by_k.get(str(k))
            if e and e.get("error"):
                cells.append("out of range")
                continue
            cells.append(f"{e['accuracy']:.2f} / {e['realised']:.3f} / {e.get('prefill_s', 0):.1f}" if e else "-")
        t.add_row(name, *cells)
    console.print(t)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # the `bench` extra is not installed: the table and JSON are the result
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    points = 0
    for name, by_k in res["policies"].items():
        ks = sorted((k for k in by_k if by_k[k]["accuracy"] is not None), key=float)
        ax.plot([float(k) for k in ks], [by_k[k]["accuracy"] for k in ks], marker="o", label=name)
        points += len(ks)
    if not points:  # every requested point was out of range: nothing to draw on a log axis
        plt.close(fig)
        return
    for name, by_k in res.get("kvpress", {}).get("policies", {}).items():
        ks = sorted(by_k, key=float)
        ax.plot([float(k) for k in ks], [by_k[k]["accuracy"] for k in ks], marker="x", ls="--", alpha=0.6, label=f"kvpress {name}")
    if res.get("full") is not None:
        ax.axhline(res["full"], color="k", ls=":", label="full cache")
    ax.set_xscale("log"); ax.set_xlabel("kept fraction of the context"); ax.set_ylabel("accuracy")
    ax.set_title("headwise quality: accuracy vs kept fraction (SmolLM2-135M-Instruct)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5)); fig.tight_layout(); fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/quality.json"))
    ap.add_argument("--policies", default=None, help=f"default: {','.join(DEFAULT_POLICIES)}; "
                    f"with --regime query-aware: {','.join(QUERY_AWARE_POLICIES)}")
    ap.add_argument("--regime", choices=("reuse", "query-aware"), default="reuse",
                    help="reuse: the document compressed before the question (the service's default); "
                         "query-aware: the question's queries are the window (one-shot, private caches)")
    ap.add_argument("--kept", default=",".join(map(str, DEFAULT_KEPT)))
    ap.add_argument("--suite", choices=("default", "full"), default="default", help="full: more depths and cases (about 2x)")
    ap.add_argument("--text", choices=("pydoc", "stdlib"), default="pydoc",
                    help="stdlib: the same cases on standard-library docstrings, text for tuning that the reported suites do not use")
    ap.add_argument("--cases", default=None, help="only these case names (comma-separated, e.g. single@0.1,keyed#0): "
                    "one suite split over several processes")
    ap.add_argument("--length", type=int, default=1500, help="context tokens of single/multi cases")
    ap.add_argument("--keyed-length", type=int, default=900, help="context tokens of keyed cases")
    ap.add_argument("--model", default=None)
    ap.add_argument("--kvpress-json", type=Path, default=None, help="merge the anchor's results (bench.kvpress_anchor)")
    ap.add_argument("--calibrate", action="store_true", help="only the full-cache accuracy curve against context length")
    ap.add_argument("--lengths", default="500,1000,1500,2000,3000,4000")
    ap.add_argument("--cost", action="store_true", help="only the prefill time of full / kvzap / kvzip, interleaved")
    ap.add_argument("--cost-tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cost-policies", default="full,kvzap,kvzip", help="with --cost; the first must be full")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (1 is much faster on a shared, busy CPU)")
    ap.add_argument("--precisions", default="fp32", help="row precisions of the compressed cache, e.g. fp32,int8 "
                    "(each but fp32 reported as policy+precision: the rows as the store gives them back)")
    args = ap.parse_args(argv)
    console = Console()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from headwise.models import ModelRunner, resolve_model_path

    runner = ModelRunner.from_pretrained(resolve_model_path(args.model))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    if args.calibrate:
        curve = calibrate(runner, [int(x) for x in args.lengths.split(",")])
        for row in curve:
            console.print(f"{row['tokens']:6d} tokens: full-cache accuracy {row['accuracy']:.2f} ({row['cases']} depths)")
        args.json.write_text(json.dumps({"calibration": curve}, indent=1))
        return {"calibration": curve}
    if args.cost:
        cost = prefill_cost(runner, args.cost_tokens, args.rounds, policies=tuple(args.cost_policies.split(",")))
        print_cost(console, cost)
        args.json.write_text(json.dumps({"prefill_cost": cost}, indent=1))
        return {"prefill_cost": cost}
    kept = [float(x) for x in args.kept.split(",")]
    qa = args.regime == "query-aware"
    policies = [p for p in (args.policies or ",".join(QUERY_AWARE_POLICIES if qa else DEFAULT_POLICIES)).split(",") if p]
    cases = build_cases(runner.tokenizer, args.suite, args.length, args.keyed_length, text=args.text)
    cases = select_cases(cases, args.cases)
    console.print(f"{len(cases)} cases, {sum(len(c.questions) for c in cases)} questions; policies {policies}; kept {kept}")
    t0 = time.perf_counter()
    precisions = [p for p in args.precisions.split(",") if p]
    # query-aware caches are never stored, so they keep the computed rows: --precisions does not apply
    res = run_query_aware(runner, cases, policies, kept, console) if qa else run_headwise(runner, cases, policies, kept, console, precisions)
    res["seconds"] = time.perf_counter() - t0
    res.setdefault("regime", args.regime)
    res["text"] = args.text
    res["cases"] = [asdict(c) | {"context": c.context[:80] + "..."} for c in cases]
    print_table(console, res, f"headwise, {args.regime} regime (full cache accuracy {res['full']:.2f})", kept)
    for name, by_k in res["policies"].items():
        for k, e in by_k.items():
            if e.get("error"):
                console.print(f"[yellow]{name} at kept {k}: {e['error']}[/yellow]")
    if args.kvpress_json and args.kvpress_json.is_file():
        res["kvpress"] = json.loads(args.kvpress_json.read_text())
        print_table(console, res["kvpress"], "kvpress anchor (same cases; masked, full-size tensors)", kept)
    args.json.write_text(json.dumps(res, indent=1))
    plot(res, args.json.with_suffix(".png"))
    png = args.json.with_suffix(".png")
    console.print(f"wrote {args.json}{f' and {png}' if png.is_file() else ''} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
