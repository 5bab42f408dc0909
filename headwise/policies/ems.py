from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from headwise.errors import InvalidInput
from headwise.policies.base import (
    Capture,
    CompressContext,
    HeadRows,
    LayerState,
    ModelScopedPolicy,
    check_budget,
    check_ints,
    forced_window,
    keep_all,
    keep_top,
    keep_top_global,
    optional,
    query_aware_defaults,
    rows_cache,
)
from headwise.policies.scoring import (
    ModelNorm,
    check_scope,
    check_signal,
    group_reduce,
    mix,
    model_scores,
    observation,
    pool1d,
    signal_capture,
)

LOG_WEIGHTS = ("none", "count", "mass")


@dataclass(frozen=True)
class HeadMerge:
    """One head's evict-then-merge plan: row indices into the segment."""

    centers: Tensor  # [n_c] important rows, kept (as class centres)
    members: Tensor  # [n_tbm] to-be-merged rows
    assign: Tensor  # [n_tbm] centre slot of each member; n_c = the zero class (dropped)


@dataclass(frozen=True)
class EMSPolicy(ModelScopedPolicy):
    """EMS (ALGORITHMS.md 3, a [P] reconstruction): global-local score, evict-then-merge, zero class.

    Score = lam * global + (1 - lam) * local, each mean-aligned over the prefix: global is
    the segment's causal column sum divided by the number of queries that see each key
    (ObservedAttention-style, removes the causal bias), local the SnapKV window sum. Per
    head the top B - window rows (sinks forced) are class centres; the next 2B candidates
    are scored for redundancy with the centres (relu cos K x relu cos V); a head-adaptive
    count round(M redundancy (1 - sparsity)) of them is merged into its most similar
    centre (score-weighted mean of values, key directions averaged with the centre's norm
    kept), a member with similarity <= tau to every centre goes to the zero class
    (dropped), the rest are evicted. Every head holds exactly B rows. Merged rows carry a
    recall handle to all their originals (centre included); `log_weight` = "none" ([P]
    default), "count" (log of tokens merged) or "mass" (log of score mass / centre score).
    """

    name = "ems"
    window: int = 32
    sinks: int = 4
    # unset: the regime's default, 0.5 ([P]) in the reuse regime, `query_aware_lam` in the query-aware one
    lam: float | None = None
    tau: float = 0.0
    candidates: float = 2.0
    log_weight: str = "none"
    # the local score's observation signal: window, kvzip, kvzap or window+kvzip; unset: the
    # regime's (window; `query_aware_signal` in the query-aware regime)
    signal: str | None = optional(None)
    query_aware_signal: ClassVar[str] = "window+kvzip"  # tuned on bench.quality --text stdlib
    query_aware_lam: ClassVar[float] = 0.0
    # [P] SnapKV's average pooling of the score (0: none); unset: the regime's default, 0 (the
    # reconstruction's) in the reuse regime, 7 in the query-aware one (tuned on --text stdlib)
    kernel: int | None = optional(None)
    # [P] "model": the class centres are the model's best rows ranked at once (KVzip's global
    # ranking; the score's parts over model-wide means), then each head merges into its own; "head":
    # every head B rows (the paper's). Unset: "head", and `query_aware_scope` in the query-aware regime
    scope: str | None = optional(None)
    weight: float | None = optional(None)  # the reconstruction's share of the window+kvzip mix (None: 0.5)
    query_aware_scope: ClassVar[str] = "model"  # tuned on bench.quality --text stdlib (docs/policies.md)
    query_aware_weight: ClassVar[float | None] = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, window=self.window, sinks=self.sinks)
        if self.kernel is not None:
            check_ints(self, kernel=self.kernel)
        for attr, lo, hi in (("lam", 0.0, 1.0), ("tau", -1.0, 1.0), ("candidates", 0.0, 64.0)):
            v = getattr(self, attr)
            if attr == "lam" and v is None:
                continue
            if not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise InvalidInput(f"policy 'ems': {attr}={v!r} must be in [{lo}, {hi}]")
        if self.log_weight not in LOG_WEIGHTS:
            raise InvalidInput(f"policy 'ems': log_weight={self.log_weight!r}; allowed: {', '.join(LOG_WEIGHTS)}")
        check_signal(self, self.signal)
        check_scope(self, self.scope, self.weight)

    @property
    def capture(self) -> Capture:
        return signal_capture(self.signal, self.window).merge(Capture(column_sums=True))

    def query_aware_form(self) -> "EMSPolicy":
        return query_aware_defaults(self)

    def score(self, state: LayerState, model_id: str = "", norm: ModelNorm | None = None) -> Tensor:
        """Global-local score [Hkv, S], >= 0 (`norm`: scope "model", the parts over model-wide means)."""
        S, W, H = state.num_tokens, self.window, state.num_kv_heads
        if state.column_sums is None:
            raise InvalidInput("policy 'ems' needs column sums; prefill with the policy's capture")
        seen_by = torch.arange(S, 0, -1, device=state.keys.device, dtype=torch.float32)
        g = group_reduce(state.column_sums.float() / seen_by, H)
        loc = observation(state, self.signal, W, model_id, weight=self.weight, norm=norm)
        lam = self.lam_for(state)
        if norm is not None:
            return pool1d(mix(g, loc, weights=(2 * lam, 2 * (1 - lam)), norm=norm, tag="ems"), self.kernel_for(state), "avg")
        p = max(1, S - forced_window(state, W))
        g = g / g[:, :p].mean(-1, keepdim=True).clamp_min(1e-30)
        loc = loc / loc[:, :p].mean(-1, keepdim=True).clamp_min(1e-30)
        return pool1d(lam * g + (1 - lam) * loc, self.kernel_for(state), "avg")

    def lam_for(self, state: LayerState) -> float:
        """The global score's share in force: the setting, else `query_aware_lam` in the query-aware
        regime and 0.5 in the reuse one."""
        if self.lam is not None:
            return self.lam
        return self.query_aware_lam if state.window_keys is not None else 0.5

    def params(self) -> dict:
        """`lam` unset is the reuse regime's 0.5 in the segment key (stored caches keep their keys;
        query-aware caches are never stored)."""
        out = super().params()
        if out.get("lam") is None:
            out["lam"] = 0.5
        return out

    def kernel_for(self, state: LayerState) -> int:
        """The pooling kernel in force: the setting, else 7 in the query-aware regime and 0 (none) in the reuse one."""
        if self.kernel is not None:
            return self.kernel
        return 7 if state.window_keys is not None else 0

    def plan(self, keys: Tensor, values: Tensor, score: Tensor, n_c: int, budget: int | None = None) -> HeadMerge:
        """Classes of one head over its prefix rows. keys/values [P, d]; score [P]; the candidates
        are `candidates` x the head's budget (n_c + window by default)."""
        centers = keep_top(score[None], n_c - self.sinks, self.sinks, 0)[0]  # sinks + the top: [n_c] sorted
        budget = n_c + self.window if budget is None else budget
        return merge_plan(keys, values, score, centers, int(self.candidates * budget), self.tau)

    def compress_model(self, states: list[LayerState], start: int, ctx: CompressContext, S: int, L: int, H: int,
                       meta: dict) -> CompactCache:
        W = forced_window(states[0], self.window)
        check_budget(self, self.budget(S), self.sinks + W)
        total = max(L * H * (self.sinks + W), round(self.kept * L * H * S))
        scores = model_scores(lambda st, c: self.score(st, c.model_id, c.norm), states, ctx)  # [L, Hkv, S]
        keep = keep_top_global(scores, total, self.sinks, W)
        P = S - W
        layers = []
        for i, st in enumerate(states):
            rows = []
            for h in range(H):
                centers = keep[i, h, :P].nonzero().flatten()
                plan = merge_plan(st.keys[h, :P], st.values[h, :P], scores[i, h, :P], centers,
                                  int(self.candidates * (centers.numel() + W)), self.tau)
                rows.append(merge_rows(st, h, scores[i, h, :P], plan, self.log_weight))
            layers.append(merged_layer(st, rows))
        return CompactCache(layers, start + S, start, meta)

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S, W = state.num_tokens, forced_window(state, self.window)
        b = self.budget(S)
        if b >= S:
            return keep_all(state)
        check_budget(self, b, self.sinks + W)
        score = self.score(state, ctx.model_id)
        rows = [self.merge_head(state, h, score[h], b - W, W) for h in range(state.num_kv_heads)]
        return merged_layer(state, rows)

    def merge_head(self, state: LayerState, h: int, score: Tensor, n_c: int, window: int | None = None) -> HeadRows:
        """Rows of head h: merged centres, then the `window` forced last rows (default: the policy's
        window), with the recall groups behind merged rows."""
        W = self.window if window is None else window
        P = state.num_tokens - W
        plan = self.plan(state.keys[h, :P], state.values[h, :P], score[:P], n_c, n_c + W)
        return merge_rows(state, h, score[:P], plan, self.log_weight)


