"""KVzip's reconstruction pass with windowed chunk attention (`kvzip:span=N`).

The exact pass (`ModelRunner.reconstruction_steps` with span 0) re-reads the whole segment in
chunks, each chunk's queries attending to every segment row: every query sees S keys, twice
what a causal prefill's query sees on average, so the pass costs more than a prefill however
its attention is written (docs/policies.md, "the pass's cost"). The windowed pass keeps what
reconstruction is about, the chunk reading its own span back, and bounds what each query
attends to:

* the repeat request (the chat template's user turn) runs once, over the whole segment, as in
  the exact pass (its rows never see a chunk, so they are the exact pass's), and its keys and
  values are kept for every chunk;
* each chunk of `chunk` tokens then attends to the first `SINKS` segment rows, the segment
  rows within `span` tokens of the chunk's own span (on both sides), the request's rows, and
  causally to itself; the chunk's positions are the exact pass's (after segment and request);
* a row's score is the largest attention any chunk query of its KV head's group gives it;
  a row outside every window that reached it keeps the largest it got (0 if none).

Rows of the segment outside a chunk's window get no attention from it, so scores differ from
exact KVzip's (more mass on the window); `bench.quality` measures what that costs. The last
layer's attention output is never read (only its scores are), so it is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch
from torch import Tensor

from headwise.errors import InvalidInput

if TYPE_CHECKING:
    from headwise.models.runner import ModelRunner
    from headwise.policies.base import LayerState

HALF = torch.bfloat16  # the `half` pass's matmul precision (fp32 accumulation, AMX/tensor cores where there are)
SINKS = 16  # first segment rows every chunk attends to (the template's system turn and the attention sinks) [P]
BLOCK_FLOATS = 1 << 19  # logits per query block (2 MiB of fp32): stays in L2


def attend_scored(q: Tensor, keys: Tensor, values: Tensor, n_ctx: int, scaling: float, scored: int,
                  out_needed: bool = True, half: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """Attention of C new rows over `n_ctx` context rows and, causally, over themselves.

    q: [Hq, C, d]; keys, values: [Hkv, n_ctx + C, d] (context first, then the new rows).
    Returns the output [Hq, C, d] (None unless `out_needed`) and, when `scored`, [Hkv, scored]:
    for each of the first `scored` context rows, the largest softmax probability any query of
    the head's group gave it. Query rows go in blocks whose logits stay cache-sized; each
    block sees only the new rows its causal mask lets through. `half`: the two products in
    bfloat16 (the softmax, its max and the output stay fp32).
    """
    if half:
        q, keys, values = q.to(HALF), keys.to(HALF), values.to(HALF)
    Hq, C, d = q.shape
    H = keys.shape[0]
    G = Hq // H
    step = max(16, BLOCK_FLOATS // (Hq * (n_ctx + C)))
    causal = torch.full((C, C), float("-inf"), dtype=torch.float32, device=q.device).triu_(1)
    out = torch.empty(Hq, C, d, dtype=torch.float32, device=q.device) if out_needed else None
    best = torch.zeros(H, scored, dtype=torch.float32, device=q.device) if scored else None
    for a in range(0, C, step):
        b = min(C, a + step)
        r = b - a
        n = n_ctx + b
        qb = q[:, a:b].reshape(H, G * r, d)
        logits = torch.bmm(qb, keys[:, :n].transpose(1, 2))  # [H, G*r, n]
        logits = (logits.float() if half else logits).mul_(scaling)
        logits.view(H, G, r, n)[..., n_ctx:].add_(causal[a:b, :b])
        p = torch.softmax(logits, -1)
        if out is not None:
            out[:, a:b] = torch.bmm(p.to(HALF) if half else p, values[:, :n]).view(Hq, r, d)
        if best is not None:
            torch.maximum(best, p[:, :, :scored].amax(1), out=best)  # over the block's rows of the whole group
    return out, best


@dataclass
class _HalfLayer:
    """One layer's projections in bfloat16 (copies; the fp32 model is untouched) and its fp32 norms."""

    qkv: Tensor  # [Dq + 2 Dkv, D]
    o: Tensor  # [D, Dq]
    gate_up: Tensor  # [2 I, D]
    down: Tensor  # [D, I]
    inter: int
    act: object
    ln1: torch.nn.Module
    ln2: torch.nn.Module


def half_layers(runner: "ModelRunner") -> list[_HalfLayer] | None:
    """The bfloat16 copies of every layer's projections, made once per runner (about half the
    fp32 weights' bytes, the embeddings excluded); None when a layer is not of the fused Llama kind."""
    held = runner.__dict__.get("_half_layers")
    if held is not None:
        return held
    out = []
    for layer in runner._inner.layers:
        f = runner._fused.get(id(layer))
        if f is None:
            return None
        out.append(_HalfLayer(f.qkv.to(HALF), layer.self_attn.o_proj.weight.to(HALF), f.gate_up.to(HALF),
                              layer.mlp.down_proj.weight.to(HALF), f.inter, f.act, f.ln1, f.ln2))
    runner._half_layers = out
    return out


