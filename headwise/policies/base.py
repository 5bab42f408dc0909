"""The policy interface: turn a segment's per-layer prefill state into ragged per-head rows.

A policy is a frozen dataclass validated in `__post_init__`. Its one budget knob is
`kept`, the kept fraction of the segment's rows. Scorer policies only write `score()`;
`ScorerPolicy` owns the top-k and the gather (kvpress's ScorerPress habit).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput


def optional(default: Any) -> Any:
    """A setting added to a policy after its caches were stored: out of params() at its default."""
    return dataclasses.field(default=default, metadata={"optional": True})


@dataclass(frozen=True)
class Capture:
    """What the runner must record during prefill for a policy."""

    window: int = 0  # last W post-RoPE queries of the segment, per layer
    column_sums: bool = False  # causal attention received by each key from all segment queries
    reconstruction: bool = False  # max attention each key gets while the model re-reads the segment
    hidden: bool = False  # each layer's normed input hidden states (what a learned scorer reads)
    reconstruction_span: int = 0  # 0: exact KVzip; N: each chunk attends to the rows within N tokens of its span
    reconstruction_precision: str = "fp32"  # "bf16": the pass's products in bfloat16

    def merge(self, other: "Capture") -> "Capture":
        asks = [c for c in (self, other) if c.reconstruction]
        spans = [c.reconstruction_span for c in asks]
        span = 0 if not spans or 0 in spans else max(spans)  # the exact pass serves both
        fp32 = not asks or any(c.reconstruction_precision == "fp32" for c in asks)
        return Capture(max(self.window, other.window), self.column_sums or other.column_sums,
                       self.reconstruction or other.reconstruction, self.hidden or other.hidden, span,
                       "fp32" if fp32 else "bf16")


@dataclass
class LayerState:
    """What prefill of one segment leaves for the policy, for one layer.

    keys, values:    [Hkv, S, d] post-RoPE rows of the segment
    positions:       [S] int64 original positions
    window_queries:  [Hq, W, d] post-RoPE queries of the last W segment positions, or None
    column_sums:     [Hq, S] fp32 attention each key received from the segment, or None
    reconstruction:  [Hkv, S] fp32 max attention each key received while the model repeated
                     the segment (KVzip-style, query-agnostic), or None
    hidden:          [S, D] the layer's normed input (input_layernorm of the residual), or None
    window_keys:     [Hkv, W, d] keys of the window's own rows when they come AFTER the segment
                     (query-aware regime: the window is the question, which is not compressed);
                     None when the window is the segment's own last W rows (the default)
    """

    layer: int
    keys: Tensor
    values: Tensor
    positions: Tensor
    scaling: float
    window_queries: Tensor | None = None
    column_sums: Tensor | None = None
    reconstruction: Tensor | None = None
    hidden: Tensor | None = None
    window_keys: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]


@dataclass
class CompressContext:
    """Whole-model facts a policy may need beside one layer's state."""

    num_layers: int
    model_id: str = ""
    profile: Any = None  # a HeadProfile where the policy family needs one
    norm: Any = None  # scoring.ModelNorm while a scope="model" policy scores (model-wide means of its mix)


