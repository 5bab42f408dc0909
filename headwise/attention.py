"""Ragged attention over CompactCache layers, one call per layer for every head and sequence.

Each KV head attends over its own rows: the ragged kept rows (with their log-weights: a
merged row standing for m tokens adds log m to its logit, RazorAttention Eq. 5), the dense
decode tail, and, during prefill, the new segment's rows under a causal mask. Query head h
uses KV head h // G (the repeat_kv convention).

The rows are read through a `LayerView`, built once per cache change (not per step, not per
head): every (sequence, KV head) of a layer is one slot row of a padded [B*Hkv, L, d] block
(slots [0, cap) the decode tail, then the head's ragged rows, then padding), with an additive
bias [B*Hkv, 1, L] that carries the log-weights and -inf on padding. Attention is then a
batched matmul over (sequence, head) with the head's G queries as rows, a softmax and a
second batched matmul: exact per head, no Python loop over heads or sequences, no host sync.
On CUDA the same view maps to a varlen kernel ((sequence, head) as one sequence, the slot
lengths as cu_seqlens). Measured alternatives (docs/engine.md): flat rows with a segment
softmax (index_add_) were 4x slower on this CPU; a block-diagonal bias over the flat rows
computes every logit Hkv times.

PoD heads (`LayerCache.distant`) score their distant rows with the same head of their base
layer: q_base . K_base[same token] (training-free score sharing, ALGORITHMS.md 4.2 [P]), in one
softmax with their own keyed rows, over their own values. The view holds those base keys
([B*Hkv, M, d]) and the slots their logits go to; the base layer's queries of the step come
in a `BaseQueries`, which the runner fills layer by layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.attention_common import BaseQueries, MergedShare, _distant_plan, distant_plans  # noqa: F401 - re-exported
from headwise.cache.compact import LayerCache


@dataclass
class LayerView:
    """One layer of B caches laid out for attention (see the module docstring). BH = B * Hkv.

    keys, values: [BH, L, d]; slot s of row bh: the tail for s < cap, ragged row s - cap of
                  (sequence bh // Hkv, head bh % Hkv) for s < cap + lengths[bh], else padding.
    bias:         [BH, 1, L] additive: log-weight of a held row, -inf on padding and unwritten tail.
    merged:       [BH, L] bool slots of merged rows (recall candidates), or None when there are none.
    PoD: dist_keys [BH, M, d] the base layers' keys of the distant rows (zeros as padding),
    dist_slots [BH, 1, M] their slots here (padding: slot L - 1, always -inf), dist_base [BH]
    the base layer of each row's head (-1: none) and bases the distinct ones.
    """

    keys: Tensor
    values: Tensor
    bias: Tensor
    cap: int
    lengths: Tensor  # [BH] int64 on the device: ragged rows of each (sequence, head)
    merged: Tensor | None = None
    dist_keys: Tensor | None = None
    dist_slots: Tensor | None = None
    dist_base: Tensor | None = None
    bases: tuple[int, ...] = ()
    num_heads: int = 0
    biased: bool = True  # False when the bias is all zeros (no padding, no log-weight): it is skipped

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]


def build_view(layers: Sequence[LayerCache], cap: int, base_layers: Sequence[Sequence[LayerCache]] | None = None,
               dtype: torch.dtype | None = None) -> LayerView:
    """The view of one layer of B caches (`layers[b]`), with `cap` tail slots (the first tail_len
    of them filled from each layer's tail). `base_layers[b]` are cache b's layers, needed when
    a layer has distant (PoD) rows. Runs once per cache change: a Python loop over sequences
    and copies here are paid once, not per step."""
    lc0 = layers[0]
    B, H, d = len(layers), lc0.num_heads, lc0.head_dim
    dev, dt = lc0.values.device, dtype or lc0.values.dtype
    lens = [lc.head_offsets[1:] - lc.head_offsets[:-1] for lc in layers]  # [H] each, on the device
    pod = any(lc.distant is not None for lc in layers)
    longest = max(int(n.max()) for n in lens) if H else 0
    if B == 1 and cap == 0 and not pod and lc0.tail_len == 0 and bool((lens[0] == longest).all()):
        # every head holds the same rows (full, streaming, ...): the flat rows are the view, no copy
        v = lc0.values.view(H, longest, d)
        return LayerView(lc0.keys.view(H, longest, d).to(dt), v.to(dt), lc0.log_weights.view(H, 1, longest).to(dt),
                         0, lens[0], _merged(lc0, H, longest, 0), num_heads=H, biased=bool((lc0.log_weights != 0).any()))
    L = cap + longest + (1 if pod else 0)  # PoD: one spare slot that padding pairs point at
    K = torch.zeros(B * H, L, d, dtype=dt, device=dev)
    V = torch.zeros_like(K)
    bias = torch.full((B * H, 1, L), float("-inf"), dtype=dt, device=dev)
    merged = torch.zeros(B * H, L, dtype=torch.bool, device=dev)
    for b, lc in enumerate(layers):
        rows = slice(b * H, (b + 1) * H)
        slots = _slots(lc, L, cap)  # [R] flat slot of every ragged row in [H * L]
        keyed = slots if lc.distant is None else slots[~lc.distant]
        K[rows].view(H * L, d).index_copy_(0, keyed, lc.keys.to(dt))
        V[rows].view(H * L, d).index_copy_(0, slots, lc.values.to(dt))
        bias[rows].view(H * L).index_copy_(0, slots, lc.log_weights.to(dt))
        if lc.recall is not None and lc.recall.num_groups > 0:  # watched for recall only when originals exist
            merged[rows].view(H * L).index_fill_(0, slots[lc.recall_ids >= 0], True)
        T = lc.tail_len
        if T:
            if T > cap:
                raise ValueError(f"a view of {cap} tail slots cannot hold a tail of {T} rows")
            K[rows, :T] = lc.tail_keys[:, :T].to(dt)
            V[rows, :T] = lc.tail_values[:, :T].to(dt)
            bias[rows, :, :T] = 0
    lengths = torch.cat(lens)
    view = LayerView(K, V, bias, cap, lengths, merged if bool(merged.any()) else None, num_heads=H)
    if pod:
        _attach_distant(view, layers, base_layers, L, cap)
    return view


def _slots(lc: LayerCache, L: int, cap: int) -> Tensor:
    """[R] slot (in the flattened [Hkv * L]) of every ragged row of lc: head * L + cap + row-in-head."""
    off = lc.head_offsets
    R = lc.values.shape[0]
    head = torch.repeat_interleave(torch.arange(lc.num_heads, device=off.device), off[1:] - off[:-1], output_size=R)
    r = torch.arange(R, device=off.device)
    return head * L + cap + (r - off[head])


def _merged(lc: LayerCache, H: int, n: int, cap: int) -> Tensor | None:
    m = lc.recall_ids >= 0
    return m.view(H, n) if lc.recall is not None and lc.recall.num_groups > 0 and bool(m.any()) else None


def _attach_distant(view: LayerView, layers: Sequence[LayerCache], base_layers, L: int, cap: int) -> None:
    """PoD: the base layers' keys of every distant row and the slots their logits go to."""
    H, d = view.num_heads, view.keys.shape[-1]
    B = len(layers)
    plans = distant_plans(layers, base_layers, H, cap)  # (bh, slots here, base keys, base layer)
    M = max((p[1].numel() for p in plans), default=0)
    dk = view.keys.new_zeros(B * H, M, d)
    ds = torch.full((B * H, 1, M), L - 1, dtype=torch.long, device=view.keys.device)
    base = torch.full((B * H,), -1, dtype=torch.long)
    for bh, slots, keys, bl in plans:
        dk[bh, : slots.numel()] = keys.to(dk.dtype)
        ds[bh, 0, : slots.numel()] = slots
        base[bh] = bl
    view.dist_keys, view.dist_slots = dk, ds
    view.bases = tuple(sorted({p[3] for p in plans}))
    view.dist_base = base.to(view.keys.device)


def _base_rows(view: LayerView, held: dict[int, Tensor], rows: Tensor | None = None) -> Tensor:
    """The base layers' queries [BH, X, d] for the view's rows: each (sequence, head) row from its
    own head's base layer (a loop over distinct base layers, not heads). `held[b]` is [BH, X, d]."""
    missing = [b for b in view.bases if b not in held]
    if missing:
        raise ValueError(f"distant rows are scored with layer {missing[0]}; pass that layer's queries (BaseQueries)")
    out = held[view.bases[0]]
    for b in view.bases[1:]:
        out = torch.where((view.dist_base == b)[:, None, None], held[b], out)
    return out


def _add_distant(logits: Tensor, view: LayerView, qb: Tensor, scaling: float) -> Tensor:
    """Distant rows' logits: q_base . K_base added at their slots (their own key slot is zero)."""
    ld = torch.bmm(qb, view.dist_keys.transpose(1, 2)).mul_(scaling)  # [BH, X, M]
    return logits.scatter_add_(2, view.dist_slots.expand(-1, logits.shape[1], -1), ld)


# ---- views cached on a layer -----------------------------------------------------------
def _ident(lc: LayerCache, bases: Sequence[LayerCache] | None) -> tuple:
    t = (lc.keys, lc.values, lc.head_offsets, lc.log_weights, lc.recall_ids, lc.distant, lc.tail_keys, lc.tail_len)
    if lc.distant is not None and bases is not None:
        t += tuple(x for b in lc.distant_from if b >= 0 for x in (bases[b].keys, bases[b].positions, bases[b].head_offsets))
    return t


def layer_view(lc: LayerCache, bases: Sequence[LayerCache] | None = None, dtype: torch.dtype | None = None) -> LayerView:
    """The one-sequence view of lc (tail slots exactly its tail), cached on lc until it changes."""
    ident = _ident(lc, bases) + (dtype,)
    hit = lc.__dict__.get("_view")
    if hit is not None and len(hit[0]) == len(ident) and all(x is y for x, y in zip(hit[0], ident, strict=True)):
        return hit[1]
    view = build_view([lc], lc.tail_len, [bases] if bases is not None else None, dtype)
    lc._view = (ident, view)
    return view


def column_sums(q: Tensor, k: Tensor, scaling: float, chunk: int = 512) -> Tensor:
    """Sum over the segment's queries of the causal attention each key receives (H2O score).

    q: [Hq, S, d]; k: [Hkv, S, d]; returns [Hq, S] fp32. Chunked over query rows so the
    full S x S matrix never exists at once.
    """
    Hq, S, _ = q.shape
    G = Hq // k.shape[0]
    kr = k.repeat_interleave(G, 0).float()  # [Hq, S, d]
    acc = torch.zeros(Hq, S, dtype=torch.float32, device=q.device)
    cols = torch.arange(S, device=q.device)
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        logits = (q[:, a:b].float() @ kr.transpose(1, 2)) * scaling  # [Hq, b-a, S]
        rows = torch.arange(a, b, device=q.device)
        logits.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        acc += torch.softmax(logits, -1).sum(1)
    return acc


def window_probs(window_queries: Tensor, keys: Tensor, scaling: float, gain: Tensor | None = None) -> Tensor:
    """Causal attention of the last W queries over the segment's keys (ALGORITHMS.md 0.2).

    window_queries: [Hq, W, d]; keys: [Hkv, N, d]; gain: optional [W] per-row temperature.
    Returns P [Hq, W, N] fp32; the query at position N-W+i sees keys 0..N-W+i.
    """
    Hq, W, _ = window_queries.shape
    N = keys.shape[1]
    G = Hq // keys.shape[0]
    kr = keys.repeat_interleave(G, 0).float()
    logits = (window_queries.float() @ kr.transpose(1, 2)) * scaling  # [Hq, W, N]
    if gain is not None:
        logits = logits * gain.float()[None, :, None]
    rows = torch.arange(N - W, N, device=keys.device)
    cols = torch.arange(N, device=keys.device)
    logits.masked_fill_(cols[None, None, :] > rows[None, :, None], float("-inf"))
    return torch.softmax(logits, -1)


# ---- prefill -----------------------------------------------------------------------------
SCORE_BLOCK_FLOATS = 1 << 19  # logits per query block of view_prefill (2 MiB of fp32, all heads: stays in L2)


def view_prefill(
    q: Tensor, view: LayerView, new_keys: Tensor, new_values: Tensor, scaling: float, scored: int = 0, query_from: int = 0,
    base_q: dict[int, Tensor] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """A new segment over a one-sequence view and, causally, over itself.

    q: [Hq, C, d]; new_keys/new_values: [Hkv, C, d]; base_q: base layer -> its queries [Hq, C, d]
    (PoD views). Returns the output [Hq, C, d] and, when `scored`, scores [Hkv, scored] fp32: for
    each of the last `scored` ragged rows of a head, the largest softmax probability any query row
    >= query_from of the head's group gave it (KVzip's reconstruction score).

    Query rows go in blocks whose logits stay cache-sized (SCORE_BLOCK_FLOATS); each block's
    logits over the view and over the new rows are exponentiated, normalised, multiplied and
    reduced in place, and a block sees only the new keys its causal mask lets through.
    """
    Hq, C, d = q.shape
    H = new_keys.shape[0]
    G = Hq // H
    L = view.num_slots
    causal = torch.full((C, C), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
    out = q.new_empty(Hq, C, d)
    scores = torch.zeros(H, L, dtype=q.dtype, device=q.device) if scored else None
    step = max(16, SCORE_BLOCK_FLOATS // (Hq * (L + C)))
    held = {b: x.reshape(H, G, C, d) for b, x in (base_q or {}).items()} if view.dist_keys is not None else None
    for a in range(0, C, step):
        b = min(C, a + step)
        r = b - a
        qb = q[:, a:b].reshape(H, G * r, d)  # [H, G*r, d]
        if view.biased:
            pc = torch.baddbmm(view.bias, qb, view.keys.transpose(1, 2), alpha=scaling)  # [H, G*r, L]
        else:  # every slot a plain held row (full, streaming, ...): no bias to add
            pc = torch.bmm(qb, view.keys.transpose(1, 2)).mul_(scaling)
        if held is not None:
            _add_distant(pc, view, _base_rows(view, {k: v[:, :, a:b].reshape(H, G * r, d) for k, v in held.items()}), scaling)
        pn = torch.bmm(qb, new_keys[:, :b].transpose(1, 2)).mul_(scaling)  # [H, G*r, b]
        pn.view(H, G, r, b).add_(causal[a:b, :b])
        m = torch.maximum(pc.amax(-1, keepdim=True), pn.amax(-1, keepdim=True))
        pc.sub_(m).exp_()
        pn.sub_(m).exp_()
        z = pc.sum(-1, keepdim=True).add_(pn.sum(-1, keepdim=True))
        pc.div_(z)
        pn.div_(z)
        o = torch.bmm(pc, view.values).add_(torch.bmm(pn, new_values[:, :b]))  # [H, G*r, d]
        out[:, a:b] = o.view(Hq, r, d)
        if scores is not None and b > query_from:
            # one dim at a time: over (1, 2) at once torch takes a slow generic path (~40x here)
            got = pc.view(Hq, r, L)[:, max(a, query_from) - a :].amax(dim=1).view(H, G, L).amax(dim=1)  # [H, L]
            torch.maximum(scores, got, out=scores)
    if scores is None:
        return out, None
    # the last `scored` ragged rows of each head: slots cap + n_h - scored ... cap + n_h
    idx = view.cap + view.lengths[:, None] - scored + torch.arange(scored, device=q.device)  # [H, scored]
    return out, scores.gather(1, idx).float()


def ragged_prefill_attention(
    q: Tensor, layer: LayerCache | None, new_keys: Tensor, new_values: Tensor, scaling: float,
    base: BaseQueries | None = None,
) -> Tensor:
    """Attention of a new segment over the cached rows and, causally, over itself.

    q: [Hq, S, d]; new_keys/new_values: [Hkv, S, d]; returns [Hq, S, d]. `base` is needed
    when the layer has PoD (distant) rows.
    """
    if layer is None or layer.num_rows == 0:
        # The plain causal path: bit-compatible with transformers' sdpa attention.
        G = q.shape[0] // new_keys.shape[0]
        k = new_keys.repeat_interleave(G, 0)
        v = new_values.repeat_interleave(G, 0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]
    view = layer_view(layer, base.layers if base is not None else None, q.dtype)
    return view_prefill(q, view, new_keys, new_values, scaling, base_q=base.queries if base is not None else None)[0]


def prefill_attention_scores(
    q: Tensor, layer: LayerCache, new_keys: Tensor, new_values: Tensor, scaling: float, scored: int, query_from: int = 0,
    base: BaseQueries | None = None,
) -> tuple[Tensor, Tensor]:
    """ragged_prefill_attention, plus what each of the last `scored` rows of every head received
    (see `view_prefill`); the layer must have no decode tail. Scores are [Hkv, scored] fp32."""
    if layer.tail_len:
        raise ValueError("prefill_attention_scores needs a compacted layer (no decode tail)")
    view = layer_view(layer, base.layers if base is not None else None, q.dtype)
    return view_prefill(q, view, new_keys, new_values, scaling, scored, query_from,
                        base.queries if base is not None else None)


# ---- decode ------------------------------------------------------------------------------
def view_decode(q: Tensor, view: LayerView, scaling: float, base_q: Tensor | None = None,
                thresholds: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """One decode step of B sequences: q [BH, G, d] (sequence-major, then KV head, then group),
    base_q the base layers' queries in the same layout (PoD views). Returns the output
    [BH, G, d] and, when `thresholds` [BH, 1] is given and the view has merged rows, the
    (row bh, slot, share) of every merged slot whose share passed its row's threshold
    (one device sync per layer, only then)."""
    logits = torch.baddbmm(view.bias, q, view.keys.transpose(1, 2), alpha=scaling)  # [BH, G, L]
    if view.dist_keys is not None:
        _add_distant(logits, view, base_q, scaling)
    p = torch.softmax(logits, dim=-1)
    out = torch.bmm(p, view.values)
    if thresholds is None or view.merged is None:
        return out, None
    share = p.amax(1)  # [BH, L]: max over the head's query heads
    hit = ((share > thresholds) & view.merged).nonzero()  # [k, 2] (bh, slot)
    return out, (hit, share[hit[:, 0], hit[:, 1]])


def shares(hits: tuple[Tensor, Tensor] | None, view: LayerView) -> list[tuple[int, MergedShare]]:
    """(sequence, MergedShare) of every hit of view_decode (host side)."""
    if hits is None or not hits[0].numel():
        return []
    H = view.num_heads
    return [(bh // H, MergedShare(bh % H, s - view.cap, x)) for (bh, s), x in zip(hits[0].tolist(), hits[1].tolist(), strict=True)]


def ragged_decode_attention(
    q: Tensor, layer: LayerCache, scaling: float, recall_threshold: float | None = None,
    base: BaseQueries | None = None,
) -> tuple[Tensor, list[MergedShare]]:
    """One decode step of one sequence: q [Hq, 1, d] over every row of the layer (new token
    already appended). Returns the output [Hq, 1, d] and the merged rows whose attention share
    in their head exceeded `recall_threshold`. `base` is needed when the layer has PoD rows.
    (The runner decodes over paged views kept across steps: `attention_paged.DecodeViews`.)"""
    Hq, _, d = q.shape
    H = layer.num_heads
    view = layer_view(layer, base.layers if base is not None else None, q.dtype)
    bq = None
    if view.dist_keys is not None:
        bq = _base_rows(view, {b: x.reshape(H, Hq // H, d) for b, x in (base.queries if base else {}).items()})
    thr = None if recall_threshold is None else torch.full((H, 1), recall_threshold, dtype=q.dtype, device=q.device)
    out, hits = view_decode(q.reshape(H, Hq // H, d), view, scaling, bq, thr)
    return out.reshape(Hq, 1, d), [s for _, s in shares(hits, view)]

