"""Scores the window-based policies share: window attention, GQA reduction, pooling.

Each policy file stays one small class over these (SnapKV, AdaKV, AhaKV, Task-KV, EMS,
RazorAttention's snapkv fill, PoD's eviction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.attention import window_probs
from headwise.errors import InvalidInput
from headwise.policies.base import LayerState

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


# ---- the observation signal -------------------------------------------------------------
SIGNALS = ("window", "kvzip", "kvzap", "window+kvzip")
MIX_SKIP = 4  # rows left out of each part's normalising mean in "window+kvzip": the sinks every scorer forces


def check_signal(policy, signal: str | None) -> None:
    """None: the regime's default (window; a policy's query_aware_form may choose another)."""
    if signal is not None and signal not in SIGNALS:
        raise InvalidInput(f"policy {policy.name!r}: signal={signal!r}; allowed: {', '.join(SIGNALS)}")


def signal_capture(signal: str | None, window: int):
    """What the prefill must record for a signal: the window queries, KVzip's reconstruction
    pass, or the hidden states kvzap's scorer reads."""
    from headwise.policies.base import Capture

    if signal == "kvzip":
        return Capture(reconstruction=True)
    if signal == "kvzap":
        return Capture(hidden=True)
    if signal == "window+kvzip":
        return Capture(window=max(1, window), reconstruction=True)
    return Capture(window=max(1, window))


def observation(state: LayerState, signal: str | None, window: int, model_id: str = "", gain: Tensor | None = None,
                weight: float | None = None, norm: "ModelNorm | None" = None) -> Tensor:
    """How much each row is attended to, per KV head: [Hkv, N] fp32, >= 0.

    window (or None): mean attention from the last `window` queries (the document's own last tokens,
            or the question in the query-aware regime), mean over the GQA group;
    kvzip:  the max attention from KVzip's reconstruction queries (the model re-reading the
            document), query-agnostic;
    kvzap:  that score as kvzap's distilled scorer predicts it from the hidden states;
    window+kvzip: both, each divided by its mean over the head's rows (past the first MIX_SKIP,
            the sinks, whose attention would set the scale), then added: a row is kept when the
            window (in the query-aware regime: the question) or the reconstruction needs it.
            `weight` is the reconstruction's share (None: 0.5, equal votes); with a `norm`
            (scope "model") the means are the whole model's, so heads and layers stay comparable.
    """
    if signal == "window+kvzip":
        return mix(observation(state, "window", window, model_id, gain), observation(state, "kvzip", window, model_id),
                   weights=mix_weights(weight), norm=norm, tag="signal")
    if signal == "kvzip":
        if state.reconstruction is None:
            raise InvalidInput("signal 'kvzip' needs the reconstruction scores; prefill with the policy's capture")
        return state.reconstruction.float()
    if signal == "kvzap":
        if state.hidden is None:
            raise InvalidInput("signal 'kvzap' needs the layers' hidden states; prefill with the policy's capture")
        from headwise.profiles.scorer import load_scorer

        return load_scorer(model_id).predict(state).exp()  # predicted log score -> score
    return group_reduce(window_scores(state, window, gain), state.num_kv_heads)


def value_prior(values: Tensor, kernel: int) -> Tensor:
    """AhaKV's value prior: pooled ||v||^2 of each row over its neighbours, normalised by the
    head's max. values [Hkv, N, d] -> [Hkv, N] in (0, 1]."""
    gam = pool1d(values.float().pow(2).sum(-1), kernel, "avg")
    return gam / gam.amax(-1, keepdim=True).clamp_min(1e-30)


def mix_weights(weight: float | None) -> tuple[float, float] | None:
    """(window, reconstruction) weights of the mix for the reconstruction's share `weight`
    (None or 0.5: equal votes, returned as None so the sum is the plain one)."""
    if weight is None or weight == 0.5:
        return None
    return (2.0 * (1.0 - weight), 2.0 * weight)


class ModelNorm:
    """Model-wide means for `mix` (a policy's scope "model"): one collecting pass over every
    layer (`means` None: each part's sum and count are added up), then `finish()`, then the
    scoring pass divides each part by its model-wide mean instead of the head's own, so that
    scores of different (layer, head)s can be ranked together, as KVzip ranks its own."""

    def __init__(self) -> None:
        self.sums: dict = {}
        self.counts: dict = {}
        self.means: dict | None = None

    def add(self, key, body: Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(body.double().sum())
        self.counts[key] = self.counts.get(key, 0) + body.numel()

    def finish(self) -> "ModelNorm":
        self.means = {k: max(self.sums[k] / max(1, self.counts[k]), 1e-30) for k in self.sums}
        return self


def mix(*parts: Tensor, weights=None, norm: ModelNorm | None = None, tag: str = "") -> Tensor:
    """Sum of [H, N] scores, each over its mean per head (rows past MIX_SKIP): scale-free, equal
    votes, or weighted by `weights` (one per part). With a `norm` (ModelNorm), each part's
    model-wide mean instead (collected first: see ModelNorm)."""
    out = None
    for i, x in enumerate(parts):
        body = x[:, MIX_SKIP:] if x.shape[1] > MIX_SKIP else x
        if norm is not None and norm.means is None:
            norm.add((tag, i), body)
        scale = body.mean(-1, keepdim=True) if norm is None or norm.means is None else norm.means[(tag, i)]
        x = x / (scale.clamp_min(1e-30) if isinstance(scale, Tensor) else scale)
        if weights is not None:
            x = x * weights[i]
        out = x if out is None else out + x
    return out


def model_scores(score, states: list[LayerState], ctx) -> Tensor:
    """[L, Hkv, S] scores of `score(state, ctx)` for every layer, with `mix`'s means taken over
    the whole model (two passes: collect, then score; ctx.norm set on a copy)."""
    import dataclasses

    norm = ModelNorm()
    c = dataclasses.replace(ctx, norm=norm)
    for st in states:
        score(st, c)
    norm.finish()
    return torch.stack([score(st, c).float() for st in states])


SCOPES = ("head", "model")


def check_scope(policy, scope: str | None, weight: float | None) -> None:
    """scope: None (the regime's), "head" (each head its own budget, the papers') or "model" (the
    whole model's rows ranked at once); weight: None or the reconstruction's share in [0, 1]."""
    if scope is not None and scope not in SCOPES:
        raise InvalidInput(f"policy {policy.name!r}: scope={scope!r}; allowed: {', '.join(SCOPES)}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0):
        raise InvalidInput(f"policy {policy.name!r}: weight={weight!r} must be the reconstruction's share in [0, 1]")
