"""kvzip: reconstruction scores, a global ragged budget, and its limits."""

from __future__ import annotations

import pytest
import torch

from headwise.attention import prefill_attention_scores, ragged_prefill_attention
from headwise.cache import LayerCache
from headwise.errors import InvalidInput
from headwise.policies import get_policy
from headwise.policies.base import Capture


def test_scores_are_max_attention_and_output_is_unchanged():
    g = torch.Generator().manual_seed(0)
    H, G, n, C, d = 2, 3, 10, 5, 8
    layer = LayerCache.from_dense(torch.randn(H, n, d, generator=g), torch.randn(H, n, d, generator=g), torch.arange(n))
    q = torch.randn(H * G, C, d, generator=g)
    nk, nv = torch.randn(H, C, d, generator=g), torch.randn(H, C, d, generator=g)
    out, scores = prefill_attention_scores(q, layer, nk, nv, 0.5, scored=4, query_from=2)
    assert torch.allclose(out, ragged_prefill_attention(q, layer, nk, nv, 0.5), atol=1e-5)
    for h in range(H):  # reference: explicit causal softmax over [cache rows, new rows]
        K = torch.cat([layer.head(h)[0], nk[h]])
        logits = q[h * G : (h + 1) * G] @ K.T * 0.5
        logits[:, :, n:] += torch.full((C, C), float("-inf")).triu(1)
        p = torch.softmax(logits, -1)
        assert torch.allclose(scores[h], p[:, 2:, n - 4 : n].amax(dim=(0, 1)), atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_query_blocks_change_nothing(monkeypatch, weighted):
    """Scores and output in query blocks of 16 rows (5 blocks, the causal mask cut per block) equal
    the dense reference, with and without log-weights on the cached rows."""
    import headwise.attention as attention

    g = torch.Generator().manual_seed(1)
    H, G, n, C, d = 2, 2, 30, 70, 8
    layer = LayerCache.from_heads([torch.randn(n - 3 * h, d, generator=g) for h in range(H)],
                                  [torch.randn(n - 3 * h, d, generator=g) for h in range(H)],
                                  [torch.arange(n - 3 * h) for h in range(H)],
                                  [torch.rand(n - 3 * h, generator=g) * weighted for h in range(H)])
    q = torch.randn(H * G, C, d, generator=g)
    nk, nv = torch.randn(H, C, d, generator=g), torch.randn(H, C, d, generator=g)
    monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", 1)
    out, scores = prefill_attention_scores(q, layer, nk, nv, 0.5, scored=20, query_from=19)
    torch.testing.assert_close(out, ragged_prefill_attention(q, layer, nk, nv, 0.5), atol=1e-5, rtol=0)
    for h in range(H):
        k_h, v_h, lw_h = layer.head(h)
        logits = q[h * G : (h + 1) * G] @ torch.cat([k_h, nk[h]]).T * 0.5
        logits[:, :, : len(k_h)] += lw_h
        logits[:, :, len(k_h) :] += torch.full((C, C), float("-inf")).triu(1)
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(scores[h], p[:, 19:, len(k_h) - 20 : len(k_h)].amax(dim=(0, 1)), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def scored(tiny_runner):
    ids = torch.randint(3, 250, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    return tiny_runner.prefill(ids, capture=Capture(reconstruction=True))


def test_budget_is_global_and_ragged(scored):
    seg = get_policy("kvzip", kept=0.2).compress(scored.states, scored.start)
    lens = torch.stack([layer.head_lengths() for layer in seg.layers])  # [L, H]
    assert int(lens.sum()) == round(0.2 * lens.numel() * 600)
    assert seg.kept_fraction() == pytest.approx(0.2, abs=1e-3)
    assert len(set(lens.flatten().tolist())) > 1  # heads hold different numbers of rows
    for layer in seg.layers:  # sinks and the last window rows are in every head
        for h in range(layer.num_heads):
            pos = layer.positions[int(layer.head_offsets[h]) : int(layer.head_offsets[h + 1])].tolist()
            assert pos[:4] == [0, 1, 2, 3] and pos[-8:] == list(range(592, 600)) and pos == sorted(pos)


def test_top_scored_rows_are_the_ones_kept(scored):
    seg = get_policy("kvzip", kept=0.3, sinks=0, window=0).compress(scored.states, scored.start)
    all_scores = torch.stack([s.reconstruction for s in scored.states])
    threshold = all_scores.flatten().topk(seg.num_rows).values.min()
    for i, layer in enumerate(seg.layers):
        for h in range(layer.num_heads):
            pos = layer.positions[int(layer.head_offsets[h]) : int(layer.head_offsets[h + 1])]
            assert bool((all_scores[i, h, pos] >= threshold).all())


def test_needs_room_to_reconstruct(tiny_runner):
    with pytest.raises(InvalidInput, match="no room to score it by reconstruction"):
        tiny_runner.prefill([5] * 1015, capture=Capture(reconstruction=True))


def test_bad_settings():
    with pytest.raises(InvalidInput, match="window=-1"):
        get_policy("kvzip", kept=0.5, window=-1)
