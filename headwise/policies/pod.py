"""PoD (ALGORITHMS.md 4), training-free score sharing, as the `pod` policy.

Per KV head, the head profile's layer blocks decide the layout (`LayerCache.distant`): in a
block's base layer the head keeps K and V of every token; in its other layers it keeps K of
the proximal tokens only (first `sinks` + last `recent` of the segment) and V of every token.
A distant token's logit in a non-base layer is the base layer's own, q_base . K_base (Fig. 2),
joined with the layer's proximal logits in one softmax over the layer's own values, which
equals the paper's gate form (both below, tested equal). The keys are really absent: the
cache, the codec and the store hold R_k < R key rows for such heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput
from headwise.policies.base import CompressContext, LayerState, Policy, check_ints, keep_all


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
class PoDPolicy(Policy):
    """PoD (ALGORITHMS.md 4): non-base layers of a head's block keep keys of proximal tokens only.

    [F] sinks 16; blocks per KV head from the HeadProfile (greedy 1 - JSD >= 0.5 against
    the block's base layer, [P] at KV-head granularity); [P] training-free score sharing:
    distant logits of a non-base layer are q_base . K_base (the base layer's query at the same
    step, per query head of the GQA group). The segment is prefilled with full attention and
    compressed after, as every policy here is; later segments, questions and decoded tokens
    are proximal in every layer (every layer keeps their keys).

    Budget: `kept` counts K and V rows separately (ALGORITHMS.md 0.3) and sizes the recent
    window (the paper's n_r) so the realised fraction is the request. Only keys of non-base
    (layer, head) pairs can go, so the reachable range is [1 - nonbase / (2 L Hkv), 1] up to
    the sinks: at most 0.5 saved, and on SmolLM2-135M's profile (27 of 90 pairs non-base)
    kept >= 0.852. A lower `kept` is an InvalidInput naming the range, not a silent fallback
    (no extra eviction of distant tokens is mixed in). With a budget >= the segment, or a
    profile without multi-layer blocks at kept 1, the result equals `full`.
    """

    name = "pod"
    needs_profile = True
    sinks: int = 16

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks)
        if self.kept < 0.5:
            raise InvalidInput(f"policy 'pod': kept={self.kept} is below 0.5; PoD drops only keys of non-base layers, "
                               "so it keeps at least half of the K+V rows: allowed range [0.5, 1] (less on real profiles)")

    def blocks(self, ctx: CompressContext, num_kv_heads: int) -> list[list[int]]:
        """base_of[l][h]: the first layer of the block of (l, h), from the head profile."""
        if ctx.profile is None:
            raise InvalidInput("policy 'pod' needs a head profile (PoD layer blocks); run `headwise profile --model PATH` "
                               "or prefill through ModelRunner.prefill_segment, which loads it")
        base_of = ctx.profile.check(ctx.num_layers, num_kv_heads).base_of
        bad = [(li, h) for li, row in enumerate(base_of) for h, b in enumerate(row) if not 0 <= b <= li]
        if bad:
            raise InvalidInput(f"head profile: base layer of (layer, head) {bad[0]} is not an earlier layer; recompute it")
        return base_of

    def realised(self, S: int, base_of: list[list[int]], recent: int) -> float:
        """(K rows + V rows) / (2 L Hkv S) for a recent window of `recent` tokens."""
        L, H = len(base_of), len(base_of[0])
        nonbase = sum(base_of[li][h] != li for li in range(L) for h in range(H))
        prox = int(proximal(S, self.sinks, recent).sum())
        return ((2 * L * H - nonbase) * S + nonbase * prox) / (2 * L * H * S)

    def recent_for(self, S: int, base_of: list[list[int]]) -> int:
        """Recent window so that (K rows + V rows) / (2 L Hkv S) is closest to `kept`."""
        L, H = len(base_of), len(base_of[0])
        nonbase = sum(base_of[li][h] != li for li in range(L) for h in range(H))
        if nonbase == 0:
            return S
        # K rows kept: (L H - nonbase) S + nonbase (sinks + recent); V rows: L H S
        target = self.kept * 2 * L * H * S - (2 * L * H - nonbase) * S
        return int(max(0, min(S - self.sinks, round(target / nonbase) - self.sinks)))

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        ctx = ctx or CompressContext(num_layers=len(states))
        S, H = states[0].num_tokens, states[0].num_kv_heads
        base_of = self.blocks(ctx, H)
        recent = self.recent_for(S, base_of)
        low = self.realised(S, base_of, 0)
        if self.kept < low - 1e-9:
            raise InvalidInput(
                f"policy 'pod': kept={self.kept} is out of reach: PoD drops only keys of non-base layers, so with this "
                f"head profile a {S}-token segment keeps a fraction in [{low:.3f}, 1]; raise kept or use another policy")
        prox = proximal(S, self.sinks, recent).to(states[0].keys.device)
        layers = [self.layer_cache(st, base_of[i], i, prox) for i, st in enumerate(states)]
        return CompactCache(layers, seq_len=start + S, start=start, meta={"policy": self.params()})

    @staticmethod
    def layer_cache(state: LayerState, bases: list[int], layer: int, prox: Tensor) -> LayerCache:
        """Base heads keep everything; the others keep keys of `prox` rows ([S] bool) only."""
        if bool(prox.all()) or all(b == layer for b in bases):
            return keep_all(state)
        H = state.num_kv_heads
        shared = [bases[h] != layer for h in range(H)]
        keys = [state.keys[h][prox] if shared[h] else state.keys[h] for h in range(H)]
        distant = [~prox if shared[h] else torch.zeros_like(prox) for h in range(H)]
        return LayerCache.from_heads(keys, list(state.values), [state.positions] * H, distant=distant,
                                     distant_from=[bases[h] if shared[h] else -1 for h in range(H)])
