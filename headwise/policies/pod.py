"""PoD (ALGORITHMS.md 4), training-free score sharing, with a token-eviction stage, as the `pod` policy.

Per KV head, the head profile's layer blocks decide the layout (`LayerCache.distant`): in a
block's base layer the head keeps K and V of every kept token; in its other layers it keeps K
of the proximal tokens only (first `sinks` + last `recent` of the segment) and V of every
kept token. A distant token's logit in a non-base layer is the base layer's own,
q_base . K_base (Fig. 2), joined with the layer's proximal logits in one softmax over the
layer's own values, which equals the paper's gate form (tests/test_policy_pod.py checks the
decode attention that runs against it). The keys
are really absent: the cache, the codec and the store hold R_k < R key rows for such heads.

Below PoD's own range the eviction stage (the paper's PoD + SnapKV, our [P] form) drops
tokens too, choosing them once per (block, KV head) so that every layer of a block keeps the
same tokens: a non-base layer's distant row always finds its token in the base layer.
"""

from __future__ import annotations

import dataclasses
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
    forced_window,
    keep_all,
    keep_top,
    optional,
)

EVICTORS = ("snapkv", "kvzip", "none")
PROTECTS = ("none", "retrieval", "head", "layer", "all", "kv<N>")  # kv<N>: KV head N's blocks (ablation of score sharing)
BLOCK_SCORES = ("mean", "max")


def proximal(S: int, sinks: int, recent: int) -> Tensor:
    """[S] bool: the first `sinks` and last `recent` tokens."""
    m = torch.zeros(S, dtype=torch.bool)
    m[: min(sinks, S)] = True
    m[max(0, S - recent):] = True
    return m


def window_attention(st: LayerState, h: int, skip: int) -> Tensor:
    """KV head h's attention from its own window queries (the GQA group's) over the segment's rows
    past the first `skip` (the rows that become distant): [G, W, S - skip] (skip capped at S - 1)."""
    G = st.window_queries.shape[0] // st.num_kv_heads
    lo = min(skip, st.num_tokens - 1)
    q = st.window_queries[h * G:(h + 1) * G].float()  # [G, W, d]
    return torch.softmax(q @ st.keys[h, lo:].float().T * st.scaling, -1)  # [G, W, S - lo]


def similarity(own: LayerState, base: LayerState, h: int, skip: int) -> float:
    """1 - JSD (base 2, in [0, 1]) between KV head h's attention in layer `own` and in its base layer
    `base` from their own window queries (the GQA group's), over the segment's rows past the first
    `skip` (the rows that become distant), mean over the queries and the group."""
    return attention_similarity(window_attention(own, h, skip), window_attention(base, h, skip))


def attention_similarity(p: Tensor, r: Tensor) -> float:
    """1 - JSD (base 2) of two `window_attention`s of one KV head, mean over the queries and the group."""
    m = 0.5 * (p + r)

    def kl(a: Tensor) -> Tensor:
        return (a * (a.clamp_min(1e-30).log2() - m.clamp_min(1e-30).log2())).sum(-1)

    return float(1.0 - 0.5 * (kl(p) + kl(r)).mean())


def block_members(base_of: list[list[int]]) -> dict[tuple[int, int], list[int]]:
    """(base layer, KV head) -> the layers of that block, base first, for every block of the profile."""
    out: dict[tuple[int, int], list[int]] = {}
    for li, row in enumerate(base_of):
        for h, b in enumerate(row):
            out.setdefault((b, h), []).append(li)
    return out


