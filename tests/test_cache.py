"""CompactCache invariants and ragged attention with log-weights."""

from __future__ import annotations

import math

import torch

from headwise.attention import ragged_decode_attention, ragged_prefill_attention
from headwise.cache import CompactCache, LayerCache
from headwise.cache.keys import chain_keys, segment_key


def _layer(lens, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ks = [torch.randn(n, d, generator=g) for n in lens]
    vs = [torch.randn(n, d, generator=g) for n in lens]
    ps = [torch.arange(n) for n in lens]
    return LayerCache.from_heads(ks, vs, ps)


def test_ragged_layout_and_bytes():
    layer = _layer([5, 0, 12])
    assert layer.head_offsets.tolist() == [0, 5, 5, 17]
    assert layer.head_lengths().tolist() == [5, 0, 12]
    assert layer.nbytes == 17 * 8 * 4 * 2
    layer.append(torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.tensor([100, 101]))
    assert layer.num_rows == 17 + 6 and layer.nbytes == 23 * 8 * 4 * 2
    c = layer.compacted()
    assert c.head_lengths().tolist() == [7, 2, 14]
    assert c.positions[5:7].tolist() == [100, 101]
    k, _, _ = c.head(2)
    assert torch.equal(k[12:], layer.tail_keys[2, :2])


def test_extend_keeps_per_head_order():
    a = CompactCache([_layer([3, 4], seed=1)], seq_len=10)
    b = CompactCache([_layer([2, 1], seed=2)], seq_len=14, start=10)
    c = a.extended(b)
    assert c.seq_len == 14 and c.layers[0].head_lengths().tolist() == [5, 5]
    k0, _, _ = c.layers[0].head(0)
    assert torch.equal(k0[:3], a.layers[0].head(0)[0]) and torch.equal(k0[3:], b.layers[0].head(0)[0])


def test_weighted_row_equals_repeated_rows():
    """A row with log-weight log m attends exactly like m identical copies (RazorAttention Eq. 5)."""
    d, m = 8, 7
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(10, d, generator=g), torch.randn(10, d, generator=g)
    dup_k, dup_v = torch.randn(1, d, generator=g), torch.randn(1, d, generator=g)
    full = LayerCache.from_heads([torch.cat([k, dup_k.expand(m, d)])], [torch.cat([v, dup_v.expand(m, d)])],
                                 [torch.arange(10 + m)])
    lw = torch.zeros(11)
    lw[10] = math.log(m)
    merged = LayerCache.from_heads([torch.cat([k, dup_k])], [torch.cat([v, dup_v])],
                                   [torch.cat([torch.arange(10), torch.tensor([-1])])], log_weights=[lw])
    q = torch.randn(2, 1, d, generator=g)  # two query heads share the one KV head
    o_full, _ = ragged_decode_attention(q, full, 0.3)
    o_merged, _ = ragged_decode_attention(q, merged, 0.3)
    assert torch.allclose(o_full, o_merged, atol=1e-6)
    qs = torch.randn(2, 4, d, generator=g)
    nk, nv = torch.randn(1, 4, d, generator=g), torch.randn(1, 4, d, generator=g)
    assert torch.allclose(ragged_prefill_attention(qs, full, nk, nv, 0.3),
                          ragged_prefill_attention(qs, merged, nk, nv, 0.3), atol=1e-6)
    assert merged.nbytes < full.nbytes


def test_recall_watch_reports_merged_rows():
    from headwise.cache.compact import RecallTable

    d = 4
    k = torch.zeros(3, d)
    k[2] = 5.0  # the merged row dominates for a query along it
    rt = RecallTable(torch.tensor([0, 2]), torch.tensor([7, 8]), torch.tensor([0]), torch.zeros(2, d), torch.zeros(2, d))
    layer = LayerCache.from_heads([k], [torch.randn(3, d)], [torch.tensor([0, 1, -1])],
                                  recall_ids=[torch.tensor([-1, -1, 0])], recall=rt)
    q = torch.ones(1, 1, d)
    _, hits = ragged_decode_attention(q, layer, 1.0, recall_threshold=0.5)
    assert [(h.head, h.row) for h in hits] == [(0, 2)] and hits[0].share > 0.99
    _, none = ragged_decode_attention(q, layer, 1.0, recall_threshold=None)
    assert none == []


def test_segment_keys_are_stable_chained_and_salted():
    a = segment_key(None, [1, 2, 3], "m", {"policy": "full"}, 1, "tenant-a")
    assert a == segment_key(None, [1, 2, 3], "m", {"policy": "full"}, 1, "tenant-a")
    assert len(a) == 32
    assert a != segment_key(None, [1, 2, 3], "m", {"policy": "full"}, 1, "tenant-b")
    assert a != segment_key(None, [1, 2, 4], "m", {"policy": "full"}, 1, "tenant-a")
    assert a != segment_key(None, [1, 2, 3], "m", {"policy": "streaming", "kept": 0.5}, 1, "tenant-a")
    ks = chain_keys([[1, 2, 3], [4]], "m", [{"policy": "full"}] * 2, 1, "tenant-a")
    assert ks[0] == a and ks[1] == segment_key(a, [4], "m", {"policy": "full"}, 1, "tenant-a")
    # same tokens after a different parent: a different key
    assert chain_keys([[9], [4]], "m", [{"policy": "full"}] * 2, 1, "tenant-a")[1] != ks[1]


def _reference_decode(q, layer, scaling):
    """Plain per-head softmax over rows + tail, the definition the fast paths must match."""
    Hq, _, d = q.shape
    G = Hq // layer.num_heads
    c = layer.compacted()
    out = []
    for hq in range(Hq):
        k, v, lw = c.head(hq // G)
        p = torch.softmax(q[hq, 0] @ k.T * scaling + lw, -1)
        out.append(p @ v)
    return torch.stack(out)[:, None]


def test_uniform_and_ragged_decode_paths_match_reference():
    g = torch.Generator().manual_seed(5)
    for lens in ([6, 6, 6], [6, 2, 9]):
        layer = _layer(lens, seed=7)
        layer.log_weights = torch.rand(layer.keys.shape[0], generator=g)
        layer.append(torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g), torch.arange(4) + 50)
        q = torch.randn(6, 1, 8, generator=g)
        out, _ = ragged_decode_attention(q, layer, 0.4)
        assert torch.allclose(out, _reference_decode(q, layer, 0.4), atol=1e-6), lens
