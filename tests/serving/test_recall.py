"""Recall during decode: a merged row is replaced by its originals from the store, once, counted."""

from __future__ import annotations

import torch

from headwise.attention import MergedShare
from headwise.cache.compact import CompactCache, LayerCache, RecallTable
from headwise.models.runner import DecodeStats
from services.decode.recall import Recall


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


async def test_recall_swaps_once_and_counts():
    cache = CompactCache([merged_layer()], seq_len=6)
    store, stats = RecallStore(), DecodeStats()
    state = Recall("ctx-key", cache, store)
    stats.recalls.append((0, MergedShare(head=1, row=1, share=0.9)))
    wanted = state.wanted(cache, stats)
    state.apply(cache, await state.fetch(wanted))
    stats.recalls.append((0, MergedShare(head=1, row=1, share=0.9)))  # the row is gone now: nothing to do
    assert state.wanted(cache, stats) == []
    assert store.calls == [("ctx-key", 0, 1, 1)] and state.count == 1
    assert cache.layers[0].head_lengths().tolist() == [2, 5]


class TwoRowStore:
    """Originals of two merged rows of one head: 2 tokens behind row 1, 3 behind row 2."""

    def __init__(self, d: int = 4):
        self.rows = {1: (torch.full((2, d), 1.0), torch.full((2, d), 1.0), torch.tensor([1, 2])),
                     2: (torch.full((3, d), 2.0), torch.full((3, d), 2.0), torch.tensor([4, 5, 6]))}

    async def recall(self, key, layer, head, row):
        return self.rows[row]


async def test_two_merged_rows_of_one_head_swapped_in_one_step():
    """The first swap moves the rows after it; the second still replaces its own merged row."""
    d = 4
    k, v = [torch.zeros(3, d)], [torch.zeros(3, d)]
    pos, lw = [torch.tensor([0, -1, -1])], [torch.tensor([0.0, 0.7, 1.1])]
    table = RecallTable(torch.tensor([0, 2, 5]), torch.tensor([1, 2, 4, 5, 6]), torch.tensor([0, 0]),
                        torch.zeros(0, d), torch.zeros(0, d))
    cache = CompactCache([LayerCache.from_heads(k, v, pos, lw, [torch.tensor([-1, 0, 1])], table)], seq_len=7)
    state, stats = Recall("ctx-key", cache, TwoRowStore(d)), DecodeStats()
    stats.recalls += [(0, MergedShare(head=0, row=1, share=0.5)), (0, MergedShare(head=0, row=2, share=0.3))]
    state.apply(cache, await state.fetch(state.wanted(cache, stats)))
    keys, _, _ = cache.layers[0].head(0)
    assert state.count == 2 and cache.layers[0].positions.tolist() == [0, 1, 2, 4, 5, 6]
    assert keys[:, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