def merge_plan(keys: Tensor, values: Tensor, score: Tensor, centers: Tensor, n_cand: int, tau: float) -> HeadMerge:
    """EMS's evict-then-merge over one head's prefix rows, given the kept rows (`centers`, [n_c]).

    The `n_cand` best-scored rows that are not centres are the candidates; a head-adaptive
    count round(M redundancy (1 - sparsity)) of them is merged into its most similar centre
    (relu cos K x relu cos V), one with similarity <= tau to every centre goes to the zero
    class. keys/values [P, d]; score [P] >= 0.
    """
    n_c = centers.numel()
    left = torch.ones_like(score, dtype=torch.bool)
    left[centers] = False
    rest = left.nonzero().flatten()
    rest = rest[score[rest].argsort(descending=True, stable=True)]  # candidates, best first
    sparsity = float(score[centers].sum() / score.sum().clamp_min(1e-30))
    cand = rest[:n_cand]
    nk, nv = F.normalize(keys.float(), dim=-1), F.normalize(values.float(), dim=-1)
    sim = (nk[cand] @ nk[centers].T).relu() * (nv[cand] @ nv[centers].T).relu()  # [M, n_c]
    best, arg = sim.max(-1) if cand.numel() and n_c else (sim.new_zeros(cand.numel()), cand.new_zeros(cand.numel()))
    n_tbm = round(cand.numel() * float(best.mean() if best.numel() else 0.0) * (1 - sparsity))
    assign = torch.where(best[:n_tbm] > tau, arg[:n_tbm], torch.full_like(arg[:n_tbm], n_c))
    return HeadMerge(centers, cand[:n_tbm], assign)


