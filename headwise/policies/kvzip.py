from dataclasses import dataclass

import torch

from headwise.cache.compact import CompactCache
from headwise.policies.base import (
    Capture,
    CompressContext,
    LayerState,
    Policy,
    check_ints,
    gather_mask,
    keep_all,
    keep_top_global,
)


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
    """

    name = "kvzip"
    sinks: int = 4
    window: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks, window=self.window)

    @property
    def capture(self) -> Capture:
        return Capture(reconstruction=True)

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        budget = max(1, round(self.kept * L * H * S))  # rows over the whole model
        meta = {"policy": self.params()}
        if budget >= L * H * S:
            return CompactCache([keep_all(s) for s in states], start + S, start, meta)
        scores = torch.stack([s.reconstruction for s in states])  # [L, H, S]
        forced = min(self.sinks + self.window, budget // (L * H))
        sinks = min(self.sinks, forced)
        keep = keep_top_global(scores, budget, sinks, forced - sinks)  # [L, H, S] bool
        return CompactCache([gather_mask(s, keep[i]) for i, s in enumerate(states)], start + S, start, meta)
