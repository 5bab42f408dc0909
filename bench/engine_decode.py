"""Decode-only engine timing, interleaved step by step: the decode ratios of bench.engine, with less noise.

    python -m bench.engine_decode --caches /tmp/engine-caches --json bench/results/engine_decode.json

On a shared machine one kind's decode rounds range up to 1.6x within one process, in CPU time as
in wall time (other processes share the memory bandwidth and the last-level cache), so ratios of
rounds that ran seconds apart carry that noise. Here every cache kind is prefilled once (or
loaded from `--caches`, where the prefilled caches are saved on the first run) and kept with its
attention views, and the kinds then take turns step by step:

- one stream: each round is one decode step of every kind, in an order rotated per round; the
  ratio of a kind to `full` is taken within each round (steps a fraction of a second apart), and
  the median over rounds is reported with its quartiles;
- `--streams` streams: the full cache and one other kind alternate step by step (`--pair-steps`
  steps each), for every kind in turn, `--rounds` times; the B streams of a kind share the held
  rows (decode only reads them; the views hold each stream's own copy of its pages, which is
  what a step reads) and each has its own decode tail.

Every `--reset` steps the tails are dropped (fresh copies of the prefilled caches and one untimed
step), so no timed step rebuilds its views when a tail outgrows their capacity. Steps are timed in
wall and process CPU seconds. Each kind also reports what a step reads: held rows per stream and
the slots of the pages it touches (values, and keys: PoD's distant pages hold none).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from bench import write_json
from headwise.attention_paged import DecodeViews
from headwise.cache.compact import CompactCache
from headwise.documents import document_tokens
from headwise.models import ModelRunner, resolve_model_path
from headwise.policies import get_policy

POLICIES = ["full", "streaming", "kvzip", "razor", "adakv", "ems", "pod"]


def prefilled(runner: ModelRunner, names: list[str], tokens: int, kept: float, where: Path | None) -> dict:
    """{name: (cache, logits)}: loaded from `where` when saved there before, else prefilled (and saved)."""
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    out = {}
    for name in names:
        path = where / f"{name}-{tokens}-{kept}.pt" if where is not None else None
        if path is not None and path.exists():
            saved = torch.load(path, weights_only=False)
        else:
            policy = get_policy(name, kept=kept)
            res = runner.prefill_segment(ids, policy=policy, ctx=runner.context(policy))
            saved = {"cache": res.cache, "logits": res.logits, "ids": ids}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(saved, path)
        if saved.get("ids") is not None and saved["ids"] != ids:
            raise SystemExit(f"{path} holds another document; remove it")
        out[name] = (saved["cache"], saved["logits"])
    return out


def streams_of(cache: CompactCache, B: int) -> list[CompactCache]:
    """B caches sharing `cache`'s held rows (decode writes only tails, which each gets its own)."""
    return [CompactCache([dataclasses.replace(lc) for lc in cache.layers], cache.seq_len, cache.start, dict(cache.meta))
            for _ in range(B)]


