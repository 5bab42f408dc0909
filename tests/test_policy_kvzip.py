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
