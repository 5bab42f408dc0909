"""The vectorised attention (one call per layer) equals the per-head reference, for every policy.

The oracle is `headwise.attention_reference` (one Python iteration per KV head, the code the
engine ran before the views). Compared in fp32 within 1e-5: a segment prefilled on a cache
(with and without a decode tail), KVzip's scoring pass, one decode step per layer with the
recall watch, and whole-model decode of B = 1 and B = 5 ragged sequences of different lengths
and policies (merged rows, PoD rows), across the views' capacity growth and a recall swap.
"""

from __future__ import annotations

import pytest
import torch

from headwise import attention
from headwise import attention_reference as ref
from headwise.attention import BaseQueries
from headwise.cache.compact import CompactCache, LayerCache
from headwise.models.runner import DecodeStats
from headwise.policies import get_policy

POLICIES = ["full", "streaming", "snapkv", "adakv", "razor", "taskkv", "ems", "ahakv", "kvzip", "pod"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def runner():
    from tests.fixtures.models import tiny_gqa_runner

    return tiny_gqa_runner()


@pytest.fixture(scope="module")
def ctx(runner):
    from tests.fixtures.models import tiny_gqa_context

    return tiny_gqa_context(runner)


def _ids(n: int, seed: int) -> list[int]:
    from tests.fixtures.models import random_ids

    return random_ids(n, seed)


def _cache(runner, ctx, name: str, n: int, seed: int) -> CompactCache:
    policy = get_policy(name, kept=0.3)
    return runner.prefill_segment(_ids(n, seed), policy=policy, ctx=ctx).cache


def _rand(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _queries(runner, cache, S: int, seed: int) -> BaseQueries:
    qs = {i: _rand(runner.num_heads, S, runner.head_dim, seed=seed + i) for i in range(runner.num_layers)}
    return BaseQueries(cache.layers, qs, cache.shared_bases())


def _ragged(cache) -> bool:
    return any(len(set(lc.head_lengths().tolist())) > 1 or lc.distant is not None for lc in cache.layers)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("tail", [0, 3])
def test_prefill_on_cache_equals_reference(runner, ctx, name, tail):
    cache = _cache(runner, ctx, name, 300, seed=1)
    if name in ("kvzip", "razor", "adakv", "pod"):
        assert _ragged(cache), f"{name} should give heads their own row counts"
    for t in range(tail):
        runner.decode_step(5 + t, cache)
    S, d, H = 7, runner.head_dim, runner.num_kv_heads
    base = _queries(runner, cache, S, seed=10)
    for i, lc in enumerate(cache.layers):
        q = base.queries[i]
        nk, nv = _rand(H, S, d, seed=20 + i), _rand(H, S, d, seed=30 + i)
        got = attention.ragged_prefill_attention(q, lc, nk, nv, 0.3, base)
        want = ref.ragged_prefill_attention(q, lc, nk, nv, 0.3, base)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", POLICIES)
def test_scoring_pass_equals_reference(runner, ctx, name, monkeypatch):
    """KVzip's pass over [a compressed cache ; a new dense segment], with log-weights and PoD rows."""
    cache = _cache(runner, ctx, name, 200, seed=2)
    S, d, H = 40, runner.head_dim, runner.num_kv_heads
    seg_k, seg_v = _rand(H, S, d, seed=3), _rand(H, S, d, seed=4)
    seg = CompactCache([LayerCache.from_dense(seg_k, seg_v, torch.arange(200, 240)) for _ in cache.layers], 240, 200)
    full = cache.extended(seg)
    C = 24
    base = _queries(runner, full, C, seed=40)
    for block in (None, 1):  # one block, and 16 query rows a block
        if block:
            monkeypatch.setattr(attention, "SCORE_BLOCK_FLOATS", block)
            monkeypatch.setattr(ref, "SCORE_BLOCK_FLOATS", block)
        for i, lc in enumerate(full.layers):
            q = base.queries[i]
            nk, nv = _rand(H, C, d, seed=50 + i), _rand(H, C, d, seed=60 + i)
            o, s = attention.prefill_attention_scores(q, lc, nk, nv, 0.3, S, 5, base)
            wo, ws = ref.prefill_attention_scores(q, lc, nk, nv, 0.3, S, 5, base)
            torch.testing.assert_close(o, wo, atol=ATOL, rtol=0)
            torch.testing.assert_close(s, ws, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", POLICIES)
def test_decode_layer_equals_reference_with_recall_watch(runner, ctx, name):
    cache = _cache(runner, ctx, name, 260, seed=5)
    for t in range(4):
        runner.decode_step(7 + t, cache)
    base = _queries(runner, cache, 1, seed=70)
    for i, lc in enumerate(cache.layers):
        q = base.queries[i]
        for thr in (None, 0.0, 0.02):
            got, gh = attention.ragged_decode_attention(q, lc, 0.3, thr, base)
            want, wh = ref.ragged_decode_attention(q, lc, 0.3, thr, base)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
            assert [(h.head, h.row) for h in gh] == [(h.head, h.row) for h in wh]
            assert [h.share for h in gh] == pytest.approx([h.share for h in wh], abs=ATOL)
        if name in ("razor", "ems"):
            assert attention.ragged_decode_attention(q, lc, 0.3, 0.0, base)[1], "merged rows are watched"


@torch.inference_mode()
def _reference_step(runner, token: int, cache: CompactCache, thr, stats: DecodeStats) -> torch.Tensor:
    """One decode step of one sequence through the runner's layer loop with the per-head attention."""
    pos = torch.tensor([cache.seq_len])
    h, cos, sin = runner._embed(torch.tensor([token]), pos)
    shared = BaseQueries.for_cache(cache)

    def attend(i, scaling, x, q, k, v):
        lc = cache.layers[i]
        lc.append(k, v, pos)
        shared.hold(i, q)
        o, hits = ref.ragged_decode_attention(q, lc, scaling, thr, shared)
        shared.release(i)
        stats.recalls.extend((i, s) for s in hits)
        return o

    h = runner._layers(h, cos, sin, attend)
    cache.advance(1)
    return runner.model.lm_head(runner._inner.norm(h[0])).float()[0]


def _swap_merged_row(cache: CompactCache, only: set[int] | None = None) -> bool:
    """Recall's change mid-decode: replace one merged row by its originals (a new layer object),
    in the first layer (of `only`, when given) that holds one."""
    for i, lc in enumerate(cache.layers):
        if lc.recall is None or lc.recall.num_groups == 0 or (only is not None and i not in only):
            continue
        for h in range(lc.num_heads):
            a, b = int(lc.head_offsets[h]), int(lc.head_offsets[h + 1])
            rows = (lc.recall_ids[a:b] >= 0).nonzero().flatten().tolist()
            if rows:
                pos, k, v = lc.recall.group(int(lc.recall_ids[a + rows[0]]))
                if k.shape[0]:
                    cache.layers[i] = lc.with_row_replaced(h, rows[0], k, v, pos)
                    return True
    return False


SETUPS = [("razor", 170), ("kvzip", 300), ("pod", 240), ("ems", 210), ("full", 90)]


@pytest.mark.parametrize("B, steps", [(1, 8), (5, 8), pytest.param(5, 66, marks=pytest.mark.slow)])
def test_decode_batch_equals_reference(runner, ctx, B, steps):
    """B ragged sequences (different lengths and policies) step together, with the recall watch on
    and a recall swap halfway; 66 steps go past the views' first capacity (64 tail slots)."""
    setups = SETUPS[:B]
    mine = [_cache(runner, ctx, n, L, seed=80 + j) for j, (n, L) in enumerate(setups)]
    theirs = [c.clone() for c in mine]
    thr = [0.02] * B
    s_mine, s_theirs = [DecodeStats() for _ in range(B)], [DecodeStats() for _ in range(B)]
    swapped = False
    for step in range(steps):
        toks = [int(3 + (7 * step + 11 * j) % 250) for j in range(B)]
        got = runner.decode_batch(toks, mine, thr, s_mine)
        want = torch.stack([_reference_step(runner, t, c, x, s) for t, c, x, s in zip(toks, theirs, thr, s_theirs, strict=True)])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
        if step == steps // 2:
            swapped = _swap_merged_row(mine[0]) and _swap_merged_row(theirs[0])
    for a, b in zip(s_mine, s_theirs, strict=True):
        assert [(i, s.head, s.row) for i, s in a.recalls] == [(i, s.head, s.row) for i, s in b.recalls]
    assert any(s.recalls for s in s_mine), "the watch saw merged rows"
    assert swapped
    for a, b in zip(mine, theirs, strict=True):
        assert a.seq_len == b.seq_len
        for la, lb in zip(a.compacted().layers, b.compacted().layers, strict=True):
            assert torch.equal(la.positions, lb.positions) and torch.equal(la.head_offsets, lb.head_offsets)
            torch.testing.assert_close(la.keys, lb.keys, atol=ATOL, rtol=0)


def test_views_follow_outside_appends_and_new_batches(runner, ctx):
    """A cache stepped alone between batched steps, and a batch that changes: the views rebuild."""
    a, b = _cache(runner, ctx, "kvzip", 120, seed=90), _cache(runner, ctx, "adakv", 150, seed=91)
    ra, rb = a.clone(), b.clone()
    st = DecodeStats()
    for step in range(6):
        if step % 3 == 2:
            got = runner.decode_batch([9], [a])
            want = _reference_step(runner, 9, ra, None, st)[None]
        else:
            got = runner.decode_batch([9, 10], [a, b])
            want = torch.stack([_reference_step(runner, 9, ra, None, st), _reference_step(runner, 10, rb, None, st)])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_decode_batch_with_small_pages_equals_reference(runner, ctx, monkeypatch):
    """Pages of 3 slots: every head spans many pages and tail pages join the step mid-run."""
    from headwise import attention_paged

    monkeypatch.setattr(attention_paged, "PAGE", 3)
    runner._views = None
    setups = SETUPS[:3]
    mine = [_cache(runner, ctx, n, L, seed=95 + j) for j, (n, L) in enumerate(setups)]
    theirs = [c.clone() for c in mine]
    st, s_mine = [DecodeStats() for _ in setups], [DecodeStats() for _ in setups]
    for step in range(9):
        toks = [int(5 + (3 * step + 7 * j) % 250) for j in range(len(setups))]
        got = runner.decode_batch(toks, mine, [0.02] * 3, s_mine)
        want = torch.stack([_reference_step(runner, t, c, 0.02, s) for t, c, s in zip(toks, theirs, st, strict=True)])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
    assert [[(i, s.head, s.row) for i, s in a.recalls] for a in s_mine] == [[(i, s.head, s.row) for i, s in a.recalls] for a in st]
    assert any(a.recalls for a in s_mine), "the watch saw merged rows"
    views = runner._views
    assert views.views[0].active(views.steps) < views.views[0].keys.shape[0], "tail pages not yet written are not read"
    runner._views = None


@pytest.mark.parametrize("page", [64, 5])
def test_decode_batch_pod_with_merged_rows_equals_reference(runner, ctx, monkeypatch, page):
    """A PoD cache extended by an EMS segment: layers with distant rows (in pages of their own,
    scored with the base layer's queries) and merged rows watched for recall in the same head;
    the watch reports rows within the head, not slots."""
    from headwise import attention_paged

    monkeypatch.setattr(attention_paged, "PAGE", page)
    runner._views = None
    pod = _cache(runner, ctx, "pod", 230, seed=120)
    chain = runner.prefill_segment(_ids(190, 121), cache=pod, policy=get_policy("ems", kept=0.3), ctx=ctx).cache
    both = [i for i, lc in enumerate(chain.layers) if lc.distant is not None and bool(lc.distant.any())
            and lc.recall is not None and lc.recall.num_groups > 0]
    assert both, "some layer holds both distant and merged rows"
    mine = [chain, _cache(runner, ctx, "kvzip", 170, seed=122)]
    theirs = [c.clone() for c in mine]
    s_mine, s_theirs = [DecodeStats(), DecodeStats()], [DecodeStats(), DecodeStats()]
    for step in range(5):
        toks = [int(4 + (5 * step + 13 * j) % 250) for j in range(2)]
        got = runner.decode_batch(toks, mine, [0.0, 0.02], s_mine)
        want = torch.stack([_reference_step(runner, t, c, x, s)
                            for t, c, x, s in zip(toks, theirs, [0.0, 0.02], s_theirs, strict=True)])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
    for a, b in zip(s_mine, s_theirs, strict=True):
        assert [(i, s.head, s.row) for i, s in a.recalls] == [(i, s.head, s.row) for i, s in b.recalls]
        assert [s.share for _, s in a.recalls] == pytest.approx([s.share for _, s in b.recalls], abs=ATOL)
    assert any(i in both for i, _ in s_mine[0].recalls), "merged rows of a layer with distant rows were watched"
    runner._views = None


def _pod_layer(g: torch.Generator, S: int, d: int, keep: list[list[int]], distant: list[list[int]],
               distant_from: list[int]) -> LayerCache:
    """A hand-made layer: head h holds the tokens keep[h] (ascending), those in distant[h] without
    a key (their logits from layer distant_from[h]); random keys, values and log-weights."""
    ks, vs, ps, lws, ds = [], [], [], [], []
    for h, toks in enumerate(keep):
        dist = torch.tensor([t in distant[h] for t in toks], dtype=torch.bool)
        ks.append(torch.randn(int((~dist).sum()), d, generator=g))
        vs.append(torch.randn(len(toks), d, generator=g))
        ps.append(torch.tensor(toks, dtype=torch.long))
        lws.append(torch.rand(len(toks), generator=g) * 2)  # every row weighted: log-weights of base rows too
        ds.append(dist)
    any_dist = any(bool(x.any()) for x in ds)
    return LayerCache.from_heads(ks, vs, ps, lws, distant=ds if any_dist else None,
                                 distant_from=[b if distant[h] else -1 for h, b in enumerate(distant_from)] if any_dist else None)


def _pod_cache(seed: int, S: int = 40, d: int = 8) -> CompactCache:
    """Four layers, three KV heads: layer 0 the base of heads 0 and 1, layer 1 the base of head 2
    and a member of head 0's block, layers 2 and 3 members of blocks of both bases. Each member
    has its own distant tokens (subsets of the base head's, different per layer), so the distant
    logits of a layer are not those of another layer of its block."""
    g = torch.Generator().manual_seed(seed)
    rnd = torch.Generator().manual_seed(seed + 1)

    def pick(toks: list[int], n: int) -> list[int]:
        return sorted(toks[i] for i in torch.randperm(len(toks), generator=rnd)[:n].tolist())

    base0 = [pick(list(range(S)), 30), pick(list(range(S)), 25), pick(list(range(S)), 28)]
    base1_h2 = pick(list(range(S)), 33)
    layers = [_pod_layer(g, S, d, base0, [[], [], []], [-1, -1, -1])]
    k1 = [pick(base0[0], 26), pick(list(range(S)), 20), base1_h2]
    layers.append(_pod_layer(g, S, d, k1, [pick(k1[0], 17), [], []], [0, -1, -1]))
    k2 = [pick(base0[0], 24), pick(base0[1], 22), pick(base1_h2, 30)]
    layers.append(_pod_layer(g, S, d, k2, [pick(k2[0], 9), pick(k2[1], 14), pick(k2[2], 21)], [0, 0, 1]))
    k3 = [pick(base0[0], 29), pick(list(range(S)), 18), pick(base1_h2, 31)]
    layers.append(_pod_layer(g, S, d, k3, [pick(k3[0], 23), [], pick(k3[2], 12)], [0, -1, 1]))
    return CompactCache(layers, S)


@pytest.mark.parametrize("page", [64, 5])
def test_paged_distant_logits_per_layer_equal_reference(monkeypatch, page):
    """PoD's distant logits shared from the base layer's product: members of a block whose
    distant tokens differ per layer (subsets of the base head's, in several pages with 5-slot
    pages), a layer holding rows of two bases and being a base itself, log-weights on base and
    distant rows, holes in the mirrored pages (slots of base rows a layer does not hold as
    distant), two streams with different layouts; every layer's decode output over three
    steps equals the per-head reference (q_base . K_base of each distant row's own token), and
    the distant pages hold no keys."""
    from headwise import attention_paged as ap

    monkeypatch.setattr(ap, "PAGE", page)
    H, G, d, scaling = 3, 2, 8, 0.35
    mine = [_pod_cache(200), _pod_cache(300)]
    theirs = [c.clone() for c in mine]
    B = len(mine)
    views = ap.DecodeViews(mine, 64, G)
    for i, v in enumerate(views.views):
        assert v.keys.shape[0] == v.values.shape[0] - v.nd, "distant pages hold no keys"
        assert (v.nd > 0) == (i > 0) and v.shares_from == tuple(sorted({b for c in mine for b in c.layers[i].distant_from or () if b >= 0}))
    g = torch.Generator().manual_seed(7)
    for step in range(3):
        idx = views.step_index()
        qs = [list(torch.randn(B, H * G, 1, d, generator=g)) for _ in mine[0].layers]  # [layer][b]: [Hq, 1, d]
        kv = [(torch.randn(B, H, d, generator=g), torch.randn(B, H, d, generator=g)) for _ in mine[0].layers]
        for i in range(len(mine[0].layers)):
            k, v = kv[i]
            view, n = views.write(i, idx, k.reshape(B * H, d), v.reshape(B * H, d))
            qb = torch.stack([qs[i][b][:, 0] for b in range(B)]).reshape(B * H, G, d)
            got = ap.paged_decode(qb, view, n, scaling)[0].view(B, H * G, d)
            for b, c in enumerate(theirs):
                c.layers[i].append(k[b][:, None], v[b][:, None], torch.tensor([c.seq_len]))
                shared = BaseQueries(c.layers, {j: qs[j][b] for j in range(i)}, c.shared_bases())
                want = ref.ragged_decode_attention(qs[i][b], c.layers[i], scaling, None, shared)[0][:, 0]
                torch.testing.assert_close(got[b], want, atol=ATOL, rtol=0, msg=f"step {step}, layer {i}, stream {b}")
        views.advance(mine, torch.tensor([c.seq_len for c in mine]))
        for c in mine + theirs:
            c.advance(1)


def test_decode_batch_pod_recall_in_base_layer_equals_reference(runner, ctx, monkeypatch):
    """A recall swap in a PoD base layer (a PoD cache extended by EMS: the base layer's merged
    rows) rebuilds that layer's view, and with it the views of the layers that read its logits:
    decoding on equals the reference."""
    from headwise import attention_paged

    monkeypatch.setattr(attention_paged, "PAGE", 5)
    runner._views = None
    pod = _cache(runner, ctx, "pod", 230, seed=130)
    chain = runner.prefill_segment(_ids(190, 131), cache=pod, policy=get_policy("ems", kept=0.3), ctx=ctx).cache
    bases = set(chain.shared_bases())
    assert bases, "the PoD cache has blocks"
    theirs = chain.clone()
    st_m, st_t = DecodeStats(), DecodeStats()
    swapped = False
    for step in range(6):
        tok = int(6 + 11 * step % 250)
        got = runner.decode_batch([tok], [chain], [0.02], [st_m])
        want = _reference_step(runner, tok, theirs, 0.02, st_t)[None]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
        if step == 2:
            old = list(runner._views.views)
            swapped = _swap_merged_row(chain, only=bases) and _swap_merged_row(theirs, only=bases)
            assert swapped, "a base layer holds a merged row with originals"
    new = runner._views.views
    i = next(i for i in range(len(new)) if new[i] is not old[i])
    assert i in bases and all(new[j] is not old[j] for j in range(len(new)) if i in new[j].shares_from)
    runner._views = None
