"""PoD (ALGORITHMS.md 4), training-free score sharing: the attention math and the layout plan.

NOT registered as a policy yet (no `name`), on purpose. A truly smaller PoD cache needs,
for every non-base (layer, KV head), keys of the proximal tokens only while values stay
for all tokens, and a decode step that takes that head's distant logits from its block's
base layer (q_base . K_base[D]). LayerCache holds keys and values row for row
(keys.shape == values.shape, shared by the codec, the store and decode), so that layout
needs new LayerCache fields that compacted/extended/to/clone and the codec carry, plus a
runner hook that hands the base layer's distant logits to later layers. Faking it with
masks would not be compression, which this project rules out. What is here is exact and
tested: the gate form, the single-softmax form, and which rows a PoD cache would drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.errors import InvalidInput
from headwise.policies.base import Policy


def pod_gate_attention(a_prox: Tensor, a_dist: Tensor, v_prox: Tensor, v_dist: Tensor) -> Tensor:
    """Fig. 2 gate form: g o^P + (1 - g) o^D, g = sum exp a^P / (sum exp a^P + sum exp a^D).

    a_prox: [G, nP] own-layer logits of proximal tokens; a_dist: [G, nD] base-layer logits of
    distant tokens; v_prox [nP, d], v_dist [nD, d] this layer's values. Returns [G, d].
    """
    o_p = torch.softmax(a_prox, -1) @ v_prox
    o_d = torch.softmax(a_dist, -1) @ v_dist
    g = torch.sigmoid(torch.logsumexp(a_prox, -1) - torch.logsumexp(a_dist, -1))[:, None]
    return g * o_p + (1 - g) * o_d


def pod_single_attention(a_prox: Tensor, a_dist: Tensor, v_prox: Tensor, v_dist: Tensor) -> Tensor:
    """The same as one softmax over [a^P ; a^D] applied to [V^P ; V^D] (what decode would run)."""
    return torch.softmax(torch.cat([a_prox, a_dist], -1), -1) @ torch.cat([v_prox, v_dist])


def proximal(S: int, sinks: int, recent: int) -> Tensor:
    """[S] bool: the first `sinks` and last `recent` tokens."""
    m = torch.zeros(S, dtype=torch.bool)
    m[: min(sinks, S)] = True
    m[max(0, S - recent):] = True
    return m


@dataclass(frozen=True)
class PoDPlan(Policy):
    """PoD cache layout: base layers keep K and V; non-base (layer, head) keep K of proximal tokens.

    [F] sinks 16, score sharing from the block's base layer (blocks from the HeadProfile,
    greedy 1 - JSD >= 0.5); [P] the recent window is sized from `kept`, counting K and V rows
    separately (ALGORITHMS.md 0.3), so kept >= 0.5 + base share is the floor of this method.
    """

    sinks: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise InvalidInput(f"PoD: sinks={self.sinks!r} must be an integer >= 0")

    def recent_for(self, S: int, base_of: list[list[int]]) -> int:
        """Recent window so that (K rows + V rows) / (2 L Hkv S) is closest to `kept`."""
        L, H = len(base_of), len(base_of[0])
        nonbase = sum(base_of[li][h] != li for li in range(L) for h in range(H))
        if nonbase == 0:
            return S
        # K rows kept: (L H - nonbase) S + nonbase (sinks + recent); V rows: L H S
        target = self.kept * 2 * L * H * S - (2 * L * H - nonbase) * S
        return int(min(S - self.sinks, max(0, round(target / nonbase) - self.sinks)))
