"""Ragged attention through a varlen kernel (Flash Attention's `varlen_attn` on CUDA).

Every (sequence b, KV head h) of a layer is one variable-length sequence of the kernel, row
bh = b * Hkv + h, with the G query heads of h's group as the kernel's query heads over one
KV head (`enable_gqa`, Hkv = 1): exact for GQA, and causal masks stay per query position.

A kernel without an additive bias cannot express what the engine guarantees beyond plain
softmax attention, so a layer's rows are split once per cache change (`build_varlen`):
- plain rows (log-weight 0, own key, not watched for recall), the decode tail and, in a
  prefill, the new segment: through the kernel, which returns its log-sum-exp;
- special rows (merged rows with log m, PoD distant rows scored with the base layer's query,
  merged rows the recall watch reads): a small explicit attention over a padded [BH, M, d]
  block with an additive bias, in fp32.
The partials join by the exact log-sum-exp merge, out = sum_i out_i exp(lse_i - lse),
lse = logsumexp_i lse_i, and the recall watch's probabilities are exp(logit - lse).

Layout of the plain part: sequence bh owns keys[cu_k[bh] : cu_k[bh + 1]], its plain rows in
head order, then `cap` tail slots; `used[bh]` (the kernel's seqused_k) counts the slots
written. Decode writes each step's token into its slot (`VarlenDecodeViews.write`), so the
layout is built once per cache change, not per step. A prefill runs the kernel twice: over
the cached plain rows (no mask) and over the new rows (causal), and merges three partials,
so the cache is not copied per call.

The kernel is passed in: `varlen_attn` on CUDA; `reference_varlen_attn` is a pure-torch
stand-in with the same contract, used by the CPU tests (tests/test_attention_varlen.py).
The paged block_table form is not used: Flash Attention's paged KV needs pages of 256
slots (a multiple of 256), wasteful at a few hundred rows per head.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.attention_common import BaseQueries, distant_plans
from headwise.attention_paged import DecodeViews
from headwise.cache.compact import LayerCache

Kernel = Callable[..., tuple[Tensor, Tensor]]


# ---- the kernel's contract ------------------------------------------------------------------
def reference_varlen_attn(
    query: Tensor, key: Tensor, value: Tensor, cu_seq_q: Tensor, cu_seq_k: Tensor, max_q: int, max_k: int, *,
    return_aux=None, scale: float | None = None, window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
    seqused_k: Tensor | None = None, block_table: Tensor | None = None, num_splits: int | None = None,
):
    """torch.nn.attention.varlen.varlen_attn in plain torch (a loop over sequences: tests only).

    query [Tq, Hq, d], key/value [Tk, Hkv, d]; sequence i has queries cu_seq_q[i]:cu_seq_q[i+1]
    and keys from cu_seq_k[i], seqused_k[i] of them when given (else up to cu_seq_k[i+1]).
    window_size (left, right), aligned bottom-right as Flash Attention does when the query and
    key lengths differ: query i of a sequence sees key j iff i + sk - sq - left <= j <=
    i + sk - sq + right (-1: unbounded); (-1, 0) is causal. Query head j reads KV head
    j // (Hq / Hkv). Returns out [Tq, Hq, d] (query dtype) and, when return_aux.lse, lse fp32
    [Hq, Tq]: the shape of torch's meta function and of Flash Attention's varlen output
    (varlen_attn's docstring says (T_q, H_q); `_lse_rows` accepts both). A query that sees
    no key gets out 0 and lse +inf, as Flash Attention writes.
    """
    if block_table is not None:
        raise NotImplementedError("the stand-in covers the contiguous layout only")
    Tq, Hq, d = query.shape
    Hkv = key.shape[1]
    if (not enable_gqa and Hq != Hkv) or Hq % Hkv:
        raise ValueError(f"query heads {Hq} and key heads {Hkv} need enable_gqa and Hq % Hkv == 0")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    left, right = window_size
    out = query.new_zeros(Tq, Hq, d)
    lse = torch.full((Hq, Tq), float("inf"), dtype=torch.float32, device=query.device)
    for i in range(cu_seq_q.numel() - 1):
        qa, qb, ka = int(cu_seq_q[i]), int(cu_seq_q[i + 1]), int(cu_seq_k[i])
        sk = int(seqused_k[i]) if seqused_k is not None else int(cu_seq_k[i + 1]) - ka
        sq = qb - qa
        if sq == 0 or sk == 0:
            continue
        q = query[qa:qb].float().transpose(0, 1)  # [Hq, sq, d]
        k = key[ka : ka + sk].float().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)  # [Hq, sk, d]
        v = value[ka : ka + sk].float().transpose(0, 1).repeat_interleave(Hq // Hkv, 0)
        logits = (q @ k.transpose(1, 2)) * scale  # [Hq, sq, sk]
        i_, j_ = torch.arange(sq, device=q.device)[:, None] + (sk - sq), torch.arange(sk, device=q.device)[None]
        seen = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
        if right >= 0:
            seen &= j_ <= i_ + right
        if left >= 0:
            seen &= j_ >= i_ - left
        logits = logits.masked_fill(~seen, float("-inf"))
        m = torch.logsumexp(logits, -1)  # [Hq, sq]
        p = torch.exp(logits - m[..., None]).nan_to_num(0.0)
        out[qa:qb] = (p @ v).transpose(0, 1).to(query.dtype)
        lse[:, qa:qb] = torch.where(torch.isfinite(m), m, torch.full_like(m, float("inf")))
    if return_aux is not None and return_aux.lse:
        return out, lse
    return out


def cuda_kernel() -> Kernel | None:
    """torch's Flash Attention varlen kernel, or None when this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _aux():
    from torch.nn.attention.varlen import AuxRequest

    return AuxRequest(lse=True)


def _lse_rows(lse: Tensor, T: int, G: int) -> Tensor:
    """The kernel's lse as [T, G] fp32, whichever of [G, T] / [T, G] it returns; a query that saw no
    key (+inf or nan from Flash Attention) becomes -inf, so its partial weighs nothing."""
    if lse.shape == (G, T):
        lse = lse.transpose(0, 1)
    elif lse.shape != (T, G):
        raise ValueError(f"kernel lse of shape {tuple(lse.shape)} for {T} queries of {G} heads")
    lse = lse.float()
    return torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("-inf")))


