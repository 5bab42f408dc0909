"""RazorAttention: the compensation row, retrieval heads, the global budget split."""

from __future__ import annotations

import math

import pytest
import torch

from headwise.attention import ragged_decode_attention
from headwise.cache.compact import LayerCache
from headwise.policies import get_policy
from headwise.policies.base import CompressContext, LayerState
from headwise.profiles import HeadProfile


def _profile(L: int, H: int, induction=None) -> HeadProfile:
    ind = induction or [[0.0] * H for _ in range(L)]
    return HeadProfile("test", L, H, [[0.0] * H for _ in range(L)], ind, [[0] * H for _ in range(L)])


def _state(S=64, d=8, same_middle=True, seed=0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(1, S, d, generator=g), torch.randn(1, S, d, generator=g)
    if same_middle:  # every token RazorAttention will drop has the same key and value
        k[0, 4:S - 11] = torch.randn(d, generator=g)
        v[0, 4:S - 11] = torch.randn(d, generator=g)
    return LayerState(0, k, v, torch.arange(S), 0.35)


def _full(q, k, v, scaling):
    p = torch.softmax((q[:, 0] @ k.T) * scaling, -1)  # [Hq, S]
    return p @ v


def test_compensation_row_equals_full_attention_when_dropped_tokens_are_identical():
    st = _state()
    ctx = CompressContext(1, profile=_profile(1, 1))
    layer = get_policy("razor", kept=0.25, induction=0.0, echo=0.0, fill="recent").compress_layer(st, ctx)
    assert layer.head_lengths().tolist() == [16]  # 4 sinks + 1 compensation + 11 recent
    q = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(1)) * 2
    out, _ = ragged_decode_attention(q, layer, st.scaling)
    torch.testing.assert_close(out[:, 0], _full(q, st.keys[0], st.values[0], st.scaling), atol=1e-6, rtol=1e-5)
    # the weight is what makes it exact: without log(N_d) the row counts as one token
    plain = LayerCache(layer.keys, layer.values, layer.head_offsets, layer.positions,
                       torch.zeros_like(layer.log_weights), layer.recall_ids)
    wrong, _ = ragged_decode_attention(q, plain, st.scaling)
    assert not torch.allclose(wrong, out, atol=1e-3)


def test_compensation_row_is_the_mean_with_a_handle_to_the_originals():
    st = _state(same_middle=False)
    layer = get_policy("razor", kept=0.25, induction=0.0, echo=0.0, fill="recent").compress_layer(
        st, CompressContext(1, profile=_profile(1, 1)))
    row = (layer.positions == -1).nonzero().flatten()
    assert row.tolist() == [4]
    dropped = torch.arange(4, 64 - 11)
    torch.testing.assert_close(layer.keys[4], st.keys[0, dropped].mean(0))
    assert float(layer.log_weights[4]) == pytest.approx(math.log(dropped.numel()), rel=1e-6)
    pos, keys, values = layer.recall.group(int(layer.recall_ids[4]))
    assert torch.equal(pos, dropped) and torch.equal(keys, st.keys[0, dropped]) and torch.equal(values, st.values[0, dropped])
    assert layer.positions[:4].tolist() == [0, 1, 2, 3] and layer.positions[5:].tolist() == list(range(53, 64))


def test_retrieval_heads_keep_everything_and_budget_is_global():
    L, H, S = 4, 2, 600
    ind = [[0.0, 0.0] for _ in range(L)]
    ind[2][1] = 1.0  # the one retrieval head (round(0.14 * 8) = 1)
    ctx = CompressContext(L, profile=_profile(L, H, ind))
    states = [LayerState(i, torch.randn(H, S, 8), torch.randn(H, S, 8), torch.arange(S), 0.35) for i in range(L)]
    out = get_policy("razor", kept=0.25, fill="recent").compress(states, 0, ctx)
    lengths = [layer.head_lengths().tolist() for layer in out.layers]
    assert lengths[2][1] == S
    others = [n for i, row in enumerate(lengths) for h, n in enumerate(row) if (i, h) != (2, 1)]
    assert max(others) - min(others) <= 1  # the rest share what is left, to one row
    assert abs(out.kept_fraction() - 0.25) < 1e-3
    # at kept 0.1 one full head alone (1/8 of the rows) exceeds the budget: it loses protection
    low = get_policy("razor", kept=0.1, fill="recent").compress(states, 0, ctx)
    assert low.layers[2].head_lengths().tolist()[1] < S and abs(low.kept_fraction() - 0.1) < 1e-3


def test_profile_of_another_shape_is_rejected():
    from headwise.errors import InvalidInput

    st = _state()
    with pytest.raises(InvalidInput, match="layers"):
        get_policy("razor", kept=0.25).compress_layer(st, CompressContext(1, profile=_profile(2, 1)))


