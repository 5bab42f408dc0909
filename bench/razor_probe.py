"""RazorAttention examined: which heads retrieve a needle, against the heads the profile protects,
and `razor` ablations on bench.quality's cases (reuse regime).

    python -m bench.razor_probe --json bench/results/razor_probe.json [--probes 8] [--kept 0.5,0.25] [--skip-quality]

1. Needle probe, on text bench.quality does not use (pydoc renderings of stdlib modules, not the
   pydoc topics): a "secret number" fact at several depths, the question asked with the full
   cache; where the model answers right, the answer is teacher-forced and, for every answer token,
   each query head's top-1 attention is checked against the needle token being copied (the
   retrieval score of Wu et al., "Retrieval Head Mechanistically Explains Long-Context
   Factuality"); a KV head's score is the max over its GQA group. Reported: the overlap of the
   top heads by this score with RazorAttention's protected heads from the random-token probe.
2. Ablations through bench.quality.run_headwise (same cases, paired), every one with the other
   heads' fill of `--fill` (default `recent`, the paper's split): `razor` as is; with the
   compensation row dropped (`compensation=none`); with the protected heads taken from the needle
   probe instead (same count, `echo=0`); and both.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import quality, write_json

PROBE_MODULES = ("argparse", "collections", "json", "logging", "email.message", "unittest", "typing", "re",
                 "datetime", "decimal", "functools", "itertools", "pathlib", "subprocess", "threading", "sqlite3",
                 "tarfile", "zipfile", "csv", "pickle", "shutil", "tempfile", "textwrap", "statistics", "heapq")
CITIES = ("Zurich", "Nairobi", "Osaka", "Bergen", "Cusco", "Tunis", "Porto", "Riga")


def probe_document(tokenizer, tokens: int, rng: random.Random) -> str:
    """About `tokens` tokens of stdlib module documentation as pydoc renders it (plain text)."""
    import importlib
    import pydoc

    names = list(PROBE_MODULES)
    rng.shuffle(names)
    text = ""
    for name in names:
        text += pydoc.plain(pydoc.render_doc(importlib.import_module(name), renderer=pydoc.plaintext)) + "\n\n"
        if len(tokenizer(text, add_special_tokens=False).input_ids) > tokens:
            break
    ids = tokenizer(text, add_special_tokens=False).input_ids[:tokens]
    cut = tokenizer.decode(ids)
    return cut[: cut.rfind("\n")]


def distinct_code(rng: random.Random) -> str:
    return "".join(rng.sample("123456789", 4))  # distinct digits: each copied token has one source


@dataclass(frozen=True)
class Probe:
    context: list[int]
    question: list[int]
    answer: list[int]
    sources: list[int]  # position in context of the needle token each answer token copies


def build_probes(runner, n: int, length: int, seed: int = 1) -> tuple[list[Probe], int]:
    """Probes the full cache answers right (teacher forcing then follows the model's own answer)."""
    from headwise.prompt import build_segments

    rng, tok, out, asked = random.Random(seed), runner.tokenizer, [], 0
    for i in range(n):
        city, code = rng.choice(CITIES), distinct_code(rng)
        fact = f"The secret number of the {city} office is {code}."
        doc = quality.insert_facts(probe_document(tok, length, rng), [((i + 0.5) / n, fact)])
        prefix = f"The secret number of the {city} office is"
        seg = build_segments(tok, doc, f"What is the secret number of the {city} office?", " " + prefix)
        asked += 1
        res = runner.prefill_segment(seg.question, runner.prefill_segment(seg.context).cache)
        from headwise.models import SamplingParams

        toks = list(runner.generate(res.cache, res.logits, SamplingParams(max_new_tokens=8, stop=(".",))))
        if code not in tok.decode(toks, skip_special_tokens=True):
            continue
        digit = [tok.decode([t]).strip().isdigit() for t in toks]
        last = max(i for i, d in enumerate(digit) if d)
        answer = toks[: last + 1]
        run = [t for t, d in zip(answer, digit[: last + 1], strict=True) if d]  # the code's tokens, in order
        ctx = seg.context
        at = next((j for j in range(len(ctx) - len(run) + 1) if ctx[j : j + len(run)] == run), None)
        if at is None:  # the code tokenised differently inside the document
            continue
        k, sources = 0, []
        for d in digit[: last + 1]:
            sources.append(at + k if d else -1)
            k += d
        out.append(Probe(ctx, seg.question, answer, sources))
    return out, asked


def retrieval_scores(runner, probes: list[Probe]):
    """[L, Hkv] fraction of copied answer tokens whose source is some query head's top-1 attention
    (max over the GQA group), and [L, Hkv] mean attention mass on the needle's source tokens."""
    import torch

    from headwise.attention import window_probs
    from headwise.policies.base import Capture

    L, Hkv = runner.num_layers, runner.num_kv_heads
    hits, mass, n = torch.zeros(L, Hkv), torch.zeros(L, Hkv), 0
    for p in probes:
        ids = p.context + p.question + p.answer[:-1]
        A = len(p.answer)  # the query predicting answer token i is the i-th of the last A
        out = runner.prefill(ids, capture=Capture(window=A))
        rows = [i for i, s in enumerate(p.sources) if s >= 0]
        src = torch.tensor([p.sources[i] for i in rows])
        for li, st in enumerate(out.states):
            P = window_probs(st.window_queries, st.keys, st.scaling)[:, rows]  # [Hq, a, N]
            top = (P.argmax(-1) == src[None]).float()  # [Hq, a]
            m = P.gather(-1, src[None, :, None].expand(P.shape[0], -1, 1))[..., 0]  # [Hq, a]
            G = P.shape[0] // Hkv
            hits[li] += top.view(Hkv, G, -1).amax(1).sum(-1)
            mass[li] += m.view(Hkv, G, -1).amax(1).sum(-1)
        n += len(rows)
    return hits / max(1, n), mass / max(1, n), n


@dataclass(frozen=True)
class WithProfile:
    """A policy run with another head profile (the needle probe's), everything else unchanged."""

    inner: object
    profile: object
    needs_profile = True

    @property
    def capture(self):
        return self.inner.capture

    def params(self):
        return self.inner.params() | {"heads": "needle"}

    def compress(self, states, start, ctx=None):
        return self.inner.compress(states, start, dataclasses.replace(ctx, profile=self.profile))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=Path("bench/results/razor_probe.json"))
    ap.add_argument("--probes", type=int, default=8)
    ap.add_argument("--length", type=int, default=1500)
    ap.add_argument("--kept", default="0.5,0.25")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--fill", choices=("recent", "kvzip", "snapkv"), default="recent",
                    help="the other heads' fill in every ablation: recent = the paper's split (the table in "
                         "docs/policies.md), kvzip = razor's default")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from headwise.models import ModelRunner, resolve_model_path
    from headwise.profiles import HeadProfile

    console, t0 = Console(), time.perf_counter()
    runner = ModelRunner.from_pretrained(resolve_model_path(None))
    profile = runner.context(quality.make_policy("razor", 0.5)).profile
    protected = profile.retrieval_order(0.14, 0.01)
    probes, asked = build_probes(runner, args.probes, args.length)
    hit, mass, copied = retrieval_scores(runner, probes)
    flat = hit.flatten() + 1e-6 * mass.flatten()  # ties in top-1 hits broken by attention mass
    order = [(int(i) // runner.num_kv_heads, int(i) % runner.num_kv_heads) for i in flat.argsort(descending=True)]
    top = order[: len(protected)]
    rank = {lh: r for r, lh in enumerate(order)}
    res = {"probes_answered": len(probes), "probes_asked": asked, "copied_tokens": copied,
           "protected": protected, "needle_top": top, "overlap": len(set(top) & set(protected)),
           "protected_needle_ranks": [rank[lh] for lh in protected],
           "protected_hit": [float(hit[lh]) for lh in protected], "needle_top_hit": [float(hit[lh]) for lh in top],
           "hit": hit.tolist(), "mass": mass.tolist()}
    t = Table(title=f"needle probe: {len(probes)}/{asked} answered by the full cache, {copied} copied tokens")
    for col in ("", "heads (layer, KV head)", "retrieval score (top-1 hit rate)"):
        t.add_column(col)
    t.add_row("razor protected", " ".join(map(str, protected)), " ".join(f"{x:.2f}" for x in res["protected_hit"]))
    t.add_row("needle top", " ".join(map(str, top)), " ".join(f"{x:.2f}" for x in res["needle_top_hit"]))
    console.print(t)
    console.print(f"overlap {res['overlap']} of {len(protected)}; needle ranks of the protected heads: {res['protected_needle_ranks']}")
    if not args.skip_quality:
        n = runner.num_layers * runner.num_kv_heads
        needle = HeadProfile(profile.model_id, profile.num_layers, profile.num_kv_heads,
                             [[0.0] * runner.num_kv_heads for _ in range(runner.num_layers)], hit.tolist(), profile.base_of)
        ratio = len(protected) / n + 1e-9
        r = f"razor:fill={args.fill}"
        specs = {r: None, f"{r}:compensation=none": None,
                 f"{r}:echo=0:induction={ratio}": needle, f"{r}:echo=0:induction={ratio}:compensation=none": needle}
        real = quality.make_policy

        def make(spec: str, kept: float):
            name, _, prof = spec.partition("@")
            pol = real(name, kept)
            return WithProfile(pol, needle) if prof == "needle" else pol

        quality.make_policy = make
        try:
            policies = [s + ("@needle" if p is not None else "") for s, p in specs.items()]
            kept = [float(x) for x in args.kept.split(",")]
            cases = quality.build_cases(runner.tokenizer)
            q = quality.run_headwise(runner, cases, policies, kept, console)
        finally:
            quality.make_policy = real
        q.pop("details", None)
        res["quality"] = q
        quality.print_table(console, q, f"razor ablations, reuse regime (full {q['full']:.2f})", kept)
    res["seconds"] = time.perf_counter() - t0
    write_json(args.json, res, indent=1)
    console.print(f"wrote {args.json} in {res['seconds']:.0f} s")
    return res


if __name__ == "__main__":
    main()
