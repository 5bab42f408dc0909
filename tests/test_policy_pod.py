"""PoD: the decode attention that runs equals the paper's gate form; the `pod` policy against a dense reference.

The reference below computes PoD attention densely (every segment key present, evicted
tokens masked, distant logits taken from the base layer with torch.where): the truly
smaller cache must give the same logits through prefill-on-cache and decode, with PoD alone
and with the eviction stage.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from headwise.errors import InvalidInput
from headwise.policies import get_policy
from headwise.policies.base import Capture, CompressContext
from headwise.policies.pod import PoDPolicy, block_members, proximal, similarity, spread
from headwise.policies.snapkv import SnapKVPolicy
from headwise.profiles import HeadProfile

S = 600  # >= 512: the realised fraction must be within 1% of the request
# 4 layers x 3 KV heads: 6 of 12 (layer, head) pairs are non-base -> PoD alone reaches kept in
# [~0.757, 1] (recent window 0) or [0.770, 1] (recent window >= 32, with eviction on); below, tokens go
BASE_OF = [[0, 0, 0], [0, 1, 0], [0, 1, 2], [3, 1, 2]]
FLAT = [[li] * 3 for li in range(4)]  # no multi-layer block: eviction alone (SnapKV heads)
ONE_BLOCK = [[0, 0, 0]] * 4  # one 4-layer block per head
EVICT_KEPT = [0.9, 0.5, 0.25, 0.1]


def gate_form(a_prox: Tensor, a_dist: Tensor, v_prox: Tensor, v_dist: Tensor) -> Tensor:
    """The paper's Fig. 2: g o^P + (1 - g) o^D, g = sum exp a^P / (sum exp a^P + sum exp a^D).

    a_prox: [G, nP] own-layer logits of proximal tokens; a_dist: [G, nD] base-layer logits of
    distant tokens; v_prox [nP, d], v_dist [nD, d] this layer's values. Returns [G, d].
    """
    o_p = torch.softmax(a_prox, -1) @ v_prox
    o_d = torch.softmax(a_dist, -1) @ v_dist
    g = torch.sigmoid(torch.logsumexp(a_prox, -1) - torch.logsumexp(a_dist, -1))[:, None]
    return g * o_p + (1 - g) * o_d


@settings(max_examples=30, deadline=None)
@given(g=st.integers(1, 3), n=st.integers(2, 40), sinks=st.integers(1, 4), recent=st.integers(0, 8),
       scale=st.floats(0.1, 4.0), seed=st.integers(0, 999))
def test_decode_attention_of_a_pod_layer_is_the_gate_form(g, n, sinks, recent, scale, seed):
    """One decode step through `ragged_decode_attention` (the view and kernel decode runs) over a
    PoD layer whose distant rows keep no key: equal to the gate form over proximal logits (own
    query and keys) and distant logits (the base layer's query and keys), with this layer's values."""
    from headwise.attention import ragged_decode_attention
    from headwise.attention_common import BaseQueries
    from headwise.cache.compact import LayerCache

    gen = torch.Generator().manual_seed(seed)
    H, d, sc = 2, 8, 0.35

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    pos = torch.arange(n)
    prox = proximal(n, min(sinks, n - 1), recent)  # at least one distant row
    base = LayerCache.from_heads([rnd(n, d) for _ in range(H)], [rnd(n, d) for _ in range(H)], [pos] * H)
    keys, values = [rnd(n, d) for _ in range(H)], [rnd(n, d) for _ in range(H)]
    layer = LayerCache.from_heads([k[prox] for k in keys], values, [pos] * H, distant=[~prox] * H, distant_from=[0] * H)
    q, qb = rnd(H * g, 1, d), rnd(H * g, 1, d)  # this layer's query, the base layer's
    out, _ = ragged_decode_attention(q, layer, sc, base=BaseQueries([base, layer], {0: qb}))
    for h in range(H):
        qs, qbs = q[h * g:(h + 1) * g, 0], qb[h * g:(h + 1) * g, 0]  # [g, d]
        kb = base.keys[int(base.head_offsets[h]):int(base.head_offsets[h + 1])]
        want = gate_form(qs @ keys[h][prox].T * sc, qbs @ kb[~prox].T * sc, values[h][prox], values[h][~prox])
        torch.testing.assert_close(out[h * g:(h + 1) * g, 0], want)


def test_the_gate_is_not_a_plain_average():
    """The check above would pass a kernel that averaged the two parts if the gate form were one."""
    a_p, a_d = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0]])
    v_p, v_d = torch.eye(2, 4), torch.ones(3, 4)
    avg = 0.5 * (torch.softmax(a_p, -1) @ v_p + torch.softmax(a_d, -1) @ v_d)
    assert not torch.allclose(gate_form(a_p, a_d, v_p, v_d), avg)


def test_recent_window_hits_the_kept_fraction():
    base_of = [[0, 0], [0, 1], [0, 1], [3, 3]]  # 3 non-base (layer, head) pairs of 8
    plan = PoDPolicy(kept=0.85, sinks=16)
    r = plan.recent_for(1000, base_of)
    k_rows = 5 * 1000 + 3 * proximal(1000, 16, r).sum().item()
    assert abs((k_rows + 8 * 1000) / (2 * 8 * 1000) - 0.85) < 0.01


# ---- the policy on a tiny GQA model with a synthetic profile ------------------------------
def _profile(base_of) -> HeadProfile:
    L, H = len(base_of), len(base_of[0])
    return HeadProfile("tiny-pod", L, H, [[0.0] * H] * L, [[0.0] * H] * L, base_of)


@pytest.fixture(scope="module")
def runner():
    from headwise.models import ModelRunner
    from tests.fixtures.models import tiny_llama

    return ModelRunner(tiny_llama(layers=4, heads=6, kv_heads=3, hidden=96, seed=1), None, name="tiny-pod")


@pytest.fixture(scope="module")
def ctx():
    return CompressContext(num_layers=4, model_id="tiny-pod", profile=_profile(BASE_OF))


@pytest.fixture(scope="module")
def seg_ids():
    return torch.randint(3, 250, (S,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def prefilled(runner, seg_ids):
    return runner.prefill(seg_ids, capture=Capture(window=32))


def _same(a, b) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f)) and x.distant_from == y.distant_from
        and (x.distant is None) == (y.distant is None) and (x.distant is None or torch.equal(x.distant, y.distant))
        for x, y in zip(a.layers, b.layers, strict=True)
        for f in ("keys", "values", "head_offsets", "positions", "log_weights", "recall_ids")
    )


def dense_pod_logits(runner, states, base_of, prox, new_ids, kept=None):
    """Reference: logits [T, V] of new tokens after a PoD-compressed segment, computed densely.

    states: the segment's full prefill (K, V of every token in every layer); prox: [S] bool;
    kept: kept[l][g] [S] bool tokens (layer l, KV head g) holds, None for every token.
    Query head hq of layer l over segment token j: -inf if (l, hq // G) does not hold j, else
    q_l . K_l[j] if j is proximal or l is the base of (l, hq // G), else q_b . K_b[j] with b
    the base and q_b the base layer's query of the same new token; new tokens are causal and
    use own keys; values are always layer l's.
    """
    inner = runner.model.model
    S = states[0].num_tokens
    T = len(new_ids)
    pos = torch.arange(S, S + T)
    h = inner.embed_tokens(torch.tensor(new_ids))[None]
    cos, sin = inner.rotary_emb(h, pos[None])
    causal = torch.full((T, T), float("-inf")).triu_(1)
    queries = []
    with torch.inference_mode():
        for li, layer in enumerate(inner.layers):
            q, k, v = runner._qkv(layer, layer.input_layernorm(h), cos, sin)  # [Hq, T, d], [Hkv, T, d]
            queries.append(q)
            G, sc = q.shape[0] // k.shape[0], layer.self_attn.scaling
            K, V = states[li].keys, states[li].values  # [Hkv, S, d]
            out = []
            for hq in range(q.shape[0]):
                g = hq // G
                b = base_of[li][g]
                a_seg = q[hq] @ K[g].T * sc  # [T, S]
                if b != li:
                    a_seg = torch.where(prox[None, :], a_seg, queries[b][hq] @ states[b].keys[g].T * sc)
                if kept is not None:
                    a_seg = a_seg.masked_fill(~kept[li][g][None, :], float("-inf"))
                p = torch.softmax(torch.cat([a_seg, q[hq] @ k[g].T * sc + causal], -1), -1)
                out.append(p @ torch.cat([V[g], v[g]]))
            h = runner._finish_layer(layer, h, torch.stack(out))
        return runner.model.lm_head(inner.norm(h))[0].float()


def _generate(runner, cache, q_ids, steps=4):
    """Question prefill on the cache, then greedy decode steps: (tokens, logits per step)."""
    res = runner.prefill_segment(q_ids, cache)
    logits, toks = [res.logits], []
    for _ in range(steps):
        toks.append(int(logits[-1].argmax()))
        logits.append(runner.decode_step(toks[-1], res.cache))
    return toks, logits, res.cache

def _held(cache):
    """kept[l][g]: [S] bool tokens of the segment that (layer l, KV head g) holds (first segment at 0)."""
    out = []
    for layer in cache.layers:
        row = []
        for g in range(layer.num_heads):
            a, b = int(layer.head_offsets[g]), int(layer.head_offsets[g + 1])
            m = torch.zeros(S, dtype=torch.bool)
            m[layer.positions[a:b]] = True
            row.append(m)
        out.append(row)
    return out


def expected_keep(states, base_of, pol, counts):
    """Independent selection: per (block, head), the block's mean of the per-layer SnapKV scores,
    sinks + window forced, the top counts[(b, h)] tokens."""
    scorer = SnapKVPolicy(kept=pol.kept, window=pol.window, sinks=pol.sinks, kernel=pol.kernel)
    scores = [scorer.score(st, CompressContext(len(states))) for st in states]
    keep = {}
    for (b, h), layers in block_members(base_of).items():
        s = torch.stack([scores[li][h] for li in layers]).mean(0)
        s[: pol.sinks] = float("inf")
        s[S - pol.window :] = float("inf")
        m = torch.zeros(S, dtype=torch.bool)
        m[s.topk(counts[(b, h)]).indices] = True
        keep[(b, h)] = m
    return keep


@pytest.mark.parametrize("kept", [0.9, 0.8, 0.5, 0.25])
def test_prefill_and_decode_match_dense_reference(runner, ctx, seg_ids, prefilled, kept):
    pol = get_policy("pod", kept=kept)
    seg = runner.prefill_segment(seg_ids, policy=pol, ctx=ctx)
    assert any(layer.distant is not None for layer in seg.cache.layers)
    evicts = pol.evicts(S, BASE_OF)
    assert evicts == (kept < 0.77)
    q_ids = [5, 6, 7, 8, 9]
    toks, logits, _ = _generate(runner, seg.cache, q_ids)
    if evicts:
        prox = proximal(S, pol.sinks, pol.window)
        keep = expected_keep(prefilled.states, BASE_OF, pol, pol.token_counts(S, BASE_OF))
        kept_masks = [[keep[(BASE_OF[li][g], g)] for g in range(3)] for li in range(4)]
        held = _held(seg.segment)  # the selection, computed independently
        assert all(torch.equal(held[li][g], kept_masks[li][g]) for li in range(4) for g in range(3))
    else:
        prox, kept_masks = proximal(S, pol.sinks, pol.recent_for(S, BASE_OF)), None
    ref = dense_pod_logits(runner, prefilled.states, BASE_OF, prox, q_ids + toks, kept_masks)
    for i, lg in enumerate(logits):
        torch.testing.assert_close(lg, ref[len(q_ids) - 1 + i], atol=1e-5, rtol=0)
    # and PoD is not secretly the full cache, nor plain eviction without score sharing
    flat = dense_pod_logits(runner, prefilled.states, FLAT, prox, q_ids, kept_masks)
    assert not torch.allclose(flat[-1], ref[len(q_ids) - 1], atol=1e-3)


def test_full_budget_equals_full(runner, ctx, seg_ids):
    full = runner.prefill_segment(seg_ids)
    for evict in ("snapkv", "none"):
        pod = runner.prefill_segment(seg_ids, policy=get_policy("pod", kept=1.0, evict=evict), ctx=ctx)
        assert _same(pod.segment, full.segment) and all(layer.distant is None for layer in pod.segment.layers)
    q_ids = [5, 6, 7]
    for a, b in zip(_generate(runner, full.cache, q_ids)[1], _generate(runner, pod.cache, q_ids)[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_no_multi_layer_blocks(runner, prefilled):
    """kept 1 is `full`; PoD alone cannot go lower; with eviction every head is a plain SnapKV head."""
    flat = CompressContext(4, "tiny-pod", _profile(FLAT))
    full = get_policy("full").compress(prefilled.states, 0)
    assert _same(get_policy("pod", kept=1.0).compress(prefilled.states, 0, flat), full)
    with pytest.raises(InvalidInput, match=r"\[1.000, 1\]"):
        get_policy("pod", kept=0.9, evict="none").compress(prefilled.states, 0, flat)
    for kept in (0.5, 0.25):  # kept x S whole: SnapKV's per-head budget, the same rows
        snap = get_policy("snapkv", kept=kept, sinks=16, window=32).compress(prefilled.states, 0)
        assert _same(get_policy("pod", kept=kept).compress(prefilled.states, 0, flat), snap)


@pytest.mark.parametrize("kept", [0.95, 0.9, 0.8])
def test_realised_fraction_and_rows_really_gone(prefilled, ctx, kept):
    pol = get_policy("pod", kept=kept)
    assert not pol.evicts(S, BASE_OF)
    out = pol.compress(prefilled.states, 0, ctx)
    assert abs(out.kept_fraction() - kept) <= 0.01
    assert out.kept_fraction() == pytest.approx(out.nbytes / out.full_nbytes())
    n_prox = int(proximal(S, pol.sinks, pol.recent_for(S, BASE_OF)).sum())
    for li, layer in enumerate(out.layers):
        lens, klens = layer.head_lengths().tolist(), layer.key_lengths().tolist()
        assert lens == [S] * 3  # values of every token
        assert klens == [S if BASE_OF[li][h] == li else n_prox for h in range(3)]
        assert layer.keys.shape[0] == sum(klens) < layer.values.shape[0] or li == 0  # key rows absent, not masked
    assert out.nbytes < out.full_nbytes()


def _check_blocks(out, base_of, pol):
    """Every layer of a block holds the same tokens; distant rows are exactly the kept tokens that
    are not proximal, in non-base layers, and each one's token is in its base head (without
    distant rows of its own); base heads hold a key for every row."""
    prox = proximal(S, pol.sinks, pol.window)
    for li, layer in enumerate(out.layers):
        for h in range(layer.num_heads):
            b = base_of[li][h]
            a, e = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
            pos = layer.positions[a:e]
            base = out.layers[b]
            ba, be = int(base.head_offsets[h]), int(base.head_offsets[h + 1])
            assert torch.equal(pos, base.positions[ba:be])
            assert bool(prox[pos].sum() == prox.sum())  # sinks and window always kept
            dist = layer.head_distant(h)
            if b == li:
                assert dist is None or not bool(dist.any())
                assert int(layer.key_lengths()[h]) == e - a
            else:
                assert dist is not None and torch.equal(dist, ~prox[pos]) and layer.distant_from[h] == b
                assert bool(torch.isin(pos[dist], base.positions[ba:be]).all())
                assert base.head_distant(h) is None or not bool(base.head_distant(h).any())
                assert int(layer.key_lengths()[h]) == int(prox.sum())  # keys of proximal rows only


@pytest.mark.parametrize("profile", ["pod", "one_block", "flat"])
@pytest.mark.parametrize("kept", EVICT_KEPT)
def test_eviction_hits_the_kept_fraction_and_keeps_blocks_consistent(prefilled, kept, profile):
    base_of = {"pod": BASE_OF, "one_block": ONE_BLOCK, "flat": FLAT}[profile]
    c = CompressContext(4, "tiny-pod", _profile(base_of))
    pol = get_policy("pod", kept=kept)
    out = pol.compress(prefilled.states, 0, c)
    assert abs(out.kept_fraction() - kept) <= 0.01
    assert out.kept_fraction() == pytest.approx(out.nbytes / out.full_nbytes())
    if pol.evicts(S, base_of):
        _check_blocks(out, base_of, pol)
        counts = pol.token_counts(S, base_of)
        assert max(counts.values()) - min(counts.values()) <= 1  # uniform, one more for some blocks
        for li, layer in enumerate(out.layers):
            assert layer.head_lengths().tolist() == [counts[(base_of[li][h], h)] for h in range(3)]
    # the K rows PoD saves buy more kept tokens than plain eviction at the same bytes
    if profile != "flat" and kept <= 0.5:
        snap = get_policy("snapkv", kept=kept, sinks=16, window=32).compress(prefilled.states, 0)
        assert out.num_rows > snap.num_rows and out.nbytes <= snap.nbytes + 4 * 3 * 2 * 64 * 4


def test_spread_is_exact_enough():
    assert spread(100, [2, 3, 5], 1, 100) == [10, 10, 10]
    assert spread(107, [2, 3, 5], 1, 100) == [11, 10, 11]  # 5 + 2 of the 7 left
    assert spread(10, [2, 3, 5], 4, 100) == [4, 4, 4]  # never below `low`
    assert spread(10**6, [2, 3], 1, 50) == [50, 50]  # nor above `high`


@pytest.mark.parametrize("kept", [0.85, 0.25])
def test_deterministic(prefilled, ctx, kept):
    p = get_policy("pod", kept=kept)
    assert _same(p.compress(prefilled.states, 0, ctx), p.compress(prefilled.states, 0, ctx))


@pytest.mark.parametrize("kept", [0.8, 0.3])
def test_codec_round_trip_is_exact(runner, ctx, seg_ids, kept):
    from headwise.cache.codec import FRAME_OVERHEAD, CodecError, decode, encode

    seg = runner.prefill_segment(seg_ids, policy=get_policy("pod", kept=kept), ctx=ctx)
    _, _, cache = _generate(runner, seg.cache, [5, 6], steps=2)  # with a decode tail
    enc = encode(cache, chunk_size=64 << 10)
    back = decode(enc.header, enc.chunks)
    assert _same(back, cache.compacted()) and (back.seq_len, back.start) == (cache.seq_len, cache.start)
    payload = lambda e: [c[FRAME_OVERHEAD:] for c in e.chunks]  # noqa: E731  (frames carry a random segment id)
    assert payload(encode(back, chunk_size=64 << 10)) == payload(enc)  # byte-exact
    # a PoD segment is smaller on the wire than the full one
    assert encode(seg.segment).nbytes < encode(runner.prefill_segment(seg_ids).segment).nbytes
    bad = bytearray(enc.chunks[1]); bad[-1] ^= 1
    with pytest.raises(CodecError, match="checksum"):
        decode(enc.header, [enc.chunks[0], bytes(bad), *enc.chunks[2:]])
    with pytest.raises(CodecError, match="truncated"):
        decode(enc.header, enc.chunks[:-1])


@pytest.mark.parametrize("kept", [0.85, 0.3])
def test_chained_segments_and_questions_decode(runner, ctx, seg_ids, kept):
    """Two PoD segments in a chain, then a question: the second segment's distant rows find
    their base rows by position; the result survives the codec and gives the same logits."""
    from headwise.cache.codec import decode, encode

    pol = get_policy("pod", kept=kept)
    a = runner.prefill_segment(seg_ids, policy=pol, ctx=ctx)
    b = runner.prefill_segment(seg_ids[:400], a.cache, policy=pol, ctx=ctx)
    assert b.cache.kept_fraction() == pytest.approx(kept, abs=0.01)
    enc = encode(b.cache)
    again = decode(enc.header, enc.chunks)
    for x, y in zip(_generate(runner, b.cache, [5, 6])[1], _generate(runner, again, [5, 6])[1], strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_kvzip_scored_eviction(runner, ctx, seg_ids):
    """evict='kvzip': the reconstruction score chooses the block's tokens; same layout rules."""
    pol = get_policy("pod", kept=0.3, evict="kvzip")
    assert pol.capture.reconstruction and not pol.capture.window
    seg = runner.prefill_segment(seg_ids, policy=pol, ctx=ctx)
    assert abs(seg.segment.kept_fraction() - 0.3) <= 0.01
    _check_blocks(seg.segment, BASE_OF, pol)
    snap = runner.prefill_segment(seg_ids, policy=get_policy("pod", kept=0.3), ctx=ctx)
    assert not _same(seg.segment, snap.segment)
    _generate(runner, seg.cache, [5, 6], steps=1)  # decodes


def test_bad_parameters_raise_clear_errors(prefilled, ctx):
    with pytest.raises(InvalidInput, match=r"\[0.5, 1\]"):
        get_policy("pod", kept=0.4, evict="none")
    assert get_policy("pod", kept=0.4).evict == "snapkv"  # eviction on by default
    for bad in ({"sinks": -1}, {"window": -1}, {"kernel": 1.5}):
        with pytest.raises(InvalidInput, match=next(iter(bad))):
            get_policy("pod", kept=0.9, **bad)
    with pytest.raises(InvalidInput, match="evict='h2o'; allowed: snapkv, kvzip, none"):
        get_policy("pod", kept=0.9, evict="h2o")
    with pytest.raises(InvalidInput, match="block_score='sum'; allowed: mean, max"):
        get_policy("pod", kept=0.9, block_score="sum")
    with pytest.raises(InvalidInput, match=r"out of reach.*\[0.75\d, 1\]"):
        get_policy("pod", kept=0.6, evict="none").compress(prefilled.states, 0, ctx)
    # below sinks + window: 0.05 x 600 = 30 tokens per head < 16 + 32
    with pytest.raises(InvalidInput, match=r"fewer than sinks \+ window = 48.*>= 0.080"):
        get_policy("pod", kept=0.05).compress(prefilled.states, 0, ctx)
    assert get_policy("pod", kept=0.08).compress(prefilled.states, 0, ctx).kept_fraction() == pytest.approx(0.08, abs=0.01)
    with pytest.raises(InvalidInput, match="window queries"):
        get_policy("pod", kept=0.5).compress([dataclasses.replace(s, window_queries=None) for s in prefilled.states], 0, ctx)
    with pytest.raises(InvalidInput, match="reconstruction"):
        get_policy("pod", kept=0.5, evict="kvzip").compress(prefilled.states, 0, ctx)
    with pytest.raises(InvalidInput, match="head profile"):
        get_policy("pod", kept=0.9).compress(prefilled.states, 0, CompressContext(4))
    with pytest.raises(InvalidInput, match="not an earlier layer"):
        get_policy("pod", kept=0.9).compress(prefilled.states, 0, CompressContext(4, "x", _profile([[1, 0, 0]] * 4)))
    with pytest.raises(InvalidInput, match="itself in another block"):
        get_policy("pod", kept=0.9).compress(prefilled.states, 0, CompressContext(4, "x", _profile([[0] * 3, [0] * 3, [1] * 3, [3] * 3])))


def test_reconstruction_over_a_pod_cache_is_the_same_in_query_blocks(runner, ctx, seg_ids, monkeypatch):
    """kvzip's scored pass over a PoD context (distant rows logit'd through the base layer's queries
    of the same rows): query blocks of 16 rows give what one block gives."""
    import headwise.attention as attention

    cache = runner.prefill_segment(seg_ids, policy=get_policy("pod", kept=0.5), ctx=ctx).cache
    assert any(layer.distant is not None for layer in cache.layers)
    ids = seg_ids[:100]
    whole = runner.prefill(ids, cache, Capture(reconstruction=True))
    monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", 1)  # 16 query rows a block
    blocks = runner.prefill(ids, cache, Capture(reconstruction=True))
    torch.testing.assert_close(blocks.logits, whole.logits, atol=1e-5, rtol=0)
    for a, b in zip(blocks.states, whole.states, strict=True):
        torch.testing.assert_close(a.reconstruction, b.reconstruction, atol=1e-6, rtol=0)
        assert bool((b.reconstruction > 0).all())


@pytest.mark.parametrize("kept", [0.25, 0.1])
def test_protected_retrieval_heads_keep_their_keys(prefilled, kept):
    """protect="retrieval": the profile's retrieval heads leave their blocks and keep a key for every
    row (their old blocks keep their base); the budget and the block invariants still hold."""
    ind = [[0.0] * 3 for _ in range(4)]
    ind[2][0], ind[3][1] = 0.9, 0.8  # round(0.14 * 12) = 2 retrieval heads, both non-base in BASE_OF
    c = CompressContext(4, "tiny-pod", HeadProfile("tiny-pod", 4, 3, [[0.0] * 3] * 4, ind, BASE_OF))
    protected = [list(row) for row in BASE_OF]
    protected[2][0], protected[3][1] = 2, 3
    pol = get_policy("pod", kept=kept, protect="retrieval")
    assert pol.blocks(c, 3) == protected and get_policy("pod", kept=kept).blocks(c, 3) == BASE_OF
    out = pol.compress(prefilled.states, 0, c)
    assert abs(out.kept_fraction() - kept) <= 0.01
    _check_blocks(out, protected, pol)
    plain = get_policy("pod", kept=kept).compress(prefilled.states, 0, c)
    for li, h in ((2, 0), (3, 1)):
        assert bool(plain.layers[li].head_distant(h).any())
        d = out.layers[li].head_distant(h)
        assert d is None or not bool(d.any())
    assert "protect" not in get_policy("pod", kept=kept).params()  # the default keeps stored caches' keys
    assert "protect" not in get_policy("pod", kept=kept, protect="none").params()
    assert get_policy("pod", kept=kept).query_aware_form().protect == "none"  # the share gate decides there
    assert get_policy("pod", kept=kept, protect="head").query_aware_form().protect == "head"
    assert get_policy("pod", kept=kept, protect="none").query_aware_form().protect == "none"
    with pytest.raises(InvalidInput, match="protect"):
        get_policy("pod", kept=kept, protect="some")
    # the ablations: one KV head's blocks dissolved, or every block (no score sharing)
    one = [[li if h == 1 else b for h, b in enumerate(row)] for li, row in enumerate(BASE_OF)]
    assert get_policy("pod", kept=kept, protect="kv1").blocks(c, 3) == one
    assert get_policy("pod", kept=kept, protect="all").blocks(c, 3) == [[li] * 3 for li in range(4)]
    for ablation, blocks in (("kv1", one), ("all", [[li] * 3 for li in range(4)])):
        pol = get_policy("pod", kept=kept, protect=ablation)
        out = pol.compress(prefilled.states, 0, c)
        assert abs(out.kept_fraction() - kept) <= 0.01
        _check_blocks(out, blocks, pol)
    # "layer": where every head of a layer borrows (layers 1-3 of ONE_BLOCK), head (layer mod 3) keeps its keys
    one_block = CompressContext(4, "tiny-pod", HeadProfile("tiny-pod", 4, 3, [[0.0] * 3] * 4, ind, ONE_BLOCK))
    layer = [[0, 0, 0], [0, 1, 0], [0, 0, 2], [3, 0, 0]]
    pol = get_policy("pod", kept=kept, protect="layer")
    assert pol.blocks(one_block, 3) == layer and pol.blocks(c, 3) == BASE_OF  # BASE_OF: a base head in every layer
    out = pol.compress(prefilled.states, 0, one_block)
    assert abs(out.kept_fraction() - kept) <= 0.01
    _check_blocks(out, layer, pol)
    # "head": the KV head borrowing in the most layers keeps its keys (head 2 here: 3 layers, the others none)
    lean = [[0, 0, 0], [1, 1, 0], [2, 2, 0], [3, 3, 0]]
    c2 = CompressContext(4, "tiny-pod", HeadProfile("tiny-pod", 4, 3, [[0.0] * 3] * 4, ind, lean))
    assert get_policy("pod", kept=kept, protect="head").blocks(c2, 3) == [[li] * 3 for li in range(4)]
    assert get_policy("pod", kept=kept, protect="head").blocks(one_block, 3) == \
        get_policy("pod", kept=kept, protect="kv0").blocks(one_block, 3)  # a tie (3 layers each): the lowest index
    with pytest.raises(InvalidInput, match="KV head 3"):
        get_policy("pod", kept=kept, protect="kv3").blocks(c, 3)
    with pytest.raises(InvalidInput, match="evict='snapkv'"):
        get_policy("pod", kept=kept, evict="kvzip", signal="window+kvzip")


def test_similarity_is_one_for_the_same_layer_and_lower_for_another(prefilled):
    st = prefilled.states
    assert similarity(st[2], st[2], 0, 16) == pytest.approx(1.0, abs=1e-5)
    other = similarity(st[2], st[1], 0, 16)
    assert 0.0 <= other < 1.0 - 1e-4


@pytest.mark.parametrize("kept", [0.25, 0.1])
def test_share_gate_dissolves_exactly_the_dissimilar_pairs(prefilled, ctx, kept):
    """share: a non-base pair keeps borrowing only where its measured similarity to its base is >= share;
    share 0 is the profile's blocks, share above every similarity is no sharing; budget and block
    invariants hold for each, and the result is deterministic."""
    st = prefilled.states
    sims = {(li, h): similarity(st[li], st[b], h, 16) for li, row in enumerate(BASE_OF)
            for h, b in enumerate(row) if b != li}
    cut = sorted(sims.values())[len(sims) // 2]
    expect = [[li if (li, h) in sims and sims[li, h] < cut else b for h, b in enumerate(row)]
              for li, row in enumerate(BASE_OF)]
    pol = get_policy("pod", kept=kept, share=cut)
    assert pol.gate(st, BASE_OF) == expect and expect != BASE_OF and any(
        expect[li][h] != li for li, h in sims)  # some pairs left, some kept
    out = pol.compress(st, 0, ctx)
    assert abs(out.kept_fraction() - kept) <= 0.01
    _check_blocks(out, expect, pol)
    assert _same(out, pol.compress(st, 0, ctx))
    assert _same(get_policy("pod", kept=kept, share=0.0).compress(st, 0, ctx), get_policy("pod", kept=kept).compress(st, 0, ctx))
    assert _same(get_policy("pod", kept=kept, share=1.0).compress(st, 0, ctx),
                 get_policy("pod", kept=kept, protect="all").compress(st, 0, ctx))
    assert "share" not in get_policy("pod", kept=kept).params()
    assert get_policy("pod", kept=kept, share=cut).params()["share"] == cut
    for bad in (-0.1, 1.5, True, "x"):
        with pytest.raises(InvalidInput, match="share"):
            get_policy("pod", kept=kept, share=bad)


def test_share_gate_at_full_budget_equals_full(runner, ctx, seg_ids):
    full = runner.prefill_segment(seg_ids)
    got = runner.prefill_segment(seg_ids, policy=get_policy("pod", kept=1.0, share=0.7), ctx=ctx)
    assert _same(got.segment, full.segment) and all(layer.distant is None for layer in got.segment.layers)