class Kind:
    """One cache kind's B streams, their decode views and next tokens, stepped on demand."""

    def __init__(self, runner: ModelRunner, cache: CompactCache, logits: Tensor, B: int):
        self.runner, self.base, self.logits, self.B = runner, cache, logits, B
        self.reset()

    def reset(self) -> None:
        self.caches = streams_of(self.base, self.B)
        self.tokens = self.logits.expand(self.B, -1).argmax(-1).tolist()
        self.views: DecodeViews | None = None
        self.steps = 0
        self.step()  # untimed: builds the views

    def step(self) -> tuple[float, float]:
        r = self.runner
        r._views = self.views
        t, c = time.perf_counter(), time.process_time()
        out = r.decode_batch(self.tokens, self.caches)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        self.tokens = out.argmax(-1).tolist()
        self.views, r._views = r._views, None
        self.steps += 1
        return wall, cpu

    def reads(self) -> dict:
        """Held rows per stream and page slots a step reads now (per stream, all layers): value
        slots, key slots (PoD's distant pages hold none) and their bytes."""
        v = self.views
        C = v.views[0].keys.shape[-1]
        slots = sum(x.active(v.steps) for x in v.views) * C
        key_slots = sum(x.active(v.steps) - x.nd for x in v.views) * C
        row = v.views[0].values.shape[-1] * v.views[0].values.element_size()  # bytes of one key or value row
        held = sum(lc.num_rows for lc in self.base.layers)
        held_keys = sum(lc.num_key_rows for lc in self.base.layers)
        return {"held_rows": held, "held_key_rows": held_keys, "slots_read": slots / self.B,
                "key_slots_read": key_slots / self.B, "slots_per_held_row": slots / self.B / held,
                "kv_mb_read": (slots + key_slots) * row / self.B / 1e6}

    def drop(self) -> None:
        self.caches, self.views = [], None



class HFKind:
    """transformers' own forward and DynamicCache (the floor) as a kind that steps on demand: B
    copies of the prefilled sequence. state: (past DynamicCache, last logits [1, V], position)."""

    def __init__(self, runner: ModelRunner, state: tuple, B: int):
        self.runner, self.state, self.B = runner, state, B
        self.reset()

    def reset(self) -> None:
        from transformers import DynamicCache

        past, logits, pos = self.state
        self.cache = DynamicCache()
        for i, layer in enumerate(past.layers):
            self.cache.update(layer.keys.expand(self.B, -1, -1, -1).clone(), layer.values.expand(self.B, -1, -1, -1).clone(), i)
        self.next = logits.reshape(1, -1).argmax(-1).expand(self.B, 1).contiguous()
        self.pos, self.steps = pos, 0
        self.step()  # untimed, as the engine's first step

    def step(self) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        o = self.runner.model(self.next, cache=self.cache, use_cache=True, cache_position=torch.tensor([self.pos]))
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        self.next, self.pos = o.logits[:, -1:].argmax(-1), self.pos + 1
        self.steps += 1
        return wall, cpu

    def reads(self) -> dict:
        return {}

    def drop(self) -> None:
        self.cache = None