def merge_rows(state: LayerState, h: int, score: Tensor, plan: HeadMerge, log_weight: str = "none") -> HeadRows:
    """Head h's rows for a plan over its first P = score.numel() rows: the centres (merged ones
    synthetic, position -1, with a recall group: the centre and its members), then rows P..S as they are."""
    S, P = state.num_tokens, score.numel()
    W = S - P
    n_c = plan.centers.numel()
    k, v = state.keys[h, :P], state.values[h, :P]
    c = plan.centers.sort().values
    slot = torch.full((P,), -1, dtype=torch.long, device=k.device)
    slot[c] = torch.arange(c.numel(), device=k.device)
    tgt = torch.where(plan.assign < n_c, slot[plan.centers[plan.assign.clamp(max=n_c - 1)]], torch.full_like(plan.assign, n_c))
    w = score[:P].float().clamp_min(1e-12)
    # zero-class accumulators: n_c + 1 slots, the last one thrown away
    acc_w = torch.zeros(n_c + 1, device=k.device).index_add_(0, tgt, w[plan.members])
    acc_v = torch.zeros(n_c + 1, v.shape[-1], device=k.device).index_add_(0, tgt, w[plan.members, None] * v[plan.members].float())
    u = torch.zeros_like(acc_v).index_add_(0, tgt, w[plan.members, None] * F.normalize(k[plan.members].float(), dim=-1))
    count = torch.zeros(n_c + 1, dtype=torch.long, device=k.device).index_add_(0, tgt, torch.ones_like(tgt))[:n_c]
    wc, kc, vc = w[c], k[c].float(), v[c].float()
    v_new = (wc[:, None] * vc + acc_v[:n_c]) / (wc + acc_w[:n_c])[:, None]
    u = wc[:, None] * F.normalize(kc, dim=-1) + u[:n_c]
    k_new = kc.norm(dim=-1, keepdim=True) * F.normalize(u, dim=-1)
    merged = count > 0
    keys = torch.where(merged[:, None], k_new.to(k.dtype), k[c])
    values = torch.where(merged[:, None], v_new.to(v.dtype), v[c])
    pos = torch.where(merged, torch.full_like(c, -1), state.positions[c])
    lw = torch.zeros(n_c, device=k.device)
    if log_weight == "count":
        lw = torch.log1p(count.float())
    elif log_weight == "mass":
        lw = torch.log((wc + acc_w[:n_c]) / wc)
    rid = torch.full((n_c,), NO_RECALL, dtype=torch.long, device=k.device)
    groups = []
    for j in merged.nonzero().flatten().tolist():
        rid[j] = len(groups)
        groups.append((h, torch.cat([c[j : j + 1], plan.members[tgt == j]]).sort().values))
    return HeadRows(
        torch.cat([keys, state.keys[h, P:]]), torch.cat([values, state.values[h, P:]]),
        torch.cat([pos, state.positions[P:]]), torch.cat([lw, torch.zeros(W, device=k.device)]),
        torch.cat([rid, torch.full((W,), NO_RECALL, dtype=torch.long, device=k.device)]), groups,
    )


def merged_layer(state: LayerState, rows: list[HeadRows]) -> LayerCache:
    """One layer from each head's rows; head-local recall ids become layer-wide (offset by the
    groups of the heads before)."""
    groups = [g for r in rows for g in r.groups]
    shift = 0
    for r in rows:
        r.recall_ids[r.recall_ids >= 0] += shift
        shift += len(r.groups)
    return rows_cache(rows, _recall(state, groups) if groups else None)


def _recall(state: LayerState, groups: list[tuple[int, Tensor]]) -> RecallTable:
    dev = state.keys.device
    lens = torch.tensor([g[1].numel() for g in groups], device=dev)
    offsets = torch.zeros(len(groups) + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(lens, 0)
    idx = torch.cat([g[1] for g in groups]).to(dev)
    heads = torch.tensor([g[0] for g in groups], dtype=torch.long, device=dev)
    per_row = torch.repeat_interleave(heads, lens)
    return RecallTable(offsets, state.positions[idx], heads, state.keys[per_row, idx], state.values[per_row, idx])
