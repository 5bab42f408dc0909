"""Recall during decode: a merged row is replaced by its originals from the store, once, counted."""

from __future__ import annotations

import torch

from headwise.attention import MergedShare
from headwise.cache.compact import CompactCache, LayerCache, RecallTable
from headwise.models.runner import DecodeStats
from services.decode.worker import _RecallState
from services.handoff import CacheHandle


def merged_layer(d: int = 4) -> LayerCache:
    """Two heads; head 1's row 1 stands for 3 tokens (recall id 0)."""
    k = [torch.randn(2, d), torch.randn(3, d)]
    v = [torch.randn(2, d), torch.randn(3, d)]
    pos = [torch.tensor([0, 5]), torch.tensor([0, -1, 5])]
    lw = [torch.zeros(2), torch.tensor([0.0, float(torch.log(torch.tensor(3.0))), 0.0])]
    rid = [torch.tensor([-1, -1]), torch.tensor([-1, 0, -1])]
    table = RecallTable(torch.tensor([0, 3]), torch.tensor([1, 2, 3]), torch.tensor([1]),
                        torch.zeros(0, d), torch.zeros(0, d))
    return LayerCache.from_heads(k, v, pos, lw, rid, table)


def test_with_row_replaced_keeps_tail_and_other_heads():
    layer = merged_layer()
    layer.append(torch.randn(2, 1, 4), torch.randn(2, 1, 4), torch.tensor([6]))
    ok, ov, op = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, 2, 3])
    new = layer.with_row_replaced(1, 1, ok, ov, op)
    assert new.head_lengths().tolist() == [2, 5] and new.tail_len == 1
    k0, _, _ = new.head(0)
    assert torch.equal(k0, layer.head(0)[0])
    k1, _, lw1 = new.head(1)
    assert torch.equal(k1[1:4], ok) and lw1.tolist() == [0.0] * 5
    assert (new.recall_ids >= 0).sum() == 0 and new.positions[3:6].tolist() == [1, 2, 3]


class RecallStore:
    def __init__(self):
        self.calls = []

    async def recall(self, key, layer, head, row):
        self.calls.append((key, layer, head, row))
        return torch.ones(3, 4), torch.ones(3, 4), torch.tensor([1, 2, 3])


async def test_recall_state_swaps_once_and_counts():
    cache = CompactCache([merged_layer()], seq_len=6)
    handle = CacheHandle(["ctx-key", "q-key"], [], [], torch.zeros(1), 0, 0, 0, 0, 1.0, 0, "stored", "")
    state, store, stats = _RecallState(handle, cache), RecallStore(), DecodeStats()
    stats.recalls.append((0, MergedShare(head=1, row=1, share=0.9)))
    await state.apply(stats, store, cache)
    stats.recalls.append((0, MergedShare(head=1, row=1, share=0.9)))  # the row is gone now: nothing to do
    await state.apply(stats, store, cache)
    assert store.calls == [("ctx-key", 0, 1, 1)] and state.count == 1
    assert cache.layers[0].head_lengths().tolist() == [2, 5]