def _stat(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": xs[0], "max": xs[-1], "n": len(xs)}


def _maker(runner, states):
    """A kind of B streams per name: HFKind for a transformers state (3-tuple), else Kind."""
    return lambda n, B: HFKind(runner, states[n], B) if len(states[n]) == 3 else Kind(runner, *states[n], B)


def one_stream(runner, states, names, rounds, reset) -> dict:
    make = _maker(runner, states)
    kinds = {n: make(n, 1) for n in names}
    per = {n: [] for n in names}
    for r in range(rounds):
        if r and r % reset == 0:
            for k in kinds.values():
                k.reset()
        k0 = r % len(names)
        for n in names[k0:] + names[:k0]:
            per[n].append(kinds[n].step())
    reads = {n: k.reads() for n, k in kinds.items()}
    for k in kinds.values():
        k.drop()
    return _summary(per, names, reads, 1)


def many_streams(runner, states, names, B, rounds, pair_steps, reset) -> dict:
    make = _maker(runner, states)
    full = make("full", B)
    per = {n: [] for n in names}
    pairs = {n: [] for n in names}  # (full's step, the kind's step) adjacent
    reads = {"full": full.reads()}
    for n in names[1:]:
        kind = make(n, B)
        reads[n] = kind.reads()
        for r in range(rounds):
            for s in range(pair_steps):
                for k in (full, kind):
                    if k.steps >= reset:
                        k.reset()
                a, b = (full, kind) if (r + s) % 2 == 0 else (kind, full)
                ta, tb = a.step(), b.step()
                tf, tk = (ta, tb) if a is full else (tb, ta)
                per["full"].append(tf)
                per[n].append(tk)
                pairs[n].append((tf, tk))
        kind.drop()
    full.drop()
    out = _summary(per, names, reads, B)
    for n in names[1:]:  # ratios of adjacent steps, not of the pooled medians
        out[n]["x_full"] = _stat([f[0] / k[0] for f, k in pairs[n]])
        out[n]["x_full_cpu"] = _stat([f[1] / k[1] for f, k in pairs[n]])
    out["full"]["x_full"] = out["full"]["x_full_cpu"] = _stat([1.0])
    return out


def _summary(per, names, reads, B) -> dict:
    out = {}
    for n in names:
        w, c = [x[0] for x in per[n]], [x[1] for x in per[n]]
        out[n] = {"step_ms": _stat([x * 1e3 for x in w]), "step_cpu_ms": _stat([x * 1e3 for x in c]),
                  "tok_s": B / statistics.median(w), "cpu_tok_s": B / statistics.median(c), **reads[n]}
    if B == 1:  # rounds: every kind stepped once, one after the other
        for n in names:
            out[n]["x_full"] = _stat([f[0] / k[0] for f, k in zip(per["full"], per[n], strict=True)])
            out[n]["x_full_cpu"] = _stat([f[1] / k[1] for f, k in zip(per["full"], per[n], strict=True)])
            if "streaming" in per:
                out[n]["x_streaming_cpu"] = _stat([s[1] / k[1] for s, k in zip(per["streaming"], per[n], strict=True)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--caches", type=Path, default=None, help="directory to save the prefilled caches to / load them from")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--rounds", type=int, default=60, help="one-stream rounds (one step of every kind each)")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-rounds", type=int, default=2, help="rounds of the many-stream pairs (0: skip)")
    ap.add_argument("--pair-steps", type=int, default=4, help="steps of each kind per pair and round")
    ap.add_argument("--reset", type=int, default=30, help="fresh tails after this many steps (< 63: no view rebuild)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = ["full", *[p for p in a.policies.split(",") if p and p != "full"]]
    runner = ModelRunner.from_pretrained(resolve_model_path(a.model))
    with torch.inference_mode():
        states = prefilled(runner, names, a.tokens, a.kept, a.caches)
        load = [os.getloadavg()[0]]
        t0 = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        res = {"one_stream": one_stream(runner, states, names, a.rounds, a.reset)}
        load.append(os.getloadavg()[0])
        if a.stream_rounds:
            res[f"{a.streams}_streams"] = many_streams(runner, states, names, a.streams, a.stream_rounds, a.pair_steps, a.reset)
            load.append(os.getloadavg()[0])
    res.update({"started_utc": t0, "ended_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                "load_average_1min": load, "tokens": a.tokens, "kept": a.kept, "threads": a.threads, "rounds": a.rounds,
                "streams": a.streams, "stream_rounds": a.stream_rounds, "pair_steps": a.pair_steps})
    for key in ["one_stream", f"{a.streams}_streams"][: 2 if a.stream_rounds else 1]:
        print(f"== {key} (load {min(load):.1f}-{max(load):.1f})")
        for n, f in res[key].items():
            x, xc = f["x_full"], f["x_full_cpu"]
            xs = f.get("x_streaming_cpu")
            print(f"{n:10s} step {f['step_ms']['median']:7.1f} ms (cpu {f['step_cpu_ms']['median']:7.1f}) {f['tok_s']:6.2f} tok/s"
                  f"  x full {x['median']:.3f} [{x['q1']:.3f}, {x['q3']:.3f}] cpu {xc['median']:.3f} [{xc['q1']:.3f}, {xc['q3']:.3f}]"
                  + (f"  x streaming cpu {xs['median']:.3f}" if xs else "")
                  + (f"  slots/held row {f['slots_per_held_row']:.3f}, K/V {f['kv_mb_read']:.1f} MB/stream" if "slots_per_held_row" in f else ""))
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
