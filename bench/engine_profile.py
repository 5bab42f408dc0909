"""Where a one-stream decode step's time goes: torch.profiler over decode steps on a compressed cache.

    python -m bench.engine_profile --json bench/results/engine_profile.json

Prefills a real document (2,000 tokens) under a policy (kvzip at kept 0.25 by default), then
times decode steps twice: without the profiler (the wall time per step) and under it. Every
aten op's self CPU time is summed by kind: matmuls (mm/addmm/bmm/baddbmm), reductions and
softmax, elementwise/copies/indexing, and ops whose self time is only dispatch (views,
linear/matmul wrappers). The wall time not covered by the arithmetic kinds is Python and
dispatch: the fraction of a step spent outside the arithmetic. The profiler costs time per op
itself, so the fraction is also given against the unprofiled wall (median of `--rounds`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.profiler import ProfilerActivity, profile

from bench import write_json
from headwise.documents import document_tokens
from headwise.models import ModelRunner, resolve_model_path
from headwise.policies import get_policy

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
REDUCE = {"aten::_softmax", "aten::softmax", "aten::amax", "aten::sum", "aten::mean", "aten::max", "aten::argmax",
          "aten::maximum"}
# ops whose self time is dispatch around a kernel or a view's metadata, not arithmetic
WRAPPERS = {"aten::linear", "aten::matmul", "aten::view", "aten::as_strided", "aten::slice", "aten::transpose",
            "aten::reshape", "aten::expand", "aten::select", "aten::unsqueeze", "aten::t", "aten::_unsafe_view",
            "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resolve_conj",
            "aten::resolve_neg", "aten::detach", "aten::to", "aten::lift_fresh", "aten::item", "aten::index_put_"}


def _steps(runner, cache, token: int, n: int) -> int:
    for _ in range(n):
        token = int(runner.decode_batch([token], [cache])[0].argmax())
    return token


def run(model, tokens: int, policy: str, kept: float, steps: int, rounds: int = 3) -> dict:
    runner = ModelRunner.from_pretrained(resolve_model_path(model))
    tok = runner.tokenizer
    ids = tok(document_tokens(tok, tokens + 50), add_special_tokens=False).input_ids[:tokens]
    pol = get_policy(policy, kept=kept)
    res = runner.prefill_segment(ids, policy=pol, ctx=runner.context(pol))
    cache, t = res.cache, int(res.logits.argmax())
    t = _steps(runner, cache, t, 3)  # warm: views built
    walls = []
    for _ in range(rounds):  # unprofiled steps in rounds; the median is the step's wall time
        t0 = time.perf_counter()
        t = _steps(runner, cache, t, steps)
        walls.append((time.perf_counter() - t0) / steps)
    wall = statistics.median(walls)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t1 = time.perf_counter()
        _steps(runner, cache, t, steps)
        wall_prof = (time.perf_counter() - t1) / steps
    kinds = {"matmul": 0.0, "reduction/softmax": 0.0, "elementwise, copies, indexing": 0.0, "dispatch ops (views, wrappers)": 0.0}
    ops = {}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        us = e.self_cpu_time_total / steps
        ops[e.key] = (us, e.count // steps)
        if e.key in MATMUL:
            kinds["matmul"] += us
        elif e.key in REDUCE:
            kinds["reduction/softmax"] += us
        elif e.key in WRAPPERS:
            kinds["dispatch ops (views, wrappers)"] += us
        else:
            kinds["elementwise, copies, indexing"] += us
    kernels = sum(v for k, v in kinds.items() if not k.startswith("dispatch"))
    top = sorted(ops.items(), key=lambda kv: -kv[1][0])[:12]
    return {
        "policy": policy, "kept": kept, "tokens": len(ids), "steps": steps, "threads": torch.get_num_threads(),
        "wall_ms_per_step": wall * 1e3, "wall_ms_per_step_profiled": wall_prof * 1e3,
        "kinds_ms_per_step": {k: v / 1e3 for k, v in kinds.items()},
        "outside_kernels_ms_per_step": wall_prof * 1e3 - kernels / 1e3,
        "outside_fraction": 1 - kernels / 1e6 / wall_prof,  # Python + dispatch: no arithmetic kernel running
        "outside_matmul_reduction_fraction": 1 - (kinds["matmul"] + kinds["reduction/softmax"]) / 1e6 / wall_prof,
        # the profiler adds its own cost to every op: measured against the unprofiled wall, the
        # kernels' (profiled) self time leaves the Python and dispatch of the step itself
        "outside_matmul_reduction_fraction_unprofiled": 1 - (kinds["matmul"] + kinds["reduction/softmax"]) / 1e6 / wall,
        "wall_ms_per_step_rounds": [w * 1e3 for w in walls],
        "aten_ops_per_step": sum(c for _, c in ops.values()),
        "top_ops": {k: {"ms_per_step": us / 1e3, "calls_per_step": c} for k, (us, c) in top},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--policy", default="kvzip")
    ap.add_argument("--kept", type=float, default=0.25)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="unprofiled rounds of --steps steps (median)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = run(a.model, a.tokens, a.policy, a.kept, a.steps, a.rounds)
    t = Table(title=f"one-stream decode step, {a.policy} kept {a.kept}, {res['tokens']} tokens, {res['threads']} thread(s)")
    t.add_column("where"); t.add_column("ms / step", justify="right"); t.add_column("share", justify="right")
    w = res["wall_ms_per_step_profiled"]
    for k, v in res["kinds_ms_per_step"].items():
        t.add_row(k, f"{v:.1f}", f"{v / w:.0%}")
    t.add_row("outside arithmetic kernels (Python + dispatch, incl. the row above)", f"{res['outside_kernels_ms_per_step']:.1f}",
              f"{res['outside_fraction']:.0%}")
    t.add_row("wall (profiled / unprofiled)", f"{w:.1f} / {res['wall_ms_per_step']:.1f}", "")
    t.add_row("outside matmuls + reductions, of the profiled wall", "", f"{res['outside_matmul_reduction_fraction']:.0%}")
    t.add_row("outside matmuls + reductions, of the unprofiled wall", "", f"{res['outside_matmul_reduction_fraction_unprofiled']:.0%}")
    Console(width=160).print(t)
    t2 = Table(title="top aten ops by self time")
    for c in ("op", "ms / step", "calls / step"):
        t2.add_column(c)
    for k, v in res["top_ops"].items():
        t2.add_row(k, f"{v['ms_per_step']:.2f}", str(v["calls_per_step"]))
    Console(width=160).print(t2)
    if a.json:
        write_json(a.json, res)


if __name__ == "__main__":
    main()
