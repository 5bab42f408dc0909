"""SnapKV (ALGORITHMS.md 6.1): the context's own last tokens vote for the tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from headwise.errors import InvalidInput
from headwise.policies.base import CompressContext, LayerState, ScorerPolicy, check_ints
from headwise.policies.scoring import POOLINGS, observation, pool1d, window_scores  # noqa: F401 (window_scores: tests)


@dataclass(frozen=True)
class SnapKVPolicy(ScorerPolicy):
    """SnapKV: mean window attention over the GQA group, pooled, top-k per head.

    [P]/[F] choices: window 32 (original repo), kernel 7, average pooling (kvpress and
    the original repo use avgpool; KVCache-Factory uses maxpool, set pooling="max"),
    mean over the GQA group (kvpress). Sinks (4) and the window are always kept and
    count in the budget. Query-agnostic: the window is the context's own last tokens.
    """

    name = "snapkv"
    query_aware_signal = "window+kvzip"  # tuned on bench.quality --text stdlib (docs/policies.md)
    query_aware_scope = "model"  # the model's rows ranked at once (KVzip's global ranking), tuned there too
    query_aware_weight = 0.8  # the reconstruction's share of the mix, tuned there too
    kernel: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, kernel=self.kernel)
        if self.pooling not in POOLINGS:
            raise InvalidInput(f"policy {self.name!r}: pooling={self.pooling!r}; allowed: {', '.join(POOLINGS)}")

    def score(self, state: LayerState, ctx: CompressContext) -> Tensor:
        s = observation(state, self.signal, self.window, ctx.model_id, weight=self.weight, norm=ctx.norm)  # [Hkv, N]
        return pool1d(s, self.kernel, self.pooling)