@dataclass(frozen=True)
class Policy:
    """Base of every compression policy. `kept` is the kept fraction of the segment, in (0, 1]."""

    name: ClassVar[str] = ""
    reusable: ClassVar[bool] = True  # query-agnostic: the result may be stored and reused
    needs_profile: ClassVar[bool] = False  # compress reads ctx.profile (a HeadProfile: razor, pod)
    kept: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.kept, (int, float)) or not (0.0 < float(self.kept) <= 1.0) or math.isnan(self.kept):
            raise InvalidInput(f"kept fraction {self.kept!r} is outside the allowed range (0, 1]")

    @property
    def capture(self) -> Capture:
        return Capture()

    def query_aware_form(self) -> "Policy":
        """The policy as the query-aware regime runs it (headwise/models/query_aware.py): settings
        left unset take that regime's defaults. Here: itself."""
        return self

    def params(self) -> dict[str, Any]:
        """Canonical settings: everything that changes the bytes (goes into segment keys). A
        setting added after caches were stored (`optional`) is left out at its default, so
        those caches keep their keys."""
        out = {"policy": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not (f.metadata.get("optional") and v == f.default):
                out[f.name] = v
        return out

    def budget(self, num_tokens: int) -> int:
        """Rows kept per head for a segment of num_tokens (uniform allocation)."""
        return max(1, min(num_tokens, round(self.kept * num_tokens)))

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        """The segment's cache: one LayerCache per layer, positions start..start+S."""
        ctx = ctx or CompressContext(num_layers=len(states))
        layers = [self.compress_layer(s, ctx) for s in states]
        S = states[0].num_tokens
        return CompactCache(layers, seq_len=start + S, start=start, meta={"policy": self.params()})

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        raise NotImplementedError


class ModelScopedPolicy(Policy):
    """A policy with a `scope` setting: "model" ranks every row of the model at once
    (`compress_model`, given the segment's sizes and metadata); any other scope compresses layer by layer."""

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        if self.scope != "model":
            return super().compress(states, start, ctx)
        ctx, S, L, H, meta, whole = model_scope_start(self, states, start, ctx)
        return whole if whole is not None else self.compress_model(states, start, ctx, S, L, H, meta)

    def compress_model(self, states: list[LayerState], start: int, ctx: CompressContext, S: int, L: int, H: int,
                       meta: dict) -> CompactCache:
        raise NotImplementedError


def check_budget(policy, budget: int, protected: int, what: str = "sinks + window") -> None:
    """Bad parameters fail loudly instead of silently keeping something else."""
    if budget < protected:
        raise InvalidInput(
            f"policy {policy.name!r}: kept={policy.kept} keeps {budget} rows per head, fewer than "
            f"{what} = {protected}; raise kept or lower the window/sinks"
        )


def forced_window(state: LayerState, window: int) -> int:
    """How many of the segment's last rows a policy forces as its observation window: `window`,
    or none in the query-aware regime (`state.window_keys` set), where the window is the
    question, whose rows follow the segment and are kept exactly (as the papers keep their
    observation window), so the segment's own last rows compete like any other."""
    return 0 if state.window_keys is not None else window


def check_ints(policy, **values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise InvalidInput(f"policy {policy.name!r}: {name}={v!r} must be an integer >= 0")


def model_scope_start(policy: Policy, states: list[LayerState], start: int, ctx: CompressContext | None):
    """The common start of a `scope="model"` compress: (ctx, S, L, Hkv, meta, whole), where `whole` is the
    segment kept entire when the budget covers every row (nothing else to do then), else None."""
    ctx = ctx or CompressContext(num_layers=len(states))
    S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
    meta = {"policy": policy.params()}
    whole = CompactCache([keep_all(st) for st in states], start + S, start, meta) if policy.budget(S) >= S else None
    return ctx, S, L, H, meta, whole


def keep_all(state: LayerState) -> LayerCache:
    return LayerCache.from_dense(state.keys, state.values, state.positions)


class HeadRows(NamedTuple):
    """One head's rows as a policy builds them (merged rows included), before LayerCache.from_heads."""

    keys: Tensor  # [n, d]
    values: Tensor  # [n, d]
    positions: Tensor  # [n] int64, -1 for a merged (synthetic) row
    log_weights: Tensor  # [n] fp32
    recall_ids: Tensor  # [n] int64, head-local index into `groups` or NO_RECALL
    groups: list  # (head, sorted original row indices) behind each merged row, in recall-id order


def rows_cache(rows: list[HeadRows], recall=None) -> LayerCache:
    """A LayerCache from each head's HeadRows (recall ids must already be layer-wide)."""
    return LayerCache.from_heads([r.keys for r in rows], [r.values for r in rows], [r.positions for r in rows],
                                 [r.log_weights for r in rows], [r.recall_ids for r in rows], recall=recall)


def keep_top(scores: Tensor, counts: int | list[int], sinks: int, window: int) -> list[Tensor]:
    """The policy template: per head, the first `sinks` and last `window` rows plus the
    top-scored counts[h] rows between them, sorted (int64 indices; gather_rows takes them).

    scores: [H, S] (higher is kept); counts: one count for every head or one per head,
    clamped to the rows between sinks and window.
    """
    H, S = scores.shape
    mid = scores[:, sinks : S - window]  # [H, M] rows that compete
    dev = scores.device
    forced = [torch.arange(sinks, device=dev), torch.arange(S - window, S, device=dev)]
    if isinstance(counts, int):
        top = mid.topk(min(counts, mid.shape[1]), dim=-1).indices + sinks  # [H, k]
        return list(torch.cat([forced[0].expand(H, -1), top, forced[1].expand(H, -1)], 1).sort(dim=-1).values)
    out = []
    for h, k in enumerate(counts):
        top = mid[h].topk(min(int(k), mid.shape[1])).indices + sinks
        out.append(torch.cat([forced[0], top, forced[1]]).sort().values)
    return out


def keep_top_global(scores: Tensor, budget: int, sinks: int, window: int) -> Tensor:
    """The template over a whole model: [L, H, S] scores -> [L, H, S] bool, the `budget` rows
    kept, every (layer, head)'s first `sinks` and last `window` rows forced, the rest the top
    of all layers and heads at once (so heads hold different numbers of rows)."""
    s = scores.float().clone()
    s[..., :sinks] = float("inf")
    if window:
        s[..., s.shape[-1] - window :] = float("inf")
    keep = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)  # the topk indices live there
    keep[s.flatten().topk(budget).indices] = True
    return keep.view(s.shape)


def gather_mask(state: LayerState, keep: Tensor) -> LayerCache:
    """Keep the rows where keep[h] ([Hkv, S] bool) is set."""
    return gather_rows(state, [keep[h].nonzero().flatten() for h in range(keep.shape[0])])


def gather_rows(state: LayerState, indices: list[Tensor]) -> LayerCache:
    """Keep rows indices[h] (sorted, int64) of each head h."""
    ks = [state.keys[h, idx] for h, idx in enumerate(indices)]
    vs = [state.values[h, idx] for h, idx in enumerate(indices)]
    ps = [state.positions[idx] for idx in indices]
    return LayerCache.from_heads(ks, vs, ps)


@dataclass(frozen=True)
class ScorerPolicy(Policy):
    """Keep, per head, the sinks, the last `window` tokens and the top-scored rest.

    Subclasses write `score(state, ctx) -> [Hkv, S]` (higher is kept). `signal` is the
    observation the score reads (policies/scoring.py `observation`): the window queries,
    KVzip's reconstruction attention, kvzap's prediction of it, or window + reconstruction.
    Unset (None), the regime's: the window, and `query_aware_signal` in the query-aware regime.
    `weight`: the reconstruction's share of the window+kvzip mix (None: 0.5). `scope` "head"
    (the papers' uniform per-head budget) or "model" ([P]: every row of the model ranked at once,
    as KVzip ranks, the mix normalised by model-wide means); unset: "head", and
    `query_aware_scope` in the query-aware regime.
    """

    query_aware_signal: ClassVar[str] = "window"
    query_aware_scope: ClassVar[str] = "head"
    query_aware_weight: ClassVar[float | None] = None
    window: int = 32
    sinks: int = 4
    signal: str | None = optional(None)
    scope: str | None = optional(None)
    weight: float | None = optional(None)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, window=self.window, sinks=self.sinks)
        from headwise.policies.scoring import check_scope, check_signal

        check_signal(self, self.signal)
        check_scope(self, self.scope, self.weight)

    @property
    def capture(self) -> Capture:
        from headwise.policies.scoring import signal_capture

        return signal_capture(self.signal, self.window)

    def query_aware_form(self) -> "ScorerPolicy":
        return query_aware_defaults(self)

    def score(self, state: LayerState, ctx: CompressContext) -> Tensor:
        raise NotImplementedError

    def compress(self, states: list[LayerState], start: int, ctx: CompressContext | None = None) -> CompactCache:
        if self.scope != "model":
            return super().compress(states, start, ctx)
        ctx = ctx or CompressContext(num_layers=len(states))
        keep = self.model_keep(states, ctx)
        S = states[0].num_tokens
        layers = [keep_all(st) for st in states] if keep is None else [gather_mask(st, keep[i]) for i, st in enumerate(states)]
        return CompactCache(layers, seq_len=start + S, start=start, meta={"policy": self.params()})

    def model_keep(self, states: list[LayerState], ctx: CompressContext) -> Tensor | None:
        """scope "model": [L, Hkv, S] bool of the kept rows (None: all), round(kept L Hkv S) of them,
        every head's sinks and forced window included, the rest the model's best scores."""
        from headwise.policies.scoring import model_scores

        S, L, H = states[0].num_tokens, len(states), states[0].num_kv_heads
        if self.budget(S) >= S:
            return None
        W = forced_window(states[0], self.window)
        check_budget(self, self.budget(S), self.sinks + W)
        total = max(L * H * (self.sinks + W), round(self.kept * L * H * S))
        return keep_top_global(model_scores(self.score, states, ctx), total, self.sinks, W)

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S = state.num_tokens
        b = self.budget(S)
        if b >= S:
            return keep_all(state)
        W = forced_window(state, self.window)
        check_budget(self, b, self.sinks + W)
        scores = self.score(state, ctx).float()  # [Hkv, S]
        return gather_rows(state, keep_top(scores, b - self.sinks - W, self.sinks, W))


def query_aware_defaults(policy):
    """`policy` with its unset signal / scope / weight given the query-aware regime's defaults
    (its class's `query_aware_signal`, `query_aware_scope`, `query_aware_weight`)."""
    changes = {}
    if policy.signal is None and policy.query_aware_signal != "window":
        changes["signal"] = policy.query_aware_signal
    if getattr(policy, "scope", "head") is None and getattr(policy, "query_aware_scope", "head") != "head":
        changes["scope"] = policy.query_aware_scope
    if getattr(policy, "weight", None) is None and getattr(policy, "query_aware_weight", None) is not None:
        changes["weight"] = policy.query_aware_weight
    return dataclasses.replace(policy, **changes) if changes else policy
