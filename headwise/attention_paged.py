"""Decode attention of B caches over paged views: every (stream, KV head) reads only its own rows.

A `PagedView` holds one layer of B caches in pages of PAGE slots. (stream b, KV head h) is row
bh = b * Hkv + h and owns the slots [0, n_bh) (its ragged rows, in head order) then
[n_bh, n_bh + cap) (its decode tail), cut into pages of PAGE consecutive slots (a PoD head's
distant rows, which hold no key of their own, come first in pages of their own: see below); a page is
one batch entry of the two batched matmuls, so a short head costs its own pages, not the
layer's longest head (a padded `[B*Hkv, L, d]` block read 1.66 slots per kept row with
kvzip at kept 0.25 on the default model; pages read 1 + PAGE / (2 n) on average).

Pages are stored in the order they become needed: a page holding only tail slots joins the
computation on the step its first slot is written. Because all B streams advance one token
per step together, the pages a step needs are always a prefix of the arena (`active`), so a
step reads no unwritten tail page. Keys are stored transposed per page (`[N, d, PAGE]`):
`q @ K` then runs MKL's plain (NN) kernel, about twice as fast here as `q @ K^T` over
row-major keys (bench/engine_formulations.py).

Per layer and step: q gathered per page, `baddbmm(bias, q, K)` -> logits `[n, G, PAGE]` (in a
preallocated buffer), each page's max put at its place in a `[B*Hkv*J, G]` buffer (J pages per
row at most; places of pages not read stay -inf) and one max per row over its pages, the
exponentials summed per row with `index_add_`, `bmm` with V and `index_add_` per row, divided by
the sums. Logits are G / (2 d) of the K/V bytes (3/128 on the default model); the K/V reads,
which dominate, touch only held rows. Exact per head: the same softmax over the same logits.
Log-weights live in the bias; the recall watch reads the softmax row.

PoD: a distant row's logit is the base layer's q_base . K_base, the same in every layer of the
block, and the base layer's own product computes it (the base head holds the key of every
token of the block). So a base layer keeps its step's logits without their bias (`raw`, one
subtraction over its `[n, G, PAGE]` logits), and a later layer of its block takes the logits of
its distant rows from there (`torch.take` by an index built with the view) and adds its own
log-weights. A layer's distant rows sit in the first pages of its arena, which hold values and
bias but no keys: no key slot is read for a row that has no key, and the base layer's keys of
a block are read once per step (by the base layer's own product), however many layers share
them. The logits of the softmax are the same per head, so the result is exact.

The caches' decode tails stay dense (`LayerCache.tail_keys` is a view of a `[B*Hkv, cap, d]`
block per layer) and are written beside the pages each step, so `compacted()`, recall and
storage read the same rows as before.
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from headwise.attention_common import MergedShare, distant_heads
from headwise.cache.compact import LayerCache

PAGE = 32  # slots per page: waste is PAGE / 2 slots per (stream, head) on average, calls n / PAGE (32 against 64:
# 16-stream decode 1-3% faster for the ragged policies, pod the most; one stream and full level, docs/engine.md)


@dataclass
class PagedView:
    """One layer of B caches in pages (see the module docstring). BH = B * Hkv, N pages, C = PAGE.

    keys [N - nd, d, C] (each page's keys transposed; the first nd pages hold none), values
    [N, C, d], bias [N, 1, C]: log-weight of a held row, 0 on a written tail slot, -inf
    elsewhere. page_bh, page_j [N]: each page's row and its index among the row's pages; act:
    the step (since the build) from which each page is needed, ascending. tail_at [BH, cap]:
    where tail slot t of a row lives (page * C + column). pad_index [N] = page_bh * J + page_j,
    page_max [BH*J, G] each page's logit max (-inf for pages not yet read), scratch [N, G, C]
    the logits. merged [N, C]: slots of merged rows (recall watch), row_at [N, C] the row
    within its head each slot holds (with merged only). where [BH, J]: the arena page of page j
    of row bh.

    PoD: a layer's distant rows sit in its first nd pages (grouped by base layer, then by row),
    which hold values and bias but no keys. shares: per base layer, (base layer, that layer's
    `raw`, first page, end page, src [p1 - p0, G, C]): the logit of slot (page, g, column) is
    raw.flatten()[src] plus the slot's bias (a padding slot points at a real row of its page
    and has bias -inf). raw [N, G, C] on a layer whose logits later layers read: its step's
    logits without the bias (allocated when the first such layer's view is built); shares_from
    the base layers read. bases: the layers whose queries the view needs, always none here (the
    logits are shared instead); the attribute is the decode interface's (attention_varlen).
    """

    keys: Tensor
    values: Tensor
    bias: Tensor
    page_bh: Tensor
    page_j: Tensor
    act: list[int]
    tail_at: Tensor
    pad_index: Tensor
    page_max: Tensor
    scratch: Tensor
    num_heads: int
    built_at: int = 0  # DecodeViews.steps when built
    merged: Tensor | None = None
    row_at: Tensor | None = None
    where: Tensor | None = None
    nd: int = 0
    shares: tuple[tuple[int, Tensor, int, int, Tensor], ...] = ()
    raw: Tensor | None = None
    shares_from: tuple[int, ...] = ()
    bases: tuple[int, ...] = ()

    def active(self, steps: int) -> int:
        """Pages needed on the step `steps` (DecodeViews.steps) : a prefix of the arena."""
        return bisect.bisect_right(self.act, steps - self.built_at)


def _distant_rows(layers: Sequence[LayerCache], base_layers, H: int) -> list[tuple[int, int, Tensor, Tensor, Tensor]]:
    """PoD over B streams' layers: for every (stream b, head h) with distant rows, (base layer,
    b * H + h, the distant rows' indices within the head, the base head's rows of their tokens
    (within the head), the log-weights of those base rows)."""
    out = []
    for b, h, bl, base, distant, rows in distant_heads(layers, base_layers, H):
        k0 = int(base.key_offsets()[h])  # the base head holds a key for each of its rows: key index = row + k0
        if isinstance(rows, slice):
            rows = torch.arange(rows.start, rows.stop, device=distant.device)
        within = rows - k0
        out.append((bl, b * H + h, distant, within, base.log_weights[base.head_offsets[h] + within]))
    return out


def build_paged(layers: Sequence[LayerCache], cap: int, G: int, base_layers: Sequence[Sequence[LayerCache]] | None = None,
                dtype: torch.dtype | None = None, base_views: dict[int, PagedView] | None = None) -> PagedView:
    """The paged view of one layer of B caches (`layers[b]`), with `cap` tail slots per row (the
    first tail_len of them filled from each layer's tail). PoD rows need the caches' layers
    (`base_layers[b]`) and the views of the base layers (`base_views`, built before: the
    distant logits are read from their `raw`). Runs once per cache change: the host reads and
    the copies here are paid once, not per step."""
    lc0 = layers[0]
    H, d, C = lc0.num_heads, lc0.head_dim, PAGE
    BH = len(layers) * H
    dev, dt = lc0.values.device, dtype or lc0.values.dtype
    pod = any(lc.distant is not None for lc in layers)
    lens = torch.cat([lc.head_offsets[1:] - lc.head_offsets[:-1] for lc in layers]).tolist()  # [BH] host, once
    T0 = [lc.tail_len for lc in layers for _ in range(H)]
    if max(T0, default=0) > cap:
        raise ValueError(f"a view of {cap} tail slots cannot hold a tail of {max(T0)} rows")
    # PoD: (base layer, bh, distant rows within the head, the base head's rows of their tokens, their log-weights)
    plans = _distant_rows(layers, base_layers, H) if pod else []
    if plans and (base_views is None or any(p[0] not in base_views for p in plans)):
        raise ValueError(f"distant rows take their logits from layers {sorted({p[0] for p in plans})}; pass their views")
    nd = [0] * BH
    base_of = [-1] * BH
    first = [0] * BH  # the base head's first page that holds one of the distant rows' tokens
    dpages = [0] * BH  # distant pages of the row: they mirror the base head's pages first .. first + dpages - 1
    for bl, bh, rows, within, _ in plans:
        nd[bh], base_of[bh] = rows.numel(), bl
        lo, hi = (int(x) for x in torch.aminmax(within))
        first[bh], dpages[bh] = lo // C, hi // C - lo // C + 1
    nk = [n - m for n, m in zip(lens, nd, strict=True)]  # own rows: keyed, then the tail after them
    npages = [p + -(-(k + cap) // C) for p, k in zip(dpages, nk, strict=True)]  # then the own slots
    J = max(npages)
    # distant pages first (by base layer, row), then the others by the step (since the build) from
    # which they are needed: own page j of row bh when the tail reaches its first slot
    order = sorted(((0, 0, base_of[bh], bh, j) if j < p else (max(0, (j - p) * C - k - t), 1, 0, bh, j))
                   for bh, (k, t, p, q) in enumerate(zip(nk, T0, dpages, npages, strict=True)) for j in range(q))
    N = len(order)
    n_dist = sum(dpages)
    page_bh = torch.tensor([o[3] for o in order], dtype=torch.long)
    page_j = torch.tensor([o[4] for o in order], dtype=torch.long)
    where = torch.full((BH, J), -1, dtype=torch.long)  # page index in the arena of (row, j)
    where[page_bh, page_j] = torch.arange(N)
    where = where.to(dev)

    def flat(bh: Tensor, slot: Tensor) -> Tensor:
        """Flat place (page * C + column) in the arena of slot `slot` of row `bh`."""
        return where[bh, slot // C] * C + slot % C

    K = torch.zeros(N * C, d, dtype=dt, device=dev)  # natural layout while filling; transposed per page below
    V = torch.zeros_like(K)
    bias = torch.full((N * C,), float("-inf"), dtype=dt, device=dev)
    merged = torch.zeros(N * C, dtype=torch.bool, device=dev)
    row_at = torch.full((N * C,), -1, dtype=torch.long, device=dev)  # row within its head of each slot (recall)
    own0 = torch.tensor(dpages, dtype=torch.long, device=dev) * C  # first own slot of each row (after its distant pages)
    nk_t = own0 + torch.tensor(nk, dtype=torch.long, device=dev)  # first tail slot of each row
    for b, lc in enumerate(layers):
        off = lc.head_offsets
        R = lc.values.shape[0]
        head = torch.repeat_interleave(torch.arange(H, device=dev), off[1:] - off[:-1], output_size=R)
        row = torch.arange(R, device=dev) - off[head]  # [R] row index within its head
        if lc.distant is None:
            slot = own0[b * H + head] + row
        else:  # a distant row at its base row's slot in the mirrored pages, keyed rows after them in head order
            dist = lc.distant.long()
            before = torch.cat([dist.new_zeros(1), dist.cumsum(0)])  # distant rows before each row (and the end)
            db = before[:R] - before[off[head]]  # distant rows before this one within its head
            mirror = torch.zeros(R, dtype=torch.long, device=dev)
            for _, bh, rows, within, _ in (p for p in plans if p[1] // H == b):
                mirror[off[bh % H] + rows] = within - first[bh] * C
            slot = torch.where(lc.distant, mirror, own0[b * H + head] + row - db)
        at = flat(b * H + head, slot)
        keyed = at if lc.distant is None else at[~lc.distant]
        K.index_copy_(0, keyed, lc.keys.to(dt))
        V.index_copy_(0, at, lc.values.to(dt))
        bias.index_copy_(0, at, lc.log_weights.to(dt))
        if lc.distant is not None:  # the base layer's logits carry its rows' log-weights: take them off
            for _, bh, rows, _, base_lw in (p for p in plans if p[1] // H == b):
                i = at[off[bh % H] + rows]
                bias.index_copy_(0, i, (lc.log_weights[off[bh % H] + rows] - base_lw).to(dt))
        if lc.recall is not None and lc.recall.num_groups > 0:  # watched for recall only when originals exist
            m = lc.recall_ids >= 0
            merged.index_fill_(0, at[m], True)
            row_at.index_copy_(0, at, row)
        T = lc.tail_len
        if T:
            bh = (b * H + torch.arange(H, device=dev))[:, None].expand(H, T)
            at = flat(bh, nk_t[b * H : (b + 1) * H, None] + torch.arange(T, device=dev))  # [H, T]
            K.index_copy_(0, at.flatten(), lc.tail_keys[:, :T].reshape(H * T, d).to(dt))
            V.index_copy_(0, at.flatten(), lc.tail_values[:, :T].reshape(H * T, d).to(dt))
            bias[at.flatten()] = 0
    tail = flat(torch.arange(BH, device=dev)[:, None].expand(BH, cap), nk_t[:, None] + torch.arange(cap, device=dev))
    page_bh, page_j = page_bh.to(dev), page_j.to(dev)
    has_merged = bool(merged.any())
    view = PagedView(
        K.view(N, C, d)[n_dist:].transpose(1, 2).contiguous(), V.view(N, C, d), bias.view(N, 1, C), page_bh, page_j,
        [o[0] for o in order], tail, page_bh * J + page_j,
        torch.full((BH * J, G), float("-inf"), dtype=dt, device=dev), torch.empty(N, G, C, dtype=dt, device=dev), H,
        merged=merged.view(N, C) if has_merged else None, row_at=row_at.view(N, C) if has_merged else None,
        where=where, nd=n_dist,
    )
    if plans:  # distant page i mirrors page `first + j` of its row in the base layer's arena
        src = torch.tensor([base_views[o[2]].where[o[3], first[o[3]] + o[4]] for o in order[:n_dist]], dtype=torch.long)
        page_base = [o[2] for o in order[:n_dist]]
        shares = []
        for bl in sorted(set(page_base)):
            p0, p1 = page_base.index(bl), len(page_base) - page_base[::-1].index(bl)
            bv = base_views[bl]
            if bv.raw is None:
                bv.raw = torch.empty_like(bv.scratch)
            shares.append((bl, bv.raw, p0, p1, src[p0:p1].to(dev)))
        view.shares = tuple(shares)
        view.shares_from = tuple(s[0] for s in shares)
    return view


def paged_decode(q: Tensor, view: PagedView, n: int, scaling: float, base_q: Tensor | None = None,
                 thresholds: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """One decode step of B sequences over the first n pages: q [BH, G, d] (sequence-major, then
    KV head, then group). base_q: not read (PoD's distant logits come from the base layers'
    views, which ran earlier in the step); the argument is the decode interface's.
    Returns the output [BH, G, d] and, when `thresholds` [BH, 1] is given and the view has merged
    rows, the (row bh, row within the head, share) of every merged row whose share passed its
    row's threshold (one device sync per layer, only then)."""
    BH, G, d = q.shape
    pb = view.page_bh[:n]
    nd = view.nd
    # the logits [n, G, C]: in `raw` where later layers read them, else in the scratch the softmax runs in
    s = view.raw[:n] if view.raw is not None else view.scratch[:n]
    for _, raw, p0, p1, src in view.shares:  # PoD: the base layer's logits of the mirrored pages
        torch.index_select(raw, 0, src, out=s[p0:p1])
    if nd:
        s[:nd].add_(view.bias[:nd])  # the row's log-weight less the base row's (-inf on slots it does not hold)
    torch.baddbmm(view.bias[nd:n], q.index_select(0, pb[nd:]), view.keys[: n - nd], alpha=scaling, out=s[nd:])
    # one max per (row, query head) over its pages: the softmax of the row, in pages
    view.page_max.index_copy_(0, view.pad_index[:n], s.amax(-1))  # [BH*J, G]; places of later pages stay -inf
    top = view.page_max.view(BH, -1, G).amax(1)  # [BH, G]
    if view.raw is not None:  # keep the logits: the exponentials go to the scratch
        s = torch.sub(s, top.index_select(0, pb)[..., None], out=view.scratch[:n]).exp_()
    else:
        s.sub_(top.index_select(0, pb)[..., None]).exp_()
    z = q.new_zeros(BH, G).index_add_(0, pb, s.sum(-1))  # [BH, G] softmax denominators
    out = q.new_zeros(BH, G, d).index_add_(0, pb, torch.bmm(s, view.values[:n])).div_(z[..., None])
    if thresholds is None or view.merged is None:
        return out, None
    share = s.div_(z.index_select(0, pb)[..., None]).amax(1)  # [n, C]: max over the head's query heads
    hit = ((share > thresholds.index_select(0, pb)) & view.merged[:n]).nonzero()  # [k, 2] (page, column)
    bh = pb[hit[:, 0]]
    return out, (torch.stack([bh, view.row_at[hit[:, 0], hit[:, 1]]], 1), share[hit[:, 0], hit[:, 1]])


def paged_shares(hits: tuple[Tensor, Tensor] | None, H: int) -> list[tuple[int, MergedShare]]:
    """(sequence, MergedShare) of every hit of paged_decode (host side): a slot is the row itself."""
    if hits is None or not hits[0].numel():
        return []
    return [(bh // H, MergedShare(bh % H, s, x)) for (bh, s), x in zip(hits[0].tolist(), hits[1].tolist(), strict=True)]


@dataclass
class StepIndex:
    """One step's token places: at [layers, BH] flat slot in each layer's pages, key_at
    [layers, BH * d] flat places of its key elements (keys are transposed per page), tail [BH]
    its row in the caches' tail blocks [BH * cap, d]."""

    at: Tensor
    key_at: Tensor
    tail: Tensor


class DecodeViews:
    """The paged views of B caches being decoded together, kept across steps.

    Built when the set of caches changes, a layer changes (recall), or a tail outgrows its
    capacity (it doubles); each step then writes the new token into its tail slot of every
    (sequence, head) of a layer with one indexed write per tensor, in the pages and in the
    caches' dense tails (`LayerCache.tail_keys` etc. are views of a block per layer, so
    `compacted()`, recall and storage see the same rows). The pages hold a copy of the held
    rows while the views live. The caches are held weakly: once one is gone the views are
    dropped and rebuilt on demand.
    """

    def __init__(self, caches: Sequence, cap: int, G: int):
        self.refs = [weakref.ref(c) for c in caches]
        self.cap, self.G = cap, G
        for c in caches:
            weakref.finalize(c, self._drop)
        lc0 = caches[0].layers[0]
        self.H = lc0.num_heads
        dev = lc0.values.device
        self.positions = torch.zeros(len(caches), cap, dtype=torch.long, device=dev)
        self.views: list[PagedView] = []
        self.tails: list[tuple[Tensor, Tensor]] = []  # per layer: the caches' tail keys, values [BH, cap, d]
        self.layers: list[list[tuple[LayerCache, Tensor]]] = []  # per layer: (layer, its tail keys) as installed
        self.last_use: dict[int, int] = {}  # PoD: base layer -> the last layer that needs its queries
        for c in caches:
            for b, last in c.shared_bases().items():
                self.last_use[b] = max(self.last_use.get(b, -1), last)
        self.steps = 0
        self.lens = [c.layers[0].tail_len for c in caches]
        for i in range(caches[0].num_layers):
            self._build(i, caches)

    def _drop(self) -> None:
        self.refs, self.views, self.layers, self.tails = [], [], [], []

    def _build(self, i: int, caches: Sequence) -> None:
        lcs = [c.layers[i] for c in caches]
        H, d = self.H, lcs[0].head_dim
        for b, lc in enumerate(lcs):
            if lc.tail_len:
                self.positions[b, : lc.tail_len] = lc.tail_positions[: lc.tail_len]
        view = self._make_view(lcs, [c.layers for c in caches])
        view.built_at = self.steps
        tk = lcs[0].values.new_zeros(len(lcs) * H, self.cap, d)
        tv = torch.zeros_like(tk)
        for b, lc in enumerate(lcs):  # the tails now live in the block
            T = lc.tail_len
            if T:
                tk[b * H : (b + 1) * H, :T] = lc.tail_keys[:, :T]
                tv[b * H : (b + 1) * H, :T] = lc.tail_values[:, :T]
            lc.tail_keys, lc.tail_values = tk[b * H : (b + 1) * H], tv[b * H : (b + 1) * H]
            lc.tail_positions = self.positions[b]
        installed = [(lc, lc.tail_keys) for lc in lcs]
        if i < len(self.views):
            self.views[i], self.layers[i], self.tails[i] = view, installed, (tk, tv)
        else:
            self.views.append(view)
            self.layers.append(installed)
            self.tails.append((tk, tv))

    def _make_view(self, lcs: Sequence[LayerCache], base_layers: Sequence[Sequence[LayerCache]]) -> PagedView:
        """One layer's view of the B caches (a subclass holds another layout: attention_varlen).
        PoD: the views of the earlier layers are built already (their logits are shared)."""
        return build_paged(lcs, self.cap, self.G, base_layers, base_views=dict(enumerate(self.views)))

    def fits(self, caches: Sequence) -> bool:
        """The same caches, in the same order, untouched since the last step, with a free slot."""
        if len(caches) != len(self.refs) or any(r() is not c for r, c in zip(self.refs, caches, strict=True)):
            return False
        return all(c.layers[0].tail_len == t and t < self.cap for c, t in zip(caches, self.lens, strict=True))

    def refresh(self, caches: Sequence) -> None:
        """Rebuild the views of layers replaced since the last step (recall swaps a layer object),
        and of the layers that read a rebuilt layer's logits or queries (PoD)."""
        rebuilt: set[int] = set()
        for i, installed in enumerate(self.layers):
            deps = set(getattr(self.views[i], "shares_from", ())) | set(getattr(self.views[i], "bases", ()))
            if deps & rebuilt or any(c.layers[i] is not lc or lc.tail_keys is not tk
                                     for c, (lc, tk) in zip(caches, installed, strict=True)):
                self._build(i, caches)
                rebuilt.add(i)

    def step_index(self) -> "StepIndex":
        """Where this step's token goes in every layer, computed once per step for all layers."""
        dev = self.positions.device
        B, H, cap = len(self.lens), self.H, self.cap
        bh = torch.arange(B * H, device=dev)
        t = torch.tensor(self.lens, dtype=torch.long, device=dev).repeat_interleave(H)  # [BH]
        at = torch.stack([v.tail_at for v in self.views])[:, bh, t]  # [layers, BH]: page * C + column
        d = self.views[0].values.shape[-1]
        C = PAGE
        # keys are [N - nd, d, C] (pages nd.. of the arena): element j of a key at (page - nd) * d * C + j * C + column
        nd = torch.tensor([v.nd for v in self.views], dtype=torch.long, device=dev)[:, None]
        key_at = ((at // C - nd) * (d * C) + at % C)[:, :, None] + torch.arange(d, device=dev) * C  # [layers, BH, d]
        return StepIndex(at, key_at.flatten(1), bh * cap + t)

    def write(self, i: int, idx: "StepIndex", k: Tensor, v: Tensor) -> tuple[PagedView, int]:
        """Put this step's keys/values [BH, d] of layer i into their slots (pages and the caches'
        tails); returns the view and the number of pages this step reads."""
        view = self.views[i]
        at = idx.at[i]
        view.keys.view(-1).index_copy_(0, idx.key_at[i], k.reshape(-1))
        view.values.view(-1, k.shape[-1]).index_copy_(0, at, v)
        view.bias.view(-1).index_fill_(0, at, 0)
        tk, tv = self.tails[i]
        tk.view(-1, k.shape[-1]).index_copy_(0, idx.tail, k)
        tv.view(-1, k.shape[-1]).index_copy_(0, idx.tail, v)
        return view, view.active(self.steps)

    def advance(self, caches: Sequence, pos: Tensor) -> None:
        """After the step: positions [B] recorded, every layer's tail one longer."""
        B = len(caches)
        self.positions[torch.arange(B, device=pos.device), torch.tensor(self.lens, device=pos.device)] = pos
        for b, c in enumerate(caches):
            for lc in c.layers:
                lc.tail_len += 1
            self.lens[b] += 1
        self.steps += 1
