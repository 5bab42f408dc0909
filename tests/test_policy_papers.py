"""The papers' ideas on KVzip's signal: whole-budget heads, the value prior, EMS's merge inside
KVzip's global ranking, and the pluggable observation signal of the window-based policies.
(The must-holds of every setting named here run in tests/test_policies.py's matrix.)"""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.policies import get_policy
from headwise.policies.base import CompressContext, LayerState
from headwise.profiles import HeadProfile

L, H, S, D = 4, 3, 600, 16


def _states(seed: int = 0, redundant: bool = False) -> list[LayerState]:
    """L layers of H KV heads with random rows and reconstruction scores (hidden: none)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for li in range(L):
        if redundant:  # few directions: plenty of near-copies for EMS to merge
            base = torch.randn(H, 12, D, generator=g)
            pick = torch.randint(0, 12, (S,), generator=g)
            k = base[:, pick] + 0.05 * torch.randn(H, S, D, generator=g)
            v = base[:, pick].flip(-1) + 0.05 * torch.randn(H, S, D, generator=g)
        else:
            k, v = torch.randn(H, S, D, generator=g), torch.randn(H, S, D, generator=g)
        rec = torch.rand(H, S, generator=g) ** 4
        out.append(LayerState(li, k, v, torch.arange(S), 0.25, reconstruction=rec))
    return out


def _profile(induction) -> HeadProfile:
    return HeadProfile("tiny", L, H, [[0.0] * H for _ in range(L)], induction, [[li] * H for li in range(L)])


def _lengths(cache) -> torch.Tensor:
    return torch.stack([layer.head_lengths() for layer in cache.layers])  # [L, H]


def test_new_settings_stay_out_of_the_segment_key_at_their_defaults():
    assert get_policy("kvzip", kept=0.25).params() == {"policy": "kvzip", "kept": 0.25, "sinks": 4, "window": 8}
    assert "signal" not in get_policy("snapkv", kept=0.25).params()
    assert get_policy("kvzip", kept=0.25, merge="ems").params()["merge"] == "ems"
    assert get_policy("snapkv", kept=0.25, signal="kvzip").params()["signal"] == "kvzip"


def test_retrieval_heads_keep_every_row_and_the_rest_is_ranked_globally():
    ind = [[0.0] * H for _ in range(L)]
    ind[2][1], ind[3][0] = 0.9, 0.8  # the two induction heads RazorAttention protects first
    ctx = CompressContext(L, profile=_profile(ind))
    p = get_policy("kvzip", kept=0.5, heads="retrieval")
    assert p.needs_profile and not get_policy("kvzip").needs_profile
    out = p.compress(_states(), 0, ctx)
    n = _lengths(out)
    assert n[2, 1] == S and n[3, 0] == S
    assert abs(out.kept_fraction() - 0.5) < 0.01
    plain = _lengths(get_policy("kvzip", kept=0.5).compress(_states(), 0, ctx))
    assert plain[2, 1] < S  # not whole without the setting
    with pytest.raises(InvalidInput, match="head profile"):
        p.compress(_states(), 0, CompressContext(L))


def test_whole_heads_take_at_most_their_share_of_the_budget():
    ind = [[0.9] * H for _ in range(L)]  # every head a candidate: only `whole` of the budget may go whole
    ctx = CompressContext(L, profile=_profile(ind))
    for whole, kept in ((0.5, 0.25), (0.0, 0.25), (1.0, 0.5)):
        n = _lengths(get_policy("kvzip", kept=kept, heads="retrieval", whole=whole).compress(_states(), 0, ctx))
        full = int((n == S).sum())
        assert full * (S - 12) <= whole * (kept * L * H * S - 12 * L * H) + 1e-6
        assert full >= 1 or whole == 0.0


def test_heterogeneous_heads_one_per_layer_at_most():
    n = _lengths(get_policy("kvzip", kept=0.5, heads="heterogeneous").compress(_states(), 0, CompressContext(L)))
    whole = (n == S).sum(1)
    assert int(whole.sum()) >= 1 and bool((whole <= 1).all())


def test_value_prior_evicts_a_high_scoring_row_without_value():
    st = _states()
    for s in st:
        s.reconstruction[:, 300] = 1.0  # the best-scored row everywhere ...
        s.values[:, 290:311] = 0.0  # ... whose neighbourhood carries no value
    ctx = CompressContext(L)
    plain = get_policy("kvzip", kept=0.1).compress(st, 0, ctx)
    prior = get_policy("kvzip", kept=0.1, prior="value").compress(st, 0, ctx)
    assert all(300 in layer.positions.tolist() for layer in plain.layers)
    assert not any(300 in layer.positions.tolist() for layer in prior.layers)


def test_ems_merge_keeps_kvzip_s_row_counts_and_merges_evicted_rows():
    ctx = CompressContext(L)
    plain = get_policy("kvzip", kept=0.25).compress(_states(redundant=True), 0, ctx)
    merged = get_policy("kvzip", kept=0.25, merge="ems").compress(_states(redundant=True), 0, ctx)
    assert torch.equal(_lengths(plain), _lengths(merged))  # same rows per head: the budget is unchanged
    groups = sum(layer.recall.num_groups for layer in merged.layers if layer.recall is not None)
    assert groups > 0
    for a, b in zip(plain.layers, merged.layers, strict=True):
        real = b.positions >= 0
        assert set(b.positions[real].tolist()) <= set(a.positions.tolist())  # unmerged rows are KVzip's own


def test_kvzap_signal_needs_the_hidden_states():
    from headwise.policies.scoring import observation

    with pytest.raises(InvalidInput, match="hidden"):
        observation(_states()[0], "kvzap", 8)


def test_window_policies_read_the_reconstruction_signal():
    """With signal=kvzip a window scorer keeps the rows KVzip's pass scores highest, needs no window
    queries, and has no query-aware form."""
    from headwise.models.query_aware import supports_query_aware

    st = _states()[0]
    st.reconstruction[:, 123] = 5.0
    for name in ("snapkv", "ahakv", "taskkv", "adakv", "ems"):
        p = get_policy(name, kept=0.1, signal="kvzip")
        assert p.capture.reconstruction and p.capture.window == 0
        assert not supports_query_aware(p)
        if name != "ems":  # ems needs column sums too
            out = p.compress_layer(st, CompressContext(1))
            assert 123 in out.positions.tolist(), name
    with pytest.raises(InvalidInput, match="signal"):
        get_policy("snapkv", signal="question")
    with pytest.raises(InvalidInput, match="merge"):
        get_policy("kvzip", merge="sometimes")
    with pytest.raises(InvalidInput, match="whole"):
        get_policy("kvzip", whole=1.5)
