"""AdaKV head-wise allocation inside a layer."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from headwise.policies import get_policy
from headwise.policies.adakv import head_budgets
from headwise.policies.base import CompressContext, LayerState


@settings(max_examples=50, deadline=None)
@given(heads=st.integers(1, 8), m=st.integers(4, 200), frac=st.floats(0.01, 1.0), alpha=st.floats(0.0, 1.0), seed=st.integers(0, 9999))
def test_budgets_sum_to_the_layer_budget_before_and_after_rounding(heads, m, frac, alpha, seed):
    scores = torch.rand(heads, m, generator=torch.Generator().manual_seed(seed)) ** 4
    free = max(1, int(frac * m))
    raw, rounded = head_budgets(scores, free, alpha)
    assert abs(float(raw.sum()) - heads * free) < 1e-9
    assert int(rounded.sum()) == heads * free
    assert bool((rounded >= 0).all()) and bool((rounded <= m).all())
    assert bool(((rounded - raw).abs() < 1).all())


def test_concentrated_head_gets_more_rows():
    N, d = 600, 16
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, N, d, generator=g) * 0.05
    keys[0] *= 0  # head 0: flat attention; head 1: a few sharp hits
    keys[1, 100:110] = torch.ones(d) * 4
    q = torch.ones(4, 32, d)
    state = LayerState(0, keys, torch.randn(2, N, d, generator=g), torch.arange(N), 0.25, window_queries=q)
    out = get_policy("adakv", kept=0.25).compress_layer(state, CompressContext(1))
    n0, n1 = out.head_lengths().tolist()
    assert n0 + n1 == 2 * 150 and n0 > n1  # ragged, same layer total
    assert all(p in out.positions[n0:].tolist() for p in range(100, 110))


def test_model_scope_moves_rows_between_layers():
    """scope="model": one allocation over every (layer, head), so a layer whose heads attend sharply
    gives rows to a layer whose heads attend flatly; the model's total is exact, each layer's is not."""
    import pytest

    from headwise.errors import InvalidInput

    N, d = 600, 16
    g = torch.Generator().manual_seed(0)
    q = torch.ones(4, 32, d)
    flat = LayerState(0, torch.zeros(2, N, d), torch.randn(2, N, d, generator=g), torch.arange(N), 0.25, window_queries=q)
    keys = torch.randn(2, N, d, generator=g) * 0.05
    keys[:, 100:110] = torch.ones(d) * 4
    sharp = LayerState(1, keys, torch.randn(2, N, d, generator=g), torch.arange(N), 0.25, window_queries=q)
    ctx = CompressContext(2)
    per_layer = get_policy("adakv", kept=0.25).compress([flat, sharp], 0, ctx)
    model = get_policy("adakv", kept=0.25, scope="model").compress([flat, sharp], 0, ctx)
    assert [int(x.head_lengths().sum()) for x in per_layer.layers] == [300, 300]
    a, b = (int(x.head_lengths().sum()) for x in model.layers)
    assert a + b == 600 and a > b
    assert all(p in model.layers[1].positions.tolist() for p in range(100, 110))
    assert "scope" not in get_policy("adakv", kept=0.25).params()
    with pytest.raises(InvalidInput, match="scope"):
        get_policy("adakv", kept=0.25, scope="head")