def _run(kernel: Kernel, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
         scaling: float, causal: bool, used: Tensor | None) -> tuple[Tensor, Tensor]:
    """One kernel call: q [T, G, d] over k/v [Tk, 1, d]; returns out [T, G, d] fp32, lse [T, G]."""
    out, lse = kernel(q, k, v, cu_q, cu_k, max_q, max_k, return_aux=_aux(), scale=scaling,
                      window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True, seqused_k=used)
    return out.float(), _lse_rows(lse, q.shape[0], q.shape[1])


def _merge(parts: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Exact join of softmax partials (out_i [..., d], lse_i [...]) over disjoint key sets."""
    lse = functools.reduce(torch.logaddexp, [p[1] for p in parts])
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    out = sum(o * torch.exp(x - safe)[..., None] for o, x in parts)
    return out, lse


# ---- the layout -------------------------------------------------------------------------
@dataclass
class VarlenLayer:
    """One layer of B caches for a varlen kernel (module docstring). BH = B * Hkv.

    keys, values [Tk, 1, d]: plain rows then `cap` tail slots per row bh, from cu_k[bh] (int32
    [BH + 1]); used [BH] int32 slots written (seqused_k); plain [BH] host counts and tail0 [BH]
    the first tail slot of each row. Special rows: sp_keys, sp_values [BH, M, d] (a distant row's
    key is its base layer's key), sp_bias [BH, 1, M] fp32 log-weight (-inf: padding), sp_row [BH, M]
    row index within its head, sp_merged [BH, M] watched for recall (or None), sp_distant [BH, M]
    scored with the base query (or None). dist_base, bases: what `attention._base_rows` and the
    runner read (bases non-empty: the layer needs its base layers' queries); dist_keys is sp_keys
    on PoD layers, else None.
    """

    keys: Tensor
    values: Tensor
    cu_k: Tensor
    used: Tensor
    plain: list[int]
    tail0: Tensor
    cap: int
    num_heads: int
    sp_keys: Tensor
    sp_values: Tensor
    sp_bias: Tensor
    sp_row: Tensor
    sp_merged: Tensor | None = None
    sp_distant: Tensor | None = None
    dist_keys: Tensor | None = None
    dist_base: Tensor | None = None
    bases: tuple[int, ...] = ()
    max_k: int = 0
    built_at: int = 0
    num_special: int = 0  # the most special rows of any (stream, head); 0: the kernel alone
    stream_plain: list[int] = field(default_factory=list)  # per stream, its heads' most plain rows


def _special(lc: LayerCache, row: Tensor, head: Tensor, scored: int) -> Tensor:
    """[R] rows the kernel cannot take: log-weighted, distant, watched, or scored (KVzip pass)."""
    sp = lc.log_weights != 0
    if lc.distant is not None:
        sp |= lc.distant
    if lc.recall is not None and lc.recall.num_groups > 0:
        sp |= lc.recall_ids >= 0
    if scored:
        lens = lc.head_offsets[1:] - lc.head_offsets[:-1]
        sp |= row >= lens[head] - scored
    return sp


def _rank(mask: Tensor, head: Tensor, H: int) -> tuple[Tensor, Tensor]:
    """Counts [H] of mask's rows per head and each row's rank among its head's masked rows."""
    n = torch.zeros(H, dtype=torch.long, device=mask.device).index_add_(0, head, mask.long())
    before = n.cumsum(0) - n
    return n, mask.long().cumsum(0) - 1 - before[head]


def build_varlen(layers: Sequence[LayerCache], cap: int, base_layers: Sequence[Sequence[LayerCache]] | None = None,
                 dtype: torch.dtype | None = None, scored: int = 0) -> VarlenLayer:
    """The varlen layout of one layer of B caches (`layers[b]`), `cap` tail slots per row, the
    first tail_len of them filled. `scored`: the last rows of each head go to the explicit part
    (their probabilities are KVzip's scores). Once per cache change: one host read of the counts."""
    lc0 = layers[0]
    H, d = lc0.num_heads, lc0.head_dim
    B, dev, dt = len(layers), lc0.values.device, dtype or lc0.values.dtype
    per = []
    for lc in layers:
        off, R = lc.head_offsets, lc.values.shape[0]
        head = torch.repeat_interleave(torch.arange(H, device=dev), off[1:] - off[:-1], output_size=R)
        row = torch.arange(R, device=dev) - off[head]
        sp = _special(lc, row, head, scored)
        n_p, r_p = _rank(~sp, head, H)
        n_s, r_s = _rank(sp, head, H)
        per.append((head, row, sp, r_p, r_s, n_p, n_s))
    counts = torch.stack([torch.cat([p[5] for p in per]), torch.cat([p[6] for p in per])]).tolist()  # the one host read
    plain, nsp = counts
    T0 = [lc.tail_len for lc in layers for _ in range(H)]
    if max(T0, default=0) > cap:
        raise ValueError(f"a view of {cap} tail slots cannot hold a tail of {max(T0)} rows")
    starts = [0]
    for n in plain:
        starts.append(starts[-1] + n + cap)
    cu_k = torch.tensor(starts, dtype=torch.int32, device=dev)
    M = max(max(nsp, default=0), 1)
    K = torch.zeros(starts[-1], 1, d, dtype=dt, device=dev)
    V = torch.zeros_like(K)
    sk = torch.zeros(B * H, M, d, dtype=torch.float32, device=dev)
    sv = torch.zeros_like(sk)
    bias = torch.full((B * H, 1, M), float("-inf"), dtype=torch.float32, device=dev)
    srow = torch.zeros(B * H, M, dtype=torch.long, device=dev)
    merged = torch.zeros(B * H, M, dtype=torch.bool, device=dev)
    far = torch.zeros(B * H, M, dtype=torch.bool, device=dev)
    start = cu_k[:-1].long()
    for b, (lc, (head, row, sp, r_p, r_s, _, _)) in enumerate(zip(layers, per, strict=True)):
        bh = b * H + head
        k_all = lc.keys if lc.distant is None else lc.values.new_zeros(lc.values.shape).index_copy_(
            0, (~lc.distant).nonzero().flatten(), lc.keys)
        p = ~sp
        K[:, 0].index_copy_(0, start[bh[p]] + r_p[p], k_all[p].to(dt))
        V[:, 0].index_copy_(0, start[bh[p]] + r_p[p], lc.values[p].to(dt))
        at = bh[sp] * M + r_s[sp]  # flat place in [BH * M]
        sk.view(-1, d).index_copy_(0, at, k_all[sp].float())
        sv.view(-1, d).index_copy_(0, at, lc.values[sp].float())
        bias.view(-1).index_copy_(0, at, lc.log_weights[sp].float())
        srow.view(-1).index_copy_(0, at, row[sp])
        if lc.recall is not None and lc.recall.num_groups > 0:
            merged.view(-1).index_copy_(0, at, lc.recall_ids[sp] >= 0)
        if lc.distant is not None:
            far.view(-1).index_copy_(0, at, lc.distant[sp])
        T = lc.tail_len
        if T:
            rows = slice(b * H, (b + 1) * H)
            slots = (start[rows] + torch.tensor(plain[rows], device=dev))[:, None] + torch.arange(T, device=dev)
            K[:, 0].index_copy_(0, slots.flatten(), lc.tail_keys[:, :T].reshape(H * T, d).to(dt))
            V[:, 0].index_copy_(0, slots.flatten(), lc.tail_values[:, :T].reshape(H * T, d).to(dt))
    plain_t = torch.tensor(plain, dtype=torch.long, device=dev)
    view = VarlenLayer(K, V, cu_k, (plain_t + torch.tensor(T0, dtype=torch.long, device=dev)).int(), plain,
                       start + plain_t, cap, H, sk, sv, bias, srow,
                       sp_merged=merged if any(lc.recall is not None and lc.recall.num_groups > 0 for lc in layers) else None,
                       max_k=max((n + t for n, t in zip(plain, T0, strict=True)), default=0),
                       num_special=max(nsp, default=0), stream_plain=[max(plain[b * H : (b + 1) * H]) for b in range(B)])
    if any(lc.distant is not None for lc in layers):
        _attach_distant(view, layers, base_layers, per, M)
        view.sp_distant = far
    return view


def _attach_distant(view: VarlenLayer, layers, base_layers, per, M: int) -> None:
    """PoD: a distant row's key in the explicit part is its base layer's key of the same token."""
    H = view.num_heads
    base = torch.full((len(layers) * H,), -1, dtype=torch.long)
    for bh, slots, keys, bl in distant_plans(layers, base_layers, H):
        b, h = divmod(bh, H)
        lc, r_s = layers[b], per[b][4]
        m = r_s[int(lc.head_offsets[h]) + slots]  # their places among the head's special rows
        view.sp_keys[bh].index_copy_(0, m, keys.float())
        base[bh] = bl
    view.dist_keys = view.sp_keys
    view.dist_base = base.to(view.keys.device)
    view.bases = tuple(sorted({int(x) for x in base.tolist() if x >= 0}))


def _explicit(q: Tensor, view: VarlenLayer, scaling: float, base_q: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The special rows: q [BH, X, d] -> logits [BH, X, M], out [BH, X, d], lse [BH, X] (fp32)."""
    logits = torch.baddbmm(view.sp_bias, q.float(), view.sp_keys.transpose(1, 2), alpha=scaling)
    if view.sp_distant is not None:
        if base_q is None:
            raise ValueError("this layer has PoD rows; pass its base layers' queries")
        far = torch.baddbmm(view.sp_bias, base_q.float(), view.sp_keys.transpose(1, 2), alpha=scaling)
        logits = torch.where(view.sp_distant[:, None, :], far, logits)
    lse = torch.logsumexp(logits, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return logits, torch.bmm(torch.exp(logits - safe[..., None]), view.sp_values), lse


# ---- decode -----------------------------------------------------------------------------
def varlen_decode(q: Tensor, view: VarlenLayer, n: int, scaling: float, base_q: Tensor | None = None,
                  thresholds: Tensor | None = None, kernel: Kernel | None = None
                  ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """`attention_paged.paged_decode` over a varlen view: q [BH, G, d], base_q the same layout
    (PoD), thresholds [BH, 1]; `n` is unused (the view's `used` says what the kernel reads).
    Returns out [BH, G, d] and the (row bh, row in head, share) of merged rows over threshold."""
    BH, G, d = q.shape
    kernel = kernel or cuda_kernel()
    cu_q = torch.arange(BH + 1, dtype=torch.int32, device=q.device)
    plain = _run(kernel, q, view.keys, view.values, cu_q, view.cu_k, 1, view.max_k, scaling, False, view.used)
    if not view.num_special:
        return plain[0].to(q.dtype), None
    logits, o_s, l_s = _explicit(q, view, scaling, base_q)
    out, lse = _merge([plain, (o_s, l_s)])
    if thresholds is None or view.sp_merged is None:
        return out.to(q.dtype), None
    share = torch.exp(logits - lse[..., None]).amax(1)  # [BH, M]: max over the head's query heads
    hit = ((share > thresholds.float()) & view.sp_merged).nonzero()  # [k, 2] (bh, m)
    rows = view.sp_row[hit[:, 0], hit[:, 1]]
    return out.to(q.dtype), (torch.stack([hit[:, 0], rows], 1), share[hit[:, 0], hit[:, 1]])


@dataclass
class VarlenStep:
    """One step's token places: at [layers, BH] slot in each layer's keys, used [layers, BH] int32
    the kernel's seqused_k after the write, max_k per layer (host), tail [BH] row in the tail blocks."""

    at: Tensor
    used: Tensor
    max_k: list[int]
    tail: Tensor


class VarlenDecodeViews(DecodeViews):
    """`attention_paged.DecodeViews` for a varlen kernel: the same lifetime and tails (built when
    the caches change, a layer is replaced, or a tail outgrows `cap`; caches held weakly), each
    layer's view a `VarlenLayer`, and each step writing the token into its tail slot of every
    (sequence, head) of a layer and into the caches' dense tails."""

    def _make_view(self, lcs: Sequence[LayerCache], base_layers: Sequence[Sequence[LayerCache]]) -> VarlenLayer:
        return build_varlen(lcs, self.cap, base_layers)

    def step_index(self) -> VarlenStep:
        """Where this step's token goes in every layer, once per step for all layers."""
        dev = self.positions.device
        H = self.H
        t = torch.tensor(self.lens, dtype=torch.long, device=dev).repeat_interleave(H)  # [BH]
        at = torch.stack([v.tail0 for v in self.views]) + t  # [layers, BH]
        plain = torch.stack([v.tail0 - v.cu_k[:-1].long() for v in self.views])
        max_k = [max(p + t + 1 for p, t in zip(v.stream_plain, self.lens, strict=True)) for v in self.views]
        return VarlenStep(at, (plain + t + 1).int(), max_k, torch.arange(t.numel(), device=dev) * self.cap + t)

    def write(self, i: int, idx: VarlenStep, k: Tensor, v: Tensor) -> tuple[VarlenLayer, int]:
        """Put this step's keys/values [BH, d] of layer i into their slots (the view and the caches'
        tails); returns the view and its longest sequence."""
        view = self.views[i]
        view.keys[:, 0].index_copy_(0, idx.at[i], k.to(view.keys.dtype))
        view.values[:, 0].index_copy_(0, idx.at[i], v.to(view.values.dtype))
        view.used, view.max_k = idx.used[i], idx.max_k[i]
        tk, tv = self.tails[i]
        tk.view(-1, k.shape[-1]).index_copy_(0, idx.tail, k)
        tv.view(-1, k.shape[-1]).index_copy_(0, idx.tail, v)
        return view, view.max_k


# ---- prefill of a segment on a cache ----------------------------------------------------
def varlen_layer_view(lc: LayerCache, bases: Sequence[LayerCache] | None = None, dtype: torch.dtype | None = None,
                      scored: int = 0) -> VarlenLayer:
    """The one-sequence varlen view of lc (tail slots exactly its tail), cached on lc until it changes."""
    ident = (lc.keys, lc.values, lc.head_offsets, lc.log_weights, lc.recall_ids, lc.distant, lc.tail_keys, lc.tail_len)
    if lc.distant is not None and bases is not None:
        ident += tuple(x for b in lc.distant_from if b >= 0 for x in (bases[b].keys, bases[b].positions, bases[b].head_offsets))
    ident += (dtype, scored)
    hit = lc.__dict__.get("_varlen_view")
    if hit is not None and len(hit[0]) == len(ident) and all(
            x is y if isinstance(x, Tensor) else x == y for x, y in zip(hit[0], ident, strict=True)):
        return hit[1]
    view = build_varlen([lc], lc.tail_len, [bases] if bases is not None else None, dtype, scored)
    lc._varlen_view = (ident, view)
    return view


def varlen_prefill(q: Tensor, view: VarlenLayer, new_keys: Tensor, new_values: Tensor, scaling: float,
                   base_q: dict[int, Tensor] | None = None, kernel: Kernel | None = None, scored: int = 0,
                   query_from: int = 0) -> tuple[Tensor, Tensor | None]:
    """`attention.view_prefill` over a one-sequence varlen view: q [Hq, C, d], new_keys/new_values
    [Hkv, C, d], base_q base layer -> its queries [Hq, C, d] (PoD). Returns out [Hq, C, d] and,
    with `scored` (the view built with the same `scored`), scores [Hkv, scored] fp32: the largest
    probability any query row >= query_from of a head's group gave each of its last `scored` rows."""
    Hq, C, d = q.shape
    H = new_keys.shape[0]
    G = Hq // H
    kernel = kernel or cuda_kernel()
    qv = q.view(H, G, C, d).transpose(1, 2).reshape(H * C, G, d)  # [H*C, G, d]: sequence h, position c, head g
    cu_q = torch.arange(H + 1, dtype=torch.int32, device=q.device) * C
    cached = _run(kernel, qv, view.keys, view.values, cu_q, view.cu_k, C, view.max_k, scaling, False, view.used)
    new = _run(kernel, qv, new_keys.reshape(H * C, 1, d).to(view.keys.dtype), new_values.reshape(H * C, 1, d).to(view.keys.dtype),
               cu_q, cu_q, C, C, scaling, True, None)
    bq = None
    if view.sp_distant is not None:
        from headwise.attention import _base_rows

        bq = _base_rows(view, {b: x.view(H, G, C, d).transpose(1, 2).reshape(H, C * G, d) for b, x in (base_q or {}).items()})
    logits, o_s, l_s = _explicit(qv.reshape(H, C * G, d), view, scaling, bq)  # rows (c, g) of each head
    out, lse = _merge([cached, new, (o_s.reshape(H * C, G, d), l_s.reshape(H * C, G))])
    out = out.view(H, C, G, d).transpose(1, 2).reshape(Hq, C, d).to(q.dtype)
    if not scored:
        return out, None
    p = torch.exp(logits - lse.reshape(H, C * G, 1)).view(H, C, G, -1)[:, query_from:]  # [H, C', G, M]
    return out, _scored_rows(p.amax(1).amax(1), view, scored)  # max over query rows, then over the group


def _scored_rows(share: Tensor, view: VarlenLayer, scored: int) -> Tensor:
    """[H, scored]: the shares of each head's last `scored` rows, which are its last special rows."""
    valid = torch.isfinite(view.sp_bias[:, 0])  # [H, M] held special slots (padding is -inf)
    n = valid.sum(1, keepdim=True)  # [H, 1]
    idx = n - scored + torch.arange(scored, device=share.device)  # [H, scored]
    return share.gather(1, idx).float()


def varlen_prefill_attention(q: Tensor, layer: LayerCache | None, new_keys: Tensor, new_values: Tensor, scaling: float,
                             base: BaseQueries | None = None, kernel: Kernel | None = None) -> Tensor:
    """`attention.ragged_prefill_attention` through the varlen kernel (same arguments, same result)."""
    if layer is None or layer.num_rows == 0:
        G = q.shape[0] // new_keys.shape[0]
        k, v = new_keys.repeat_interleave(G, 0), new_values.repeat_interleave(G, 0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]
    view = varlen_layer_view(layer, base.layers if base is not None else None)
    return varlen_prefill(q, view, new_keys, new_values, scaling, base.queries if base is not None else None, kernel)[0]


def varlen_attention_scores(q: Tensor, layer: LayerCache, new_keys: Tensor, new_values: Tensor, scaling: float,
                            scored: int, query_from: int = 0, base: BaseQueries | None = None,
                            kernel: Kernel | None = None) -> tuple[Tensor, Tensor]:
    """`attention.prefill_attention_scores` through the varlen kernel: the scored rows go to the
    explicit part, whose probabilities are exact (exp(logit - lse))."""
    if layer.tail_len:
        raise ValueError("prefill_attention_scores needs a compacted layer (no decode tail)")
    view = varlen_layer_view(layer, base.layers if base is not None else None, scored=scored)
    return varlen_prefill(q, view, new_keys, new_values, scaling, base.queries if base is not None else None, kernel,
                          scored, query_from)


# ---- selection --------------------------------------------------------------------------
FLASH_DTYPES = (torch.float16, torch.bfloat16)


def use_varlen(device: torch.device | str, dtype: torch.dtype | None = None) -> bool:
    """The varlen path applies: a CUDA device, a dtype Flash Attention takes, and the kernel in torch."""
    return torch.device(device).type == "cuda" and (dtype is None or dtype in FLASH_DTYPES) and cuda_kernel() is not None


def select_decode_attention(device: torch.device | str, dtype: torch.dtype | None = None, kernel: Kernel | None = None):
    """(views class, decode function) for `ModelRunner.decode_batch`: `VarlenDecodeViews` and
    `varlen_decode` where `use_varlen` holds or a kernel is given, else the paged CPU path."""
    if kernel is None and not use_varlen(device, dtype):
        from headwise.attention_paged import DecodeViews, paged_decode

        return DecodeViews, paged_decode
    return VarlenDecodeViews, functools.partial(varlen_decode, kernel=kernel)


def select_prefill_attention(device: torch.device | str, dtype: torch.dtype | None = None, kernel: Kernel | None = None):
    """`ragged_prefill_attention`'s replacement for the prefill on a cache, chosen like the decode's."""
    if kernel is None and not use_varlen(device, dtype):
        from headwise.attention import ragged_prefill_attention

        return ragged_prefill_attention
    return functools.partial(varlen_prefill_attention, kernel=kernel)
