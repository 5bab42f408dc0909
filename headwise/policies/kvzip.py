from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput
from headwise.policies.base import (
    Capture,
    CompressContext,
    LayerState,
    Policy,
    check_ints,
    gather_mask,
    keep_all,
    keep_top_global,
    optional,
)
from headwise.policies.scoring import value_prior

HEADS = ("none", "retrieval", "heterogeneous")
PRIORS = ("none", "value")
MERGES = ("none", "ems")
LOG_WEIGHTS = ("none", "count", "mass")
PRECISIONS = ("fp32", "bf16")  # the reconstruction pass's
EMS_CANDIDATES = 2.0  # EMS's candidate pool: 2x the kept rows ([P] default of `ems`)


@dataclass(frozen=True)
class KVzipPolicy(Policy):
    """Context reconstruction (KVzip, Kim et al. 2025, arXiv 2505.23416) with a global, truly ragged budget.

    After the segment's prefill the model is asked to repeat the segment and re-reads it,
    chunk by chunk, on top of the uncompressed cache; a row's score is the largest attention
    any reconstruction query of its KV head's group gives it. Rows are then ranked over ALL
    layers and heads at once and the top `kept` fraction is kept, so every (layer, head)
    holds its own number of rows: heads that the model reads from while reproducing the
    text keep much, the others little. `sinks` first and `window` last rows of every head
    are always kept. Query-agnostic (the question is never seen), hence reusable; the price
    is a second pass over the segment at prefill, paid once per stored document.
    Deviations from the paper: scores are computed with the segment's own chat template
    (a user turn "Repeat the text above exactly."), chunks of 512 tokens, and the forced
    sinks/window rows [P].

    The other papers' ideas on this signal (settings; defaults keep plain KVzip):
    `heads` "retrieval" (RazorAttention's profile heads) or "heterogeneous" (Task-KV's
    semantic separator on the reconstruction attention) keep every row, as many of them as
    fit in `whole` of the budget, the rest ranked globally; `prior` "value" multiplies the
    score by AhaKV's pooled value-norm prior; `merge` "ems" folds evicted rows into the kept
    rows they resemble (EMS's evict-then-merge; merged rows with `log_weight` and recall
    handles, the row count per head unchanged). docs/policies.md lists the deviations.
    """

    name = "kvzip"
    sinks: int = 4
    window: int = 8
    # the papers' ideas on KVzip's signal (docs/policies.md "The papers' ideas on KVzip's signal")
    heads: str = optional("none")  # whole-budget heads: "retrieval" (RazorAttention) or "heterogeneous" (Task-KV)
    whole: float = optional(0.5)  # at most this share of the budget goes to whole heads
    prior: str = optional("none")  # "value": AhaKV's value prior times the score
    kernel: int = optional(7)  # the value prior's pooling
    merge: str = optional("none")  # "ems": EMS's evict-then-merge of evicted rows into the kept ones
    log_weight: str = optional("none")  # merged rows' log-weight, as `ems`'s
    # the reconstruction pass: 0 re-reads against the whole segment (exact KVzip); N > 0 lets each
    # chunk attend only to the sinks and the rows within N tokens of its own span (headwise/models/reconstruction.py)
    span: int = optional(0)
    precision: str = optional("fp32")  # "bf16": the pass's projections and attention products in bfloat16
    log_signal: ClassVar[bool] = False  # reconstruction holds log scores (kvzap's predictions)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks, window=self.window, kernel=self.kernel, span=self.span)
        for attr, allowed in (("heads", HEADS), ("prior", PRIORS), ("merge", MERGES), ("log_weight", LOG_WEIGHTS),
                              ("precision", PRECISIONS)):
            if getattr(self, attr) not in allowed:
                raise InvalidInput(f"policy {self.name!r}: {attr}={getattr(self, attr)!r}; allowed: {', '.join(allowed)}")
        if not isinstance(self.whole, (int, float)) or not 0.0 <= self.whole <= 1.0:
            raise InvalidInput(f"policy {self.name!r}: whole={self.whole!r} must be a share of the budget in [0, 1]")

    @property
    def needs_profile(self) -> bool:  # RazorAttention's retrieval heads come from the head profile
        return self.heads == "retrieval"

    @property
    def plain(self) -> bool:
        return self.heads == "none" and self.prior == "none" and self.merge == "none"

    @property
    def capture(self) -> Capture:
        return Capture(reconstruction=True, reconstruction_span=self.span, reconstruction_precision=self.precision)

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        ctx = ctx or CompressContext(num_layers=len(states))
        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        budget = max(1, round(self.kept * L * H * S))  # rows over the whole model
        meta = {"policy": self.params()}
        if budget >= L * H * S:
            return CompactCache([keep_all(s) for s in states], start + S, start, meta)
        scores = torch.stack([s.reconstruction for s in states])  # [L, H, S]
        forced = min(self.sinks + self.window, budget // (L * H))
        sinks = min(self.sinks, forced)
        if self.plain:
            keep = keep_top_global(scores, budget, sinks, forced - sinks)  # [L, H, S] bool
            return CompactCache([gather_mask(s, keep[i]) for i, s in enumerate(states)], start + S, start, meta)
        scores = scores.float().exp() if self.log_signal else scores.float()
        if self.prior == "value":
            scores = scores * torch.stack([value_prior(s.values, self.kernel) for s in states])
        ranked = scores.clone()
        for li, h in self.whole_heads(states, ctx, scores, budget - forced * L * H, forced):
            ranked[li, h] = float("inf")  # every row of a whole head wins the global ranking
        keep = keep_top_global(ranked, budget, sinks, forced - sinks)
        if self.merge == "none":
            return CompactCache([gather_mask(s, keep[i]) for i, s in enumerate(states)], start + S, start, meta)
        layers = [self.merged(s, keep[i], scores[i], forced - sinks) for i, s in enumerate(states)]
        return CompactCache(layers, start + S, start, meta)

    def whole_heads(self, states: list[LayerState], ctx: CompressContext, scores: Tensor, free: int,
                    forced: int) -> list[tuple[int, int]]:
        """(layer, KV head) pairs that keep every row, most important first, as many as fit in
        `whole` of the budget beyond every head's `forced` rows (`free`)."""
        if self.heads == "none":
            return []
        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        if self.heads == "retrieval":
            if ctx.profile is None:
                raise InvalidInput(f"policy {self.name!r} with heads='retrieval' needs a head profile; run `headwise "
                                   "profile --model PATH` or prefill through ModelRunner.prefill_segment, which loads it")
            order = ctx.profile.check(L, H).retrieval_order()  # RazorAttention's defaults: induction 0.14, echo 0.01
        else:
            order = heterogeneous_order(states, scores)
        fit = int(self.whole * free // max(1, S - forced))
        return order[:fit]

    def merged(self, state: LayerState, keep: Tensor, scores: Tensor, window: int) -> LayerCache:
        """EMS's merge within each head: evicted rows fold into the kept rows they resemble
        (keep: [Hkv, S] bool; the last `window` rows are kept as they are)."""
        from headwise.policies.ems import merge_plan, merge_rows, merged_layer

        P = state.num_tokens - window
        rows = []
        for h in range(state.num_kv_heads):
            centers = keep[h, :P].nonzero().flatten()
            plan = merge_plan(state.keys[h, :P], state.values[h, :P], scores[h, :P], centers,
                              int(EMS_CANDIDATES * (centers.numel() + window)), 0.0)
            rows.append(merge_rows(state, h, scores[h, :P], plan, self.log_weight))
        return merged_layer(state, rows)


def heterogeneous_order(states: list[LayerState], scores: Tensor) -> list[tuple[int, int]]:
    """Task-KV's semantic separator on KVzip's signal: per layer the head farthest from the
    layer's semantic centre (f = 1 for a 3-KV-head model at every depth), ordered across
    layers by that distance over the layer's mean distance. scores: [L, Hkv, S]."""
    from headwise.policies.taskkv import TaskKVPolicy

    tk = TaskKVPolicy()
    cand = []
    for li, s in enumerate(states):
        d = tk.semantic_distance(scores[li], s.values)  # [Hkv]
        h = int(d.argmax())
        cand.append((float(d[h] / d.mean().clamp_min(1e-30)), li, h))
    return [(li, h) for _, li, h in sorted(cand, key=lambda c: (-c[0], c[1]))]
