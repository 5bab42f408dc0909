"""scope="model" (every row of the model ranked at once) and the mix's `weight`
(headwise/policies/scoring.py ModelNorm, model_scores; base.py ScorerPolicy.model_keep)."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.policies import get_policy
from headwise.policies.base import CompressContext, LayerState
from headwise.policies.scoring import MIX_SKIP, group_reduce, model_scores, observation, window_scores

L, H, G, S, D = 4, 3, 2, 600, 16


def _states(seed: int = 0) -> list[LayerState]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for li in range(L):
        k = torch.randn(H, S, D, generator=g)
        rec = torch.rand(H, S, generator=g) ** 4 * (1 + 9 * li)  # layers of very different scales
        out.append(LayerState(layer=li, keys=k, values=torch.randn(H, S, D, generator=g), positions=torch.arange(S),
                              scaling=D ** -0.5, window_queries=torch.randn(H * G, 32, D, generator=g), reconstruction=rec,
                              column_sums=torch.rand(H * G, S, generator=g) * torch.arange(S, 0, -1)))
    return out


def _rows(cache) -> list[set]:
    out = []
    for layer in cache.layers:
        for h in range(layer.num_heads):
            a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
            out.append(set(layer.positions[a:b].tolist()))
    return out


def test_model_scope_on_the_reconstruction_is_kvzips_global_ranking():
    st = _states()
    ctx = CompressContext(L)
    for kept in (0.5, 0.25, 0.1):
        ours = get_policy("snapkv", kept=kept, signal="kvzip", scope="model", sinks=4, window=8, kernel=0)
        assert _rows(ours.compress(st, 0, ctx)) == _rows(get_policy("kvzip", kept=kept).compress(st, 0, ctx))


def test_model_scope_mix_is_over_model_wide_means():
    st = _states(1)
    for w in (0.5, 0.8):
        pol = get_policy("snapkv", kept=0.25, signal="window+kvzip", scope="model", weight=w, kernel=0)
        got = model_scores(pol.score, st, CompressContext(L))
        win = torch.stack([group_reduce(window_scores(s, 32), H) for s in st])
        rec = torch.stack([s.reconstruction for s in st])
        want = 2 * (1 - w) * win / win[..., MIX_SKIP:].mean() + 2 * w * rec / rec[..., MIX_SKIP:].mean()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # per head (scope "head"), each head's own means: a layer's scale does not matter there
    s = st[2]
    scaled = LayerState(**{**s.__dict__, "reconstruction": s.reconstruction * 100})
    torch.testing.assert_close(observation(s, "window+kvzip", 32), observation(scaled, "window+kvzip", 32))


@pytest.mark.parametrize("name", ["snapkv", "ahakv", "taskkv", "ems", "adakv"])
def test_model_scope_moves_rows_between_heads_and_hits_kept(name):
    st = _states(2)
    ctx = CompressContext(L)
    for kept in (0.5, 0.25, 0.1):
        out = get_policy(name, kept=kept, signal="window+kvzip", scope="model", weight=0.8).compress(st, 0, ctx)
        assert abs(out.kept_fraction() - kept) <= 0.01
        lens = torch.cat([layer.head_lengths() for layer in out.layers])
        assert lens.unique().numel() > 1  # ragged across heads and layers
        head = get_policy(name, kept=kept, signal="window+kvzip", scope="layer" if name == "adakv" else "head",
                          weight=0.8).compress(st, 0, ctx)
        assert _rows(out) != _rows(head)


def test_weight_leans_on_the_reconstruction():
    st = _states(3)
    ctx = CompressContext(L)
    rec_only = _rows(get_policy("snapkv", kept=0.1, signal="kvzip", scope="model").compress(st, 0, ctx))
    near = [_rows(get_policy("snapkv", kept=0.1, signal="window+kvzip", scope="model", weight=w).compress(st, 0, ctx))
            for w in (0.5, 0.95)]
    overlap = [sum(len(a & b) for a, b in zip(n, rec_only, strict=True)) for n in near]
    assert overlap[1] > overlap[0]
    assert _rows(get_policy("snapkv", kept=0.1, signal="window+kvzip", weight=0.5).compress(st, 0, ctx)) == \
        _rows(get_policy("snapkv", kept=0.1, signal="window+kvzip").compress(st, 0, ctx))  # 0.5 is the unset weight


def test_bad_scope_and_weight_raise():
    for name in ("snapkv", "ahakv", "taskkv", "ems", "pod"):
        with pytest.raises(InvalidInput, match="scope"):
            get_policy(name, kept=0.25, scope="layers")
        with pytest.raises(InvalidInput, match="weight"):
            get_policy(name, kept=0.25, weight=1.5)
    with pytest.raises(InvalidInput, match="weight"):
        get_policy("adakv", kept=0.25, weight=-0.1)
    with pytest.raises(InvalidInput, match="evict='snapkv'"):
        get_policy("pod", kept=0.25, evict="kvzip", scope="model")
    assert "scope" not in get_policy("adakv", kept=0.25, scope="layer").params()  # the reuse default keeps its key
