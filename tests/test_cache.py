"""CompactCache invariants and ragged attention with log-weights."""

from __future__ import annotations

import math

import pytest
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


# ---- PoD layers: values for every row, keys for the keyed rows only ---------------------
def _pod_pair(lens=(6, 5, 7), d=8, seed=11):
    """A base layer (ordinary) and a PoD layer whose heads 0 and 2 score some rows by the base."""
    g = torch.Generator().manual_seed(seed)
    base = _layer([6, 8, 7], d=d, seed=seed)
    masks = [torch.tensor([0, 1, 1, 0, 1, 0][: lens[0]], dtype=torch.bool), torch.zeros(lens[1], dtype=torch.bool),
             torch.tensor([0, 0, 1, 1, 1, 0, 0][: lens[2]], dtype=torch.bool)]
    ks = [torch.randn(int((~m).sum()), d, generator=g) for m in masks]
    vs = [torch.randn(n, d, generator=g) for n in lens]
    lws = [torch.rand(n, generator=g) for n in lens]
    pod = LayerCache.from_heads(ks, vs, [torch.arange(n) for n in lens], lws, distant=masks, distant_from=[0, -1, 0])
    return base, pod


def _reference_pod(q, qb, base, pod, scaling, new_k=None, new_v=None):
    """Per query head: own logits for keyed rows, base query . base key (same position) for distant rows."""
    Hq, S, d = q.shape
    G = Hq // pod.num_heads
    c = pod.compacted()
    out = []
    for hq in range(Hq):
        h = hq // G
        a, b = int(c.head_offsets[h]), int(c.head_offsets[h + 1])
        dist = c.distant[a:b] if c.distant is not None else torch.zeros(b - a, dtype=torch.bool)
        full_k = torch.zeros(b - a, d)
        full_k[~dist] = c.head(h)[0]
        logits = q[hq] @ full_k.T * scaling
        if dist.any():
            bk, _, _ = base.head(h)
            bpos = base.positions[int(base.head_offsets[h]) : int(base.head_offsets[h + 1])].tolist()
            rows = [bpos.index(p) for p in c.positions[a:b][dist].tolist()]
            logits[:, dist] = qb[hq] @ bk[rows].T * scaling
        logits = logits + c.log_weights[a:b]
        vs = [c.values[a:b]]
        if new_k is not None:
            causal = torch.full((S, S), float("-inf")).triu_(1)
            logits = torch.cat([logits, q[hq] @ new_k[h].T * scaling + causal], -1)
            vs.append(new_v[h])
        out.append(torch.softmax(logits, -1) @ torch.cat(vs))
    return torch.stack(out)


def test_pod_layer_attention_matches_reference():
    from headwise.attention import BaseQueries

    g = torch.Generator().manual_seed(12)
    for lens in ((6, 5, 7), (6, 6, 6)):  # ragged heads, and equal lengths (never the uniform fast path)
        base, pod = _pod_pair(lens)
        cache = CompactCache([base, pod], seq_len=10)
        assert cache.shared_bases() == {0: 1} and pod.keys.shape[0] == sum(lens) - 6
        assert pod.nbytes == (pod.keys.shape[0] + sum(lens)) * 8 * 4 and pod.nbytes < 2 * sum(lens) * 8 * 4
        q, qb = torch.randn(6, 3, 8, generator=g), torch.randn(6, 3, 8, generator=g)
        nk, nv = torch.randn(3, 3, 8, generator=g), torch.randn(3, 3, 8, generator=g)
        shared = BaseQueries(cache.layers, {0: qb}, {0: 1})
        out = ragged_prefill_attention(q, pod, nk, nv, 0.4, shared)
        assert torch.allclose(out, _reference_pod(q, qb, base, pod, 0.4, nk, nv), atol=1e-6), lens
        # decode: the new token is appended to every head (keyed) before attention
        pod.append(nk[:, :1], nv[:, :1], torch.tensor([10]))
        dq, dqb = q[:, :1], qb[:, :1]
        o, _ = ragged_decode_attention(dq, pod, 0.4, base=BaseQueries(cache.layers, {0: dqb}, {0: 1}))
        assert torch.allclose(o, _reference_pod(dq, dqb, base, pod, 0.4), atol=1e-6), lens
        with pytest.raises(ValueError, match="layer 0"):
            ragged_decode_attention(dq, pod, 0.4)


