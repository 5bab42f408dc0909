from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.errors import InvalidInput
from headwise.policies.base import CompressContext, LayerState, ScorerPolicy, check_ints, optional
from headwise.policies.scoring import (
    POOLINGS,
    group_reduce,
    mix,
    mix_weights,
    observation,
    pool1d,
    value_prior,
    window_scores,
)


@dataclass(frozen=True)
class AhaKVPolicy(ScorerPolicy):
    """AhaKV (ALGORITHMS.md 5): recent accumulation with step-gain softmax and a value prior.

    [F] score = pooled ||v||^2 prior (normalised by its max) x window attention of the last
    `window` (r = 32) queries, each row's logits scaled by g_i = sqrt(2 ln(i / B)) with i the
    keys row i sees and B the budget. [P] g_i = max(1, .) (sharpen only; `faithful=True`
    uses sqrt(max(2 ln(i/B), 1e-2))), value-prior pooling kernel 7, mean over the GQA group,
    the B the total per-head budget, the window kept and counted in B. Also keeps
    `sinks` (4) first tokens like every scorer here (the paper keeps none: set sinks=0).
    """

    name = "ahakv"
    query_aware_signal = "window+kvzip"  # tuned on bench.quality --text stdlib (docs/policies.md)
    query_aware_scope = "model"  # the model's rows ranked at once (KVzip's global ranking), tuned there too
    query_aware_weight = 0.8  # the reconstruction's share of the mix, tuned there too
    kernel: int = 7
    faithful: bool = False
    # [P] SnapKV's pooling of the attention score too ("avg", "max"), kernel `kernel`; unset: the
    # regime's default, "none" (the paper) in the reuse regime, "avg" in the query-aware one
    pooling: str | None = optional(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, kernel=self.kernel)
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise InvalidInput(f"policy 'ahakv': pooling={self.pooling!r}; allowed: {', '.join(POOLINGS)}")

    def pooling_for(self, state: LayerState) -> str:
        """The pooling in force: the setting, else "avg" in the query-aware regime (the question's
        attention marks a fact's key words and first digit; pooling keeps the rows next to them,
        tuned on `bench.quality --text stdlib`) and "none" in the reuse regime."""
        if self.pooling is not None:
            return self.pooling
        return "avg" if state.window_keys is not None else "none"

    def gains(self, S: int, window: int, budget: int) -> Tensor:
        """[window] per-row temperature of the last `window` rows of an S-token segment."""
        visible = torch.arange(S - window, S, dtype=torch.float64) + 1
        x = 2 * torch.log(visible / budget)
        g = torch.sqrt(x.clamp_min(1e-2)) if self.faithful else torch.sqrt(x.clamp_min(0)).clamp_min(1.0)
        return g.float()

    def score(self, state: LayerState, ctx: CompressContext) -> Tensor:
        if self.signal in ("kvzip", "kvzap"):  # [P] reconstruction queries all see the whole document: no step gain
            s = observation(state, self.signal, self.window, ctx.model_id)
            return value_prior(state.values, self.kernel) * pool1d(s, self.kernel, self.pooling_for(state))
        S = state.num_tokens
        W = min(self.window or 1, state.window_queries.shape[1] if state.window_queries is not None else S)
        after = 0 if state.window_keys is None else state.window_keys.shape[1]  # query-aware: window after the segment
        gain = self.gains(S + after, W, self.budget(S)).to(state.keys.device)
        s = group_reduce(window_scores(state, W, gain), state.num_kv_heads)  # [Hkv, N]
        if self.signal == "window+kvzip":  # the step-gain window score beside the reconstruction's
            s = mix(s, observation(state, "kvzip", self.window, ctx.model_id), weights=mix_weights(self.weight), norm=ctx.norm,
                    tag="signal")
        return value_prior(state.values, self.kernel) * pool1d(s, self.kernel, self.pooling_for(state))