def half_layer_steps(runner: "ModelRunner", layers: list[_HalfLayer], h: Tensor, cos: Tensor, sin: Tensor,
                     attend) -> Iterator[Tensor]:
    """`ModelRunner._layer_steps` (finish_last=False) with every projection in bfloat16: the
    residual stream, norms, RoPE and what `attend` gets (x, q, k, v) stay fp32."""
    from headwise.models.runner import _rms, _signed_sin

    S, d, Hq, Hkv = h.shape[1], runner.head_dim, runner.num_heads, runner.num_kv_heads
    signed = _signed_sin(sin)
    n = len(layers)
    for i, (w, layer) in enumerate(zip(layers, runner._inner.layers, strict=True)):
        x = _rms(h, w.ln1)
        y = (x[0].to(HALF) @ w.qkv.t()).float().view(S, Hq + 2 * Hkv, d).transpose(0, 1)
        qk = y[: Hq + Hkv]
        qk = qk * cos[0] + torch.roll(qk, d // 2, -1) * signed
        o = attend(i, layer.self_attn.scaling, x, qk[:Hq], qk[Hq:], y[Hq + Hkv :])
        if i + 1 < n:
            h = h + (o.transpose(0, 1).reshape(S, -1).to(HALF) @ w.o.t()).float()[None]
            gu = _rms(h, w.ln2)[0].to(HALF) @ w.gate_up.t()
            a = w.act(gu[:, : w.inter]).mul_(gu[:, w.inter :])
            h = h + (a @ w.down.t()).float()[None]
        yield h


def windowed_steps(runner: "ModelRunner", token_ids: list[int], states: list["LayerState"], start: int, span: int,
                   chunk: int, half: bool = False) -> Iterator[list[Tensor] | None]:
    """The windowed reconstruction pass over a segment prefilled on no cache: one layer per `next`
    (None after each: the request's layers first, then each chunk's), then the scores [Hkv, S] per layer.
    `half`: projections and attention products in bfloat16 (`half_layer_steps`, `attend_scored`)."""
    hl = half_layers(runner) if half else None
    half = hl is not None

    def layer_steps(h: Tensor, cos: Tensor, sin: Tensor, attend) -> Iterator[Tensor]:
        if hl is not None:
            return half_layer_steps(runner, hl, h, cos, sin, attend)
        return runner._layer_steps(h, cos, sin, attend, finish_last=False)

    S = len(token_ids)
    prefix = runner._repeat_prefix()
    P = len(prefix)
    room = runner.max_positions - (start + S) - P
    chunk = min(chunk, room)
    if chunk < 16:
        raise InvalidInput(
            f"a segment of {S} tokens at position {start} leaves no room to score it by reconstruction "
            f"(context {runner.max_positions}); use at most {runner.max_positions - start - P - 16} tokens"
        )
    dev = runner.device
    n_layers = len(states)
    scores = [torch.zeros(runner.num_kv_heads, S, dtype=torch.float32, device=dev) for _ in states]
    req_k: list[Tensor] = []
    req_v: list[Tensor] = []
    if P:  # the repeat request, once, over the whole segment (exact: it never sees a chunk)
        ids = torch.tensor(prefix, dtype=torch.long, device=dev)
        h, cos, sin = runner._embed(ids, torch.arange(start + S, start + S + P, device=dev))

        def request(i: int, scaling: float, x: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            req_k.append(k)
            req_v.append(v)
            if i + 1 == n_layers:  # its last layer's output is never read
                return q
            keys = torch.cat([states[i].keys, k], 1)
            values = torch.cat([states[i].values, v], 1)
            return attend_scored(q, keys, values, S, scaling, 0, half=half)[0]

        for _ in layer_steps(h, cos, sin, request):
            yield None
    sinks = min(SINKS, S)
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        lo, hi = max(0, a - span), min(S, b + span)
        pieces = [(lo, hi)] if lo <= sinks else [(0, sinks), (lo, hi)]  # segment rows this chunk sees
        n_seg = sum(y - x for x, y in pieces)
        ids = torch.tensor(token_ids[a:b], dtype=torch.long, device=dev)
        h, cos, sin = runner._embed(ids, torch.arange(start + S + P, start + S + P + b - a, device=dev))

        def attend(i: int, scaling: float, x: Tensor, q: Tensor, k: Tensor, v: Tensor,
                   pieces: list[tuple[int, int]] = pieces, n_seg: int = n_seg) -> Tensor:
            st = states[i]
            keys = torch.cat([st.keys[:, x0:x1] for x0, x1 in pieces] + req_k[i : i + 1] + [k], 1)
            values = torch.cat([st.values[:, x0:x1] for x0, x1 in pieces] + req_v[i : i + 1] + [v], 1)
            last = i + 1 == n_layers
            o, got = attend_scored(q, keys, values, n_seg + P, scaling, n_seg, out_needed=not last, half=half)
            at = 0
            for x0, x1 in pieces:
                scores[i][:, x0:x1] = torch.maximum(scores[i][:, x0:x1], got[:, at : at + x1 - x0].float())
                at += x1 - x0
            return q if last else o

        for _ in layer_steps(h, cos, sin, attend):
            yield None
    yield scores
