from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.cache.compact import LayerCache
from headwise.errors import InvalidInput
from headwise.policies.base import CompressContext, LayerState, Policy, ScorerPolicy, gather_rows, keep_all
from headwise.policies.snapkv import check_budget, check_ints


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


@dataclass(frozen=True)
class AdaKVPolicy(Policy):
    """AdaKV (ALGORITHMS.md 6.5): head-wise budgets inside a layer, wrapping a scorer.

    The wrapped scorer (`scorer`, default snapkv with its own defaults) scores every row;
    the layer's free budget Hkv x (B - sinks - window) goes to the globally best rows, and
    head h gets b_h = count_h (1 - alpha) + alpha (B - sinks - window) ([F] alpha = 0.2),
    rounded by largest remainder so the layer total is exact. No score normalisation
    (kvpress default). Every head keeps sinks + window + b_h rows: ragged for real.
    """

    name = "adakv"
    scorer: str = "snapkv"
    alpha: float = 0.2
    window: int = 32
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, window=self.window, sinks=self.sinks)
        if not isinstance(self.alpha, (int, float)) or not 0.0 <= self.alpha <= 1.0:
            raise InvalidInput(f"policy 'adakv': alpha={self.alpha!r} must be in [0, 1]")
        _ = self.inner  # validates the scorer name

    @property
    def inner(self) -> ScorerPolicy:
        from headwise.policies import _discover

        cls = _discover().get(self.scorer)
        if cls is None or not issubclass(cls, ScorerPolicy) or cls is AdaKVPolicy:
            allowed = sorted(n for n, c in _discover().items() if issubclass(c, ScorerPolicy))
            raise InvalidInput(f"policy 'adakv': scorer {self.scorer!r} is not a scorer; allowed: {', '.join(allowed)}")
        return cls(kept=self.kept, window=self.window, sinks=self.sinks)

    @property
    def capture(self):
        return self.inner.capture

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S = state.num_tokens
        b = self.budget(S)
        if b >= S:
            return keep_all(state)
        check_budget(self, b, self.sinks + self.window)
        scores = self.inner.score(state, ctx).float()  # [Hkv, S]
        cand = scores[:, self.sinks : S - self.window]  # [Hkv, M] rows not protected
        _, budgets = head_budgets(cand, b - self.sinks - self.window, self.alpha)
        keep = []
        for h in range(state.num_kv_heads):
            top = cand[h].topk(int(budgets[h])).indices + self.sinks
            idx = torch.cat([torch.arange(self.sinks, device=top.device), top, torch.arange(S - self.window, S, device=top.device)])
            keep.append(idx.sort().values)
        return gather_rows(state, keep)