def test_snapkv_fill_keeps_scored_rows_and_folds_the_rest():
    g = torch.Generator().manual_seed(2)
    S, d = 600, 8
    k, v = torch.randn(1, S, d, generator=g), torch.randn(1, S, d, generator=g)
    k[0, 200] = 5.0  # the window queries all point at row 200
    st = LayerState(0, k, v, torch.arange(S), 0.35, window_queries=torch.ones(2, 32, d))
    layer = get_policy("razor", kept=0.1, fill="snapkv", induction=0.0, echo=0.0).compress_layer(
        st, CompressContext(1, profile=_profile(1, 1)))
    assert layer.head_lengths().tolist() == [60] and 200 in layer.positions.tolist()
    comp = int((layer.positions == -1).nonzero()[0])
    pos, _, _ = layer.recall.group(int(layer.recall_ids[comp]))
    kept = set(layer.positions.tolist()) - {-1}
    assert set(pos.tolist()) == set(range(S)) - kept  # every dropped row is behind the compensation row
    assert float(layer.log_weights[comp]) == pytest.approx(math.log(S - 59), rel=1e-6)


SETTINGS = [{}, {"compensation": "plain"}, {"compensation": "none"}, {"fill": "recent"}, {"fill": "recent", "compensation": "none"},
            {"fill": "snapkv"}]


@pytest.mark.parametrize("settings", SETTINGS)
def test_settings_full_kept_deterministic(settings):
    """Every razor setting named in docs: full at kept 1, the kept fraction within 1%, deterministic;
    compensation "none" holds only original rows, no synthetic row or recall handle."""
    L, H, S = 3, 2, 600
    ind = [[0.0, 0.0] for _ in range(L)]
    ind[1][0] = 1.0
    ctx = CompressContext(L, profile=_profile(L, H, ind))
    g = torch.Generator().manual_seed(4)
    states = [LayerState(i, torch.randn(H, S, 8, generator=g), torch.randn(H, S, 8, generator=g), torch.arange(S), 0.35,
                         reconstruction=torch.rand(H, S, generator=g), window_queries=torch.randn(2 * H, 32, 8, generator=g))
              for i in range(L)]
    full = get_policy("full").compress(states, 0, ctx)
    one = get_policy("razor", kept=1.0, **settings).compress(states, 0, ctx)
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)
               for a, b in zip(one.layers, full.layers, strict=True))
    for kept in (0.5, 0.25, 0.1):
        p = get_policy("razor", kept=kept, **settings)
        a, b = p.compress(states, 0, ctx), p.compress(states, 0, ctx)
        assert abs(a.kept_fraction() - kept) <= 0.01
        assert all(torch.equal(x.keys, y.keys) and torch.equal(x.positions, y.positions)
                   for x, y in zip(a.layers, b.layers, strict=True))
        synthetic = sum(int((layer.positions == -1).sum()) for layer in a.layers)
        assert (synthetic == 0) == (settings.get("compensation") == "none")


def test_compensation_none_keeps_sinks_and_recent_only():
    L, H, S = 1, 1, 600
    st = LayerState(0, torch.randn(H, S, 8), torch.randn(H, S, 8), torch.arange(S), 0.35)
    layer = get_policy("razor", kept=0.25, compensation="none", induction=0.0, echo=0.0, fill="recent").compress_layer(
        st, CompressContext(L, profile=_profile(L, H)))
    assert layer.positions.tolist() == list(range(4)) + list(range(S - 146, S)) and layer.recall is None


def test_kvzip_fill_keeps_the_best_reconstructed_row():
    S = 600
    rec = torch.zeros(1, S)
    rec[0, 200] = 1.0
    st = LayerState(0, torch.randn(1, S, 8), torch.randn(1, S, 8), torch.arange(S), 0.35, reconstruction=rec)
    layer = get_policy("razor", kept=0.1, fill="kvzip", induction=0.0, echo=0.0).compress_layer(
        st, CompressContext(1, profile=_profile(1, 1)))
    assert 200 in layer.positions.tolist() and layer.head_lengths().tolist() == [60]
    assert get_policy("razor", kept=0.1, fill="kvzip").capture.reconstruction


def test_the_default_fill_is_kvzip_and_needs_the_reconstruction_pass():
    from headwise.errors import InvalidInput

    pol = get_policy("razor", kept=0.1, induction=0.0, echo=0.0)
    assert pol.fill == "kvzip" and pol.capture.reconstruction and pol.capture.window == 0
    assert not get_policy("razor", kept=0.1, fill="recent").capture.reconstruction  # the paper's: one pass
    S = 600
    rec = torch.zeros(1, S)
    rec[0, 200] = 1.0  # far from the recent window: only the reconstruction score keeps it
    st = LayerState(0, torch.randn(1, S, 8), torch.randn(1, S, 8), torch.arange(S), 0.35, reconstruction=rec)
    ctx = CompressContext(1, profile=_profile(1, 1))
    assert 200 in pol.compress_layer(st, ctx).positions.tolist()
    assert 200 not in get_policy("razor", kept=0.1, fill="recent", induction=0.0, echo=0.0).compress_layer(st, ctx).positions.tolist()
    with pytest.raises(InvalidInput, match="reconstruction"):
        pol.compress_layer(LayerState(0, st.keys, st.values, st.positions, 0.35), ctx)
