"""SnapKV (ALGORITHMS.md 6.1): the context's own last tokens vote for the tokens to keep.

Also home of the helpers the other scorer policies share (window scores, pooling, the
budget checks re-exported from base), so each method file stays one small class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.attention import window_probs
from headwise.errors import InvalidInput
from headwise.policies.base import CompressContext, LayerState, ScorerPolicy, check_budget, check_ints  # noqa: F401 (re-exported)

POOLINGS = ("avg", "max", "none")


def group_reduce(x: Tensor, num_kv_heads: int, how: str = "mean") -> Tensor:
    """[Hq, ...] -> [Hkv, ...] over each GQA group (query head h uses KV head h // G)."""
    g = x.view(num_kv_heads, x.shape[0] // num_kv_heads, *x.shape[1:])
    return getattr(g, how)(1) if how != "max" else g.amax(1)


def pool1d(x: Tensor, kernel: int, kind: str = "avg") -> Tensor:
    """Same-length 1-D pooling over the last (token) axis of [H, N]."""
    if kind == "none" or kernel <= 1:
        return x
    k = kernel if kernel % 2 else kernel + 1  # odd kernel keeps the length with padding k//2
    fn = F.avg_pool1d if kind == "avg" else F.max_pool1d
    if kind == "avg":
        return fn(x[:, None], k, stride=1, padding=k // 2, count_include_pad=False)[:, 0]
    return fn(x[:, None], k, stride=1, padding=k // 2)[:, 0]


def window_scores(state: LayerState, window: int, gain: Tensor | None = None) -> Tensor:
    """Mean attention each key gets from the last `window` queries, per query head: [Hq, N] fp32.

    In the query-aware regime (`state.window_keys` set) the window rows follow the segment:
    the softmax runs over segment + window keys, causal within the window, as in one prefill
    of both, and only the segment's N columns are returned.
    """
    qw = state.window_queries
    if qw is None:
        raise InvalidInput("this policy needs the window queries; prefill with the policy's capture")
    qw = qw[:, -window:] if window else qw[:, -1:]
    if state.window_keys is None:
        return window_probs(qw, state.keys, state.scaling, gain).mean(1)
    keys = torch.cat([state.keys, state.window_keys], 1)  # [Hkv, N + Q, d]: the window queries are the last of them
    return window_probs(qw, keys, state.scaling, gain)[..., : state.num_tokens].mean(1)


@dataclass(frozen=True)
class SnapKVPolicy(ScorerPolicy):
    """SnapKV: mean window attention over the GQA group, pooled, top-k per head.

    [P]/[F] choices: window 32 (original repo), kernel 7, average pooling (kvpress and
    the original repo use avgpool; KVCache-Factory uses maxpool, set pooling="max"),
    mean over the GQA group (kvpress). Sinks (4) and the window are always kept and
    count in the budget. Query-agnostic: the window is the context's own last tokens.
    """

    name = "snapkv"
    kernel: int = 7
    pooling: str = "avg"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, kernel=self.kernel)
        if self.pooling not in POOLINGS:
            raise InvalidInput(f"policy {self.name!r}: pooling={self.pooling!r}; allowed: {', '.join(POOLINGS)}")

    def score(self, state: LayerState, ctx: CompressContext) -> Tensor:
        s = group_reduce(window_scores(state, self.window), state.num_kv_heads)  # [Hkv, N]
        return pool1d(s, self.kernel, self.pooling)