def test_pod_layer_operations_carry_key_only_rows():
    base, pod = _pod_pair()
    other = _layer([2, 3, 1], seed=4)
    ext = pod.extended(other)  # a later plain segment: keyed rows after the PoD ones
    assert ext.head_lengths().tolist() == [8, 8, 8] and ext.key_lengths().tolist() == [5, 8, 5]
    assert ext.distant_from == (0, -1, 0)
    k0, v0, _ = ext.head(0)
    assert torch.equal(k0, torch.cat([pod.head(0)[0], other.head(0)[0]])) and torch.equal(v0[:6], pod.head(0)[1])
    assert ext.head_distant(0).tolist() == [False, True, True, False, True, False, False, False]
    with pytest.raises(ValueError, match="head 0"):
        pod.extended(LayerCache.from_heads(*_pod_parts(distant_from=[1, 0, 0])))
    # compacted folds the tail in as keyed rows; to/clone keep the layout
    pod.append(torch.ones(3, 2, 8), torch.ones(3, 2, 8), torch.tensor([20, 21]))
    c = pod.compacted()
    assert c.key_lengths().tolist() == [5, 7, 6] and c.head_distant(0)[-2:].tolist() == [False, False]
    for copy in (pod.clone(), pod.to("cpu")):
        assert torch.equal(copy.keys, c.keys) and torch.equal(copy.distant, c.distant) and copy.distant_from == c.distant_from
    # replacing a keyed row after distant rows puts its keys at the right key index
    rep = c.with_row_replaced(0, 3, torch.full((2, 8), 7.0), torch.zeros(2, 8), torch.tensor([3, 3]))
    assert rep.key_lengths().tolist() == [6, 7, 6] and torch.equal(rep.head(0)[0][1:3], torch.full((2, 8), 7.0))
    with pytest.raises(ValueError, match="distant"):
        c.with_row_replaced(0, 1, torch.zeros(1, 8), torch.zeros(1, 8), torch.tensor([1]))
    # a layer without a distant row is an ordinary one
    plain = LayerCache.from_heads([torch.ones(2, 8)], [torch.ones(2, 8)], [torch.arange(2)],
                                  distant=[torch.zeros(2, dtype=torch.bool)], distant_from=[0])
    assert plain.distant is None and plain.distant_from is None


def _pod_parts(distant_from):
    m = torch.tensor([0, 1], dtype=torch.bool)
    return [[torch.ones(1, 8)] * 3, [torch.ones(2, 8)] * 3, [torch.arange(2)] * 3, None, None, None, [m] * 3, distant_from]


@pytest.mark.parametrize("name", ["ems", "pod", "kvzip"])
def test_concat_joins_each_layer_once(name, monkeypatch):
    """A chain of n segments (merged rows with recall tables, PoD rows, ragged heads) joined by
    `concat` equals folding `extended` pairwise, and joins each layer in one pass, not n - 1."""
    from headwise.policies import get_policy
    from tests.fixtures.models import random_ids, tiny_gqa_context, tiny_gqa_runner

    runner = tiny_gqa_runner()
    ctx = tiny_gqa_context(runner)
    policy = get_policy(name, kept=0.3)
    cache, segs = None, []
    for j, n in enumerate([240, 200, 220, 210]):
        res = runner.prefill_segment(random_ids(n, seed=40 + j), cache=cache, policy=policy, ctx=ctx)
        segs.append(res.segment)
        cache = res.cache
    folded = segs[0]
    for s in segs[1:]:
        folded = folded.extended(s)
    calls = []
    joined = LayerCache.joined
    monkeypatch.setattr(LayerCache, "joined", staticmethod(lambda parts: calls.append(len(parts)) or joined(parts)))
    got = CompactCache.concat(segs)
    assert calls == [len(segs)] * runner.num_layers
    assert (got.seq_len, got.start) == (folded.seq_len, folded.start) == (cache.seq_len, 0)
    for a, b, c in zip(got.layers, folded.layers, cache.compacted().layers, strict=True):
        for f in ("keys", "values", "head_offsets", "positions", "log_weights", "recall_ids"):
            assert torch.equal(getattr(a, f), getattr(b, f)) and torch.equal(getattr(a, f), getattr(c, f)), f
        assert (a.distant is None) == (b.distant is None) and (a.distant is None or torch.equal(a.distant, b.distant))
        assert a.distant_from == b.distant_from
        if b.recall is not None:
            for f in ("offsets", "positions", "heads", "keys", "values"):
                assert torch.equal(getattr(a.recall, f), getattr(b.recall, f)), f
    if name == "ems":
        assert any(lc.recall is not None and lc.recall.num_groups for lc in got.layers), "recall tables were joined"
    if name == "pod":
        assert any(lc.distant is not None for lc in got.layers), "PoD rows were joined"
