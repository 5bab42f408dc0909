from dataclasses import dataclass

import torch

from headwise.cache.compact import LayerCache
from headwise.policies.base import CompressContext, LayerState, Policy, check_ints, gather_rows, keep_all


@dataclass(frozen=True)
class StreamingPolicy(Policy):
    """StreamingLLM (ALGORITHMS.md 6.3): `sinks` first tokens plus the most recent ones.

    Every head keeps exactly budget = round(kept * S) rows: min(sinks, budget) sinks and
    the rest from the end of the segment. No scores, so it is query-agnostic and cheap.
    """

    name = "streaming"
    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks)

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S = state.num_tokens
        b = self.budget(S)
        if b >= S:
            return keep_all(state)
        sinks = min(self.sinks, b)
        idx = torch.cat([torch.arange(sinks), torch.arange(S - (b - sinks), S)]).to(state.keys.device)
        return gather_rows(state, [idx] * state.num_kv_heads)