def spread(total: int, weights: list[int], low: int, high: int) -> list[int]:
    """Per-block token counts n_i in [low, high] with sum w_i n_i as close to `total` from below
    as a uniform count plus one extra token for some blocks allows (heaviest blocks first, ties
    by index: deterministic)."""
    W = sum(weights)
    n = max(low, min(high, total // W))
    counts = [n] * len(weights)
    rest = total - n * W
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        if rest >= weights[i] and counts[i] < high:
            counts[i] += 1
            rest -= weights[i]
    return counts


@dataclass(frozen=True)
class PoDPolicy(Policy):
    """PoD (ALGORITHMS.md 4): non-base layers of a head's block keep keys of proximal tokens only.

    [F] sinks 16; blocks per KV head from the HeadProfile (greedy 1 - JSD >= 0.5 against
    the block's base layer, [P] at KV-head granularity); [P] training-free score sharing:
    distant logits of a non-base layer are q_base . K_base (the base layer's query at the same
    step, per query head of the GQA group). The segment is prefilled with full attention and
    compressed after, as every policy here is; later segments, questions and decoded tokens
    are proximal in every layer (every layer keeps their keys).

    Budget: `kept` counts K and V rows separately (ALGORITHMS.md 0.3). Two stages:
    * PoD alone, while it can reach `kept`: every token stays, and the recent window (the
      paper's n_r) is sized so the realised fraction is the request. Only keys of non-base
      (layer, head) pairs can go, so this covers [1 - nonbase / (2 L Hkv), 1] up to the
      proximal rows (on SmolLM2-135M's profile, 27 of 90 pairs non-base: kept >= ~0.855).
      With eviction on, the window never shrinks below `window`.
    * [P] Eviction (`evict`, the paper's PoD + SnapKV, with the paper's exact recipe not
      published): below that range, tokens are dropped. They are chosen once per (block,
      KV head), so every layer of a block keeps the same tokens and a distant row's token
      is always held by its base head: the block's score of a token is the `block_score`
      (mean or max) over the block's layers of the scorer's per-layer score (`snapkv`:
      window attention of the last `window` queries, mean over the GQA group, `kernel`
      average pooling, as the `snapkv` policy; `kvzip`: the reconstruction score, costs
      KVzip's extra pass). The first `sinks` and the last `window` tokens are always kept
      and are the proximal ones; the other kept tokens are distant in non-base layers.
      [P] Every (layer, head) keeps the same number n of tokens (SnapKV's uniform
      allocation, one token more for some blocks to hit the budget), solved from
      sum over blocks of [2 n + (m - 1)(n + sinks + window)] = kept 2 L Hkv S for blocks of
      m layers, so PoD's saved keys buy more kept tokens. Heads in single-layer blocks are
      plain SnapKV (or KVzip-scored) heads. Reachable: kept >= (sinks + window) / S; lower is
      an InvalidInput, as for the scorers.
    `evict="none"` is PoD alone: a `kept` below its range is an InvalidInput naming the
    range (below 0.5 at construction). With a budget >= the segment, or kept 1, the result
    equals `full`.
    """

    name = "pod"
    needs_profile = True
    sinks: int = 16
    evict: str = "snapkv"
    window: int = 32
    kernel: int = 7
    block_score: str = "mean"
    # [P] "retrieval": the head profile's retrieval heads (RazorAttention's, induction 0.14 + echo 0.01)
    # keep their own keys in every layer (each is the base of its own block); "none": the profile's blocks;
    # "head": the KV head that borrows its distant logits in the most layers (ties: the lowest index) keeps
    # its own keys in every layer (its blocks dissolved); "layer": in a layer where every KV head borrows,
    # head (layer mod Hkv) keeps its own keys;
    # ablations of score sharing: "kv<N>" (e.g. "kv0") dissolves KV head N's blocks, "all" every block
    # (every layer keeps its own keys: no sharing, the same scorer and uniform allocation, fewer tokens)
    # unset: "none" in the reuse regime, `query_aware_protect` in the query-aware one (tuned on --text stdlib)
    protect: str | None = optional(None)
    query_aware_protect: ClassVar[str] = "none"  # the `share` gate decides which pairs borrow
    # the snapkv eviction score's observation signal (policies/scoring.py); unset: the regime's
    # (window; `query_aware_signal` in the query-aware regime)
    signal: str | None = optional(None)
    query_aware_signal: ClassVar[str] = "window+kvzip"  # tuned on bench.quality --text stdlib
    # [P] "model": the eviction stage's tokens chosen over every (block, head) of the model at once
    # (the mix over model-wide means; a token of an m-layer block costs m + 1 rows and is ranked by its
    # block's summed score per row); "head": every (layer, head) the same count (the uniform split).
    # Unset: "head", and `query_aware_scope` ("model") in the query-aware regime
    scope: str | None = optional(None)
    weight: float | None = optional(None)  # the reconstruction's share of the window+kvzip mix (None: 0.5)
    query_aware_scope: ClassVar[str] = "model"  # tuned on --text stdlib --suite full
    query_aware_weight: ClassVar[float | None] = 0.8
    # [P] PoD's inter-layer attention similarity measured per request (query-aware regime: the question's
    # queries over the segment's rows past the sinks): a non-base (layer, KV head) pair keeps borrowing its
    # distant logits only where 1 - JSD (base 2, mean over the window queries and the GQA group) between its
    # own attention and its base layer's is >= `share`; below it the pair keeps its own keys (leaves its
    # block). Unset: no gate in the reuse regime, `query_aware_share` in the query-aware one
    share: float | None = optional(None)
    query_aware_share: ClassVar[float | None] = 0.85  # tuned on --text stdlib --suite full

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks, window=self.window, kernel=self.kernel)
        if self.evict not in EVICTORS:
            raise InvalidInput(f"policy 'pod': evict={self.evict!r}; allowed: {', '.join(EVICTORS)}")
        if self.protect is not None and self.protect not in PROTECTS[:5] and not (
                self.protect[:2] == "kv" and self.protect[2:].isdigit()):
            raise InvalidInput(f"policy 'pod': protect={self.protect!r}; allowed: {', '.join(PROTECTS)}")
        from headwise.policies.scoring import check_signal

        check_signal(self, self.signal)
        from headwise.policies.scoring import check_scope

        check_scope(self, self.scope, self.weight)
        if self.evict != "snapkv" and (self.scope == "model" or self.weight is not None):
            raise InvalidInput("policy 'pod': scope and weight are the snapkv eviction's; they need evict='snapkv'")
        if self.signal not in (None, "window") and self.evict != "snapkv":
            raise InvalidInput(f"policy 'pod': signal={self.signal!r} is the snapkv eviction's; it needs evict='snapkv'")
        if self.share is not None and (isinstance(self.share, bool) or not isinstance(self.share, (int, float))
                                       or not 0.0 <= self.share <= 1.0):
            raise InvalidInput(f"policy 'pod': share={self.share!r} must be a similarity in [0, 1]")
        if self.block_score not in BLOCK_SCORES:
            raise InvalidInput(f"policy 'pod': block_score={self.block_score!r}; allowed: {', '.join(BLOCK_SCORES)}")
        if self.evict == "none" and self.kept < 0.5:
            raise InvalidInput(f"policy 'pod': kept={self.kept} is below 0.5; with evict='none' PoD drops only keys of "
                               "non-base layers, so it keeps at least half of the K+V rows: allowed range [0.5, 1] "
                               "(less on real profiles); use evict='snapkv' to go lower")

    @property
    def capture(self) -> Capture:
        if self.evict == "snapkv":
            from headwise.policies.scoring import signal_capture

            return signal_capture(self.signal, self.window)
        if self.evict == "kvzip":
            return Capture(reconstruction=True)
        return Capture()

    def query_aware_form(self) -> "PoDPolicy":
        if self.evict != "snapkv":
            return self
        from headwise.policies.base import query_aware_defaults

        form = query_aware_defaults(self)
        if self.share is None and self.query_aware_share is not None:
            form = dataclasses.replace(form, share=self.query_aware_share)
        return form if self.protect is not None else dataclasses.replace(form, protect=self.query_aware_protect)

    def params(self) -> dict:
        """`protect` "none" is the unset reuse regime's (stored caches keep their keys)."""
        out = super().params()
        if out.get("protect") == "none":
            del out["protect"]
        return out

    @property
    def floor(self) -> int:
        """Smallest recent window of the PoD-alone stage: `window` with eviction on, else 0."""
        return 0 if self.evict == "none" else self.window

    def blocks(self, ctx: CompressContext, num_kv_heads: int) -> list[list[int]]:
        """base_of[l][h]: the first layer of the block of (l, h), from the head profile."""
        if ctx.profile is None:
            raise InvalidInput("policy 'pod' needs a head profile (PoD layer blocks); run `headwise profile --model PATH` "
                               "or prefill through ModelRunner.prefill_segment, which loads it")
        base_of = ctx.profile.check(ctx.num_layers, num_kv_heads).base_of
        bad = [(li, h) for li, row in enumerate(base_of) for h, b in enumerate(row) if not 0 <= b <= li]
        if bad:
            raise InvalidInput(f"head profile: base layer of (layer, head) {bad[0]} is not an earlier layer; recompute it")
        bad = [(li, h) for li, row in enumerate(base_of) for h, b in enumerate(row) if base_of[b][h] != b]
        if bad:
            raise InvalidInput(f"head profile: the base layer of (layer, head) {bad[0]} is itself in another block; "
                               "recompute it")
        if self.protect == "retrieval":  # a retrieval head leaves its block (its members keep their base)
            base_of = [list(row) for row in base_of]
            for li, h in ctx.profile.retrieval_order():
                base_of[li][h] = li
        elif self.protect == "layer":  # no layer with every head borrowing: one of them leaves its block
            base_of = [list(row) for row in base_of]
            for li, row in enumerate(base_of):
                if all(b != li for b in row):
                    row[li % num_kv_heads] = li
        elif self.protect not in (None, "none"):  # "head", "all" or "kv<N>": those blocks dissolved
            if self.protect == "head":
                borrows = [sum(row[h] != li for li, row in enumerate(base_of)) for h in range(num_kv_heads)]
                heads = [max(range(num_kv_heads), key=lambda h: (borrows[h], -h))]
            else:
                heads = range(num_kv_heads) if self.protect == "all" else [int(self.protect[2:])]
            if max(heads) >= num_kv_heads:
                raise InvalidInput(f"policy 'pod': protect={self.protect!r} names KV head {max(heads)}; the model has "
                                   f"{num_kv_heads}")
            base_of = [[li if h in heads else b for h, b in enumerate(row)] for li, row in enumerate(base_of)]
        return base_of

    def gate(self, states: list[LayerState], base_of: list[list[int]]) -> list[list[int]]:
        """`share` set and window queries captured: each non-base pair whose attention similarity
        to its base layer (`similarity`) is below `share` leaves its block (keeps its own keys)."""
        if self.share is None or states[0].window_queries is None:
            return base_of
        out = [list(row) for row in base_of]
        attn: dict[tuple[int, int], Tensor] = {}  # a base layer's attention, once for all of its block

        def of(li: int, h: int) -> Tensor:
            if (li, h) not in attn:
                attn[li, h] = window_attention(states[li], h, self.sinks)
            return attn[li, h]

        for li, row in enumerate(base_of):
            for h, b in enumerate(row):
                if b != li and attention_similarity(of(li, h), of(b, h)) < self.share:
                    out[li][h] = li
        return out

    def realised(self, S: int, base_of: list[list[int]], recent: int) -> float:
        """(K rows + V rows) / (2 L Hkv S) for PoD alone with a recent window of `recent` tokens."""
        L, H = len(base_of), len(base_of[0])
        nonbase = sum(base_of[li][h] != li for li in range(L) for h in range(H))
        prox = int(proximal(S, self.sinks, recent).sum())
        return ((2 * L * H - nonbase) * S + nonbase * prox) / (2 * L * H * S)

    def recent_for(self, S: int, base_of: list[list[int]]) -> int:
        """Recent window of PoD alone so that (K rows + V rows) / (2 L Hkv S) is closest to `kept`
        (at least `floor`)."""
        L, H = len(base_of), len(base_of[0])
        nonbase = sum(base_of[li][h] != li for li in range(L) for h in range(H))
        if nonbase == 0:
            return S
        # K rows kept: (L H - nonbase) S + nonbase (sinks + recent); V rows: L H S
        target = self.kept * 2 * L * H * S - (2 * L * H - nonbase) * S
        return int(max(0, min(S - self.sinks, max(self.floor, round(target / nonbase) - self.sinks))))

    def evicts(self, S: int, base_of: list[list[int]]) -> bool:
        """Whether `kept` needs the eviction stage for an S-token segment (raises where nothing reaches it)."""
        low = self.realised(S, base_of, self.floor)
        if self.kept >= low - 1e-9:
            return False
        if self.evict == "none":
            raise InvalidInput(
                f"policy 'pod': kept={self.kept} is out of reach: PoD drops only keys of non-base layers, so with this "
                f"head profile a {S}-token segment keeps a fraction in [{low:.3f}, 1]; raise kept, use evict='snapkv' "
                "or use another policy")
        return True

    def token_counts(self, S: int, base_of: list[list[int]], window: int | None = None) -> dict[tuple[int, int], int]:
        """Eviction stage: (base layer, KV head) -> tokens every layer of that block keeps (`window`:
        the forced last rows, default the policy's; 0 in the query-aware regime)."""
        L, H = len(base_of), len(base_of[0])
        members = block_members(base_of)
        window = self.window if window is None else window
        P = int(proximal(S, self.sinks, window).sum())
        nonbase = L * H - len(members)
        # a block of m layers with n tokens holds 2 n (base) + (m - 1)(n + P) rows (non-base: V of n, K of P)
        weights = [len(m) + 1 for m in members.values()]
        total = round(self.kept * 2 * L * H * S) - P * nonbase
        if total < P * sum(weights):
            raise InvalidInput(
                f"policy 'pod': kept={self.kept} keeps {max(0, total) / sum(weights):.0f} tokens per head of this "
                f"{S}-token segment, fewer than sinks + window = {P}; raise kept (>= {P / S:.3f}) or lower the window/sinks")
        return dict(zip(members, spread(total, weights, P, S), strict=True))

    def layer_scores(self, state: LayerState, ctx: CompressContext) -> Tensor:
        """[Hkv, S] fp32 per-layer token score of the eviction scorer."""
        if self.evict == "kvzip":
            if state.reconstruction is None:
                raise InvalidInput("policy 'pod' with evict='kvzip' needs the reconstruction scores; prefill with the "
                                   "policy's capture")
            return state.reconstruction.float()
        from headwise.policies.snapkv import SnapKVPolicy

        return SnapKVPolicy(kept=self.kept, window=self.window, sinks=self.sinks, kernel=self.kernel,
                            signal=self.signal, weight=self.weight).score(state, ctx).float()

    def select(self, states: list[LayerState], base_of: list[list[int]], ctx: CompressContext) -> dict[tuple[int, int], Tensor]:
        """Eviction stage: (base layer, KV head) -> sorted int64 indices of the tokens the block keeps."""
        S, W = states[0].num_tokens, forced_window(states[0], self.window)
        counts = self.token_counts(S, base_of, W)
        if self.scope == "model":
            return self.select_global(states, base_of, ctx, W)
        scores = torch.stack([self.layer_scores(st, ctx) for st in states])  # [L, Hkv, S]
        forced = int(proximal(S, self.sinks, W).sum())
        out = {}
        for (b, h), layers in block_members(base_of).items():
            s = scores[layers, h]
            s = s.mean(0) if self.block_score == "mean" else s.amax(0)
            out[(b, h)] = keep_top(s[None], counts[(b, h)] - forced, self.sinks, W)[0]
        return out

    def select_global(self, states: list[LayerState], base_of: list[list[int]], ctx: CompressContext,
                      W: int) -> dict[tuple[int, int], Tensor]:
        """scope "model": every block's forced (proximal) tokens, then the model's best (block, token)
        pairs by the block's summed score per row it costs (m + 1 rows for an m-layer block: K and V
        in the base layer, V in the others), until the budget's rows are spent."""
        from headwise.policies.scoring import model_scores

        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        scores = model_scores(self.layer_scores, states, ctx)  # [L, Hkv, S]
        prox = proximal(S, self.sinks, W).to(scores.device)
        members = block_members(base_of)
        free = round(self.kept * 2 * L * H * S) - 2 * L * H * int(prox.sum())  # rows left after the forced tokens
        value, cost = [], []
        for (_, h), layers in members.items():
            m = len(layers)
            v = scores[layers, h].sum(0) / (m + 1)
            value.append(v.masked_fill(prox, float("-inf")))
            cost.append(torch.full((S,), m + 1, dtype=torch.long, device=scores.device))
        value, cost = torch.stack(value).flatten(), torch.stack(cost).flatten()  # [blocks * S]
        order = value.argsort(descending=True, stable=True)
        take = order[(cost[order].cumsum(0) <= free) & torch.isfinite(value[order])]
        chosen = torch.zeros_like(value, dtype=torch.bool)
        chosen[take] = True
        chosen = chosen.view(len(members), S) | prox
        return {key: chosen[i].nonzero().flatten() for i, key in enumerate(members)}

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        ctx = ctx or CompressContext(num_layers=len(states))
        S, H = states[0].num_tokens, states[0].num_kv_heads
        base_of = self.gate(states, self.blocks(ctx, H))
        meta = {"policy": self.params()}
        if not self.evicts(S, base_of):
            prox = proximal(S, self.sinks, self.recent_for(S, base_of)).to(states[0].keys.device)
            layers = [self.layer_cache(st, base_of[i], i, prox) for i, st in enumerate(states)]
            return CompactCache(layers, seq_len=start + S, start=start, meta=meta)
        keep = self.select(states, base_of, ctx)
        prox = proximal(S, self.sinks, forced_window(states[0], self.window)).to(states[0].keys.device)
        layers = [self.evicted_layer_cache(st, base_of[i], i, keep, prox) for i, st in enumerate(states)]
        return CompactCache(layers, seq_len=start + S, start=start, meta=meta)

    @staticmethod
    def layer_cache(state: LayerState, bases: list[int], layer: int, prox: Tensor) -> LayerCache:
        """PoD alone: base heads keep everything; the others keep keys of `prox` rows ([S] bool) only."""
        if bool(prox.all()) or all(b == layer for b in bases):
            return keep_all(state)
        H = state.num_kv_heads
        shared = [bases[h] != layer for h in range(H)]
        keys = [state.keys[h][prox] if shared[h] else state.keys[h] for h in range(H)]
        distant = [~prox if shared[h] else torch.zeros_like(prox) for h in range(H)]
        return LayerCache.from_heads(keys, list(state.values), [state.positions] * H, distant=distant,
                                     distant_from=[bases[h] if shared[h] else -1 for h in range(H)])

    @staticmethod
    def evicted_layer_cache(state: LayerState, bases: list[int], layer: int, keep: dict[tuple[int, int], Tensor],
                            prox: Tensor) -> LayerCache:
        """Eviction stage: head h keeps the tokens its block chose (V always; K too in the base layer
        and for `prox` tokens, else the row is distant and scored from the base layer)."""
        keys, values, positions, distant, dfrom = [], [], [], [], []
        for h, b in enumerate(bases):
            idx = keep[(b, h)]
            far = ~prox[idx] if b != layer else torch.zeros(idx.numel(), dtype=torch.bool, device=idx.device)
            keys.append(state.keys[h][idx[~far]])
            values.append(state.values[h][idx])
            positions.append(state.positions[idx])
            distant.append(far)
            dfrom.append(b if bool(far.any()) else -1)
        return LayerCache.from_heads(keys, values, positions, distant=distant, distant_from=dfrom)
