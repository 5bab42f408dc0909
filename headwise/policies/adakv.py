from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput
from headwise.policies.base import (
    CompressContext,
    LayerState,
    Policy,
    ScorerPolicy,
    check_budget,
    check_ints,
    forced_window,
    gather_rows,
    keep_all,
    keep_top,
    optional,
)
from headwise.policies.scoring import check_scope, model_scores


def head_budgets(scores: Tensor, free: int, alpha: float) -> tuple[Tensor, Tensor]:
    """AdaKV allocation of a layer's free rows (ALGORITHMS.md 6.5).

    scores: [Hkv, M] scores of the candidate (unprotected) rows of each head; free: rows per
    head before reallocation. Returns (raw [Hkv] float budgets summing to Hkv*free before
    rounding, rounded [Hkv] int budgets with the same sum, largest remainder first).
    """
    H, M = scores.shape
    total = H * free
    top = scores.flatten().topk(total).indices  # global top over the concatenated heads
    counts = torch.bincount(top // M, minlength=H).double()
    raw = counts * (1 - alpha) + alpha * free  # convex mix: sums to total exactly
    out = raw.floor().long()
    short = total - int(out.sum())
    if short:
        order = (raw - out).argsort(descending=True, stable=True)
        out[order[:short]] += 1
    return raw, out.clamp(max=M)


SCOPES = ("layer", "model")


@dataclass(frozen=True)
class AdaKVPolicy(Policy):
    """AdaKV (ALGORITHMS.md 6.5): head-wise budgets inside a layer, wrapping a scorer.

    The wrapped scorer (`scorer`: a ScorerPolicy instance, or a registered scorer's name,
    built with this policy's kept/window/sinks; default snapkv) scores every row; the
    layer's free budget Hkv x (B - sinks - window) goes to the globally best rows, and
    head h gets b_h = count_h (1 - alpha) + alpha (B - sinks - window) ([F] alpha = 0.2),
    rounded by largest remainder so the layer total is exact. No score normalisation
    (kvpress default). Every head keeps sinks + window + b_h rows: ragged for real.
    """

    name = "adakv"
    query_aware_signal: ClassVar[str | None] = None
    query_aware_alpha: ClassVar[float] = 0.2
    query_aware_scope: ClassVar[str] = "model"  # tuned on bench.quality --text stdlib (docs/policies.md)
    query_aware_weight: ClassVar[float | None] = None  # None: the scorer class's own
    scorer: ScorerPolicy | str = "snapkv"
    alpha: float | None = None  # unset: the regime's default, 0.2 ([F]) in the reuse regime, `query_aware_alpha` in the query-aware one
    window: int = 32
    sinks: int = 4
    signal: str | None = optional(None)  # the scorer's observation signal, when the scorer is given by name
    # [P] "model": the free rows of every (layer, head) of the model go to the model's best rows at once
    # (KVzip's global ranking with AdaKV's safeguard; the scorer's mix over model-wide means); "layer":
    # each layer's own ([F]). Unset: "layer", and `query_aware_scope` in the query-aware regime
    scope: str | None = optional(None)
    weight: float | None = optional(None)  # the scorer's reconstruction share of window+kvzip, for a scorer by name

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, window=self.window, sinks=self.sinks)
        if self.scope is not None and self.scope not in SCOPES:
            raise InvalidInput(f"policy 'adakv': scope={self.scope!r}; allowed: {', '.join(SCOPES)}")
        if self.alpha is not None and (not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0):
            raise InvalidInput(f"policy 'adakv': alpha={self.alpha!r} must be in [0, 1]")
        check_scope(self, None, self.weight)
        if not isinstance(self.scorer, ScorerPolicy):
            object.__setattr__(self, "scorer", self._build(self.scorer))  # frozen: set once, here

    def _build(self, name) -> ScorerPolicy:
        from headwise.policies import _discover

        cls = _discover().get(name) if isinstance(name, str) else None
        if cls is None or not issubclass(cls, ScorerPolicy):
            allowed = sorted(n for n, c in _discover().items() if issubclass(c, ScorerPolicy))
            raise InvalidInput(f"policy 'adakv': scorer {name!r} is not a scorer; allowed: {', '.join(allowed)}")
        return cls(kept=self.kept, window=self.window, sinks=self.sinks, signal=self.signal, weight=self.weight)

    def params(self) -> dict:
        """The scorer by name when it is the one its name builds (the segment key as for a name),
        else by all its settings."""
        out = super().params()
        if out.get("scope") == "layer":  # the reuse regime's (caches stored before keep their keys)
            del out["scope"]
        if out.get("alpha") is None:  # unset: the reuse regime's 0.2 (query-aware caches are never stored)
            out["alpha"] = 0.2
        s = self.scorer
        out["scorer"] = s.name if s == self._build(s.name) else s.params()
        return out

    @property
    def capture(self):
        return self.scorer.capture

    def query_aware_form(self) -> "AdaKVPolicy":
        """Unset settings take the query-aware regime's defaults: for a scorer given by name, the
        signal `query_aware_signal` (None: the scorer class's own)."""
        s, changes = self.scorer, {}
        if self.scope is None and self.query_aware_scope != "layer":
            changes["scope"] = self.query_aware_scope
        if s == self._build(s.name):  # a scorer by name: its regime's signal and weight
            qs = s.query_aware_form()
            signal = self.query_aware_signal or qs.signal
            if self.signal is None and signal not in (None, "window"):
                changes["signal"] = signal
            weight = self.query_aware_weight if self.query_aware_weight is not None else qs.weight
            if self.weight is None and weight is not None:
                changes["weight"] = weight
            if "signal" in changes or "weight" in changes:
                changes["scorer"] = s.name
        return dataclasses.replace(self, **changes) if changes else self

    def alpha_for(self, state: LayerState) -> float:
        """The safeguard in force: the setting, else `query_aware_alpha` in the query-aware regime and
        0.2 in the reuse one."""
        if self.alpha is not None:
            return self.alpha
        return self.query_aware_alpha if state.window_keys is not None else 0.2

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        if self.scope in (None, "layer"):
            return super().compress(states, start, ctx)
        ctx = ctx or CompressContext(num_layers=len(states))
        S = states[0].num_tokens
        b = self.budget(S)
        if b >= S:
            layers = [keep_all(st) for st in states]
        else:
            W = forced_window(states[0], self.window)
            check_budget(self, b, self.sinks + W)
            scores = model_scores(self.scorer.score, states, ctx)  # [L, Hkv, S], the mix over model-wide means
            L, H = scores.shape[:2]
            alpha = self.alpha_for(states[0])
            _, budgets = head_budgets(scores.reshape(L * H, S)[:, self.sinks : S - W], b - self.sinks - W, alpha)
            budgets = budgets.view(L, H)
            layers = [gather_rows(st, keep_top(scores[i], budgets[i].tolist(), self.sinks, W)) for i, st in enumerate(states)]
        return CompactCache(layers, seq_len=start + S, start=start, meta={"policy": self.params()})

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S = state.num_tokens
        b = self.budget(S)
        if b >= S:
            return keep_all(state)
        W = forced_window(state, self.window)
        check_budget(self, b, self.sinks + W)
        scores = self.scorer.score(state, ctx).float()  # [Hkv, S]
        _, budgets = head_budgets(scores[:, self.sinks : S - W], b - self.sinks - W, self.alpha_for(state))
        return gather_rows(state, keep_top(scores, budgets.tolist(), self.sinks, W))
