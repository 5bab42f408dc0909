"""EMS merged rows: every original token is kept, merged exactly once, or evicted."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.policies import get_policy
from headwise.policies.base import CompressContext, LayerState


def _state(S=600, H=2, d=16, seed=0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(H, 20, d, generator=g)  # few directions: plenty of redundancy to merge
    pick = torch.randint(0, 20, (S,), generator=g)
    k = base[:, pick] + 0.1 * torch.randn(H, S, d, generator=g)
    v = base[:, pick].flip(-1) + 0.1 * torch.randn(H, S, d, generator=g)
    q = torch.randn(2 * H, 32, d, generator=g)
    cs = torch.rand(2 * H, S, generator=g) * torch.arange(S, 0, -1)
    return LayerState(0, k, v, torch.arange(100, 100 + S), 0.25, window_queries=q, column_sums=cs)


@pytest.mark.parametrize("mode", ["none", "count", "mass"])
def test_every_token_kept_merged_once_or_evicted(mode):
    st = _state()
    layer = get_policy("ems", kept=0.25, log_weight=mode).compress_layer(st, CompressContext(1))
    assert layer.recall is not None and layer.recall.num_groups > 0
    for h in range(layer.num_heads):
        a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
        kept = [p for p in layer.positions[a:b].tolist() if p >= 0]
        merged = []
        for r in range(a, b):
            rid = int(layer.recall_ids[r])
            if rid < 0:
                assert layer.positions[r] >= 0 and float(layer.log_weights[r]) == 0.0
                continue
            assert int(layer.recall.heads[rid]) == h and layer.positions[r] == -1
            pos, keys, values = layer.recall.group(rid)
            idx = pos - 100
            assert torch.equal(keys, st.keys[h, idx]) and torch.equal(values, st.values[h, idx])
            assert pos.numel() >= 2  # a centre and at least one member
            merged += pos.tolist()
            lw = float(layer.log_weights[r])
            if mode == "count":
                assert lw == pytest.approx(math.log(pos.numel()), rel=1e-6)
            elif mode == "mass":
                assert lw > 0
            else:
                assert lw == 0.0
        assert len(merged) == len(set(merged))  # merged exactly once
        assert not set(merged) & set(kept)  # never both kept and merged
        assert set(kept) | set(merged) <= set(range(100, 700))
        assert len(kept) + len(merged) < 600  # some tokens evicted (dropped or zero class)
        assert set(range(700 - 32, 700)) <= set(kept)  # the window is always kept


def test_zero_class_drops_dissimilar_tokens():
    """With a similarity threshold no pair reaches, nothing is merged: all go to the zero class."""
    st = _state()
    layer = get_policy("ems", kept=0.25, tau=1.0).compress_layer(st, CompressContext(1))
    assert layer.recall is None and bool((layer.positions >= 0).all())
    loose = get_policy("ems", kept=0.25, tau=0.0).compress_layer(st, CompressContext(1))
    assert loose.recall is not None


def test_merged_value_is_the_score_weighted_mean():
    st = _state(H=1)
    p = get_policy("ems", kept=0.25)
    layer = p.compress_layer(st, CompressContext(1))
    score = p.score(st)[0]
    rid = int(layer.recall_ids[layer.recall_ids >= 0][0])
    row = int((layer.recall_ids == rid).nonzero()[0])
    pos, _, values = layer.recall.group(rid)
    w = score[pos - 100].clamp_min(1e-12)
    torch.testing.assert_close(layer.values[row], (w[:, None] * values).sum(0) / w.sum(), atol=1e-5, rtol=1e-5)
