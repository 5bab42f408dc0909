"""The varlen path (headwise/attention_varlen.py) equals the per-head reference.

On CPU the kernel is `reference_varlen_attn`, a pure-torch stand-in with varlen_attn's contract,
itself checked against scaled_dot_product_attention; everything around the kernel (the layout,
the split into plain and special rows, the log-sum-exp merge, log-weights, PoD rows, decode
tails, the recall watch, B = 1 and B = 5 ragged sequences through `ModelRunner.decode_batch`) is
compared with headwise/attention_reference.py in fp32 within 1e-5. Tests marked `gpu` run
torch's Flash Attention varlen kernel on CUDA (skipped without one): the kernel against the
stand-in (fp16: 2e-3 on outputs of magnitude ~1, 1e-3 on lse) and the engine in bf16 against
the reference in bf16 (2e-2, as tests/test_engine_devices.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from headwise import attention_reference as ref
from headwise import attention_varlen as av
from headwise.attention_paged import DecodeViews, paged_decode
from headwise.models.runner import DecodeStats
from tests.test_attention import POLICIES, SETUPS, _cache, _queries, _ragged, _rand, _reference_step, _swap_merged_row

ATOL = 1e-5
KERNEL = av.reference_varlen_attn
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture(scope="module")
def runner():
    from tests.fixtures.models import tiny_gqa_runner

    return tiny_gqa_runner()


@pytest.fixture(scope="module")
def ctx(runner):
    from tests.fixtures.models import tiny_gqa_context

    return tiny_gqa_context(runner)


# ---- the stand-in keeps varlen_attn's contract ---------------------------------------------
def _sdpa_per_sequence(q, k, v, cu_q, cu_k, used, causal, scale):
    """Each sequence through scaled_dot_product_attention (GQA by repeat, causal bottom-right)."""
    outs = []
    G = q.shape[1] // k.shape[1]
    for i in range(cu_q.numel() - 1):
        qa, qb, ka = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i])
        kb = ka + int(used[i]) if used is not None else int(cu_k[i + 1])
        qi = q[qa:qb].transpose(0, 1)
        ki, vi = (x[ka:kb].transpose(0, 1).repeat_interleave(G, 0) for x in (k, v))
        sq, sk = qi.shape[1], ki.shape[1]
        mask = torch.arange(sk)[None] <= torch.arange(sq)[:, None] + sk - sq if causal else None
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_stand_in_kernel_is_varlen_attention(causal):
    """Ragged sequences, GQA, seqused_k shorter than the region, keys longer than queries."""
    lq, lk, used = [1, 4, 3], [6, 9, 5], [5, 9, 3]
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v = _rand(sum(lq), 4, 8, seed=1), _rand(sum(lk), 2, 8, seed=2), _rand(sum(lk), 2, 8, seed=3)
    used_t = torch.tensor(used, dtype=torch.int32)
    out, lse = KERNEL(q, k, v, cu_q, cu_k, max(lq), max(lk), return_aux=av._aux(), scale=0.3,
                      window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True, seqused_k=used_t)
    torch.testing.assert_close(out, _sdpa_per_sequence(q, k, v, cu_q, cu_k, used_t, causal, 0.3), atol=ATOL, rtol=0)
    assert lse.shape == (4, sum(lq)) and lse.dtype == torch.float32
    # lse of sequence 0 (one query, 5 keys), query head 3 (KV head 1), no mask reaches it
    want = torch.logsumexp(0.3 * k[:5, 1] @ q[0, 3], 0)
    torch.testing.assert_close(lse[3, 0], want, atol=ATOL, rtol=0)
    with pytest.raises(ValueError):
        KERNEL(q, k, v, cu_q, cu_k, 4, 9)  # GQA without enable_gqa


def test_empty_sequence_weighs_nothing_in_the_merge():
    q, k, v = _rand(2, 2, 4, seed=4), _rand(3, 1, 4, seed=5), _rand(3, 1, 4, seed=6)
    cu_q, cu_k = torch.tensor([0, 1, 2], dtype=torch.int32), torch.tensor([0, 0, 3], dtype=torch.int32)
    out, lse = KERNEL(q, k, v, cu_q, cu_k, 1, 3, return_aux=av._aux(), enable_gqa=True)
    assert torch.isinf(lse[:, 0]).all() and (out[0] == 0).all()  # Flash Attention's convention: lse +inf
    other = (_rand(2, 2, 4, seed=7), torch.zeros(2, 2))
    merged, total = av._merge([(out.float(), av._lse_rows(lse, 2, 2)), other])
    torch.testing.assert_close(merged[0], other[0][0], atol=ATOL, rtol=0)


# ---- the engine's layers over the varlen layout -------------------------------------------
@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("tail", [0, 3])
def test_prefill_on_cache_equals_reference(runner, ctx, name, tail):
    cache = _cache(runner, ctx, name, 300, seed=1)
    if name in ("kvzip", "razor", "adakv", "pod"):
        assert _ragged(cache)
    for t in range(tail):
        runner.decode_step(5 + t, cache)
    S, d, H = 7, runner.head_dim, runner.num_kv_heads
    base = _queries(runner, cache, S, seed=10)
    for i, lc in enumerate(cache.layers):
        q = base.queries[i]
        nk, nv = _rand(H, S, d, seed=20 + i), _rand(H, S, d, seed=30 + i)
        got = av.varlen_prefill_attention(q, lc, nk, nv, 0.3, base, kernel=KERNEL)
        want = ref.ragged_prefill_attention(q, lc, nk, nv, 0.3, base)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["razor", "kvzip", "pod", "ems"])
def test_scoring_pass_equals_reference(runner, ctx, name):
    """KVzip's pass: the scored rows' probabilities come from the explicit part and the merged lse."""
    from headwise.cache.compact import CompactCache, LayerCache

    cache = _cache(runner, ctx, name, 200, seed=2)
    S, d, H = 40, runner.head_dim, runner.num_kv_heads
    seg = CompactCache([LayerCache.from_dense(_rand(H, S, d, seed=3), _rand(H, S, d, seed=4), torch.arange(200, 240))
                        for _ in cache.layers], 240, 200)
    full = cache.extended(seg)
    C = 24
    base = _queries(runner, full, C, seed=40)
    for i, lc in enumerate(full.layers):
        q = base.queries[i]
        nk, nv = _rand(H, C, d, seed=50 + i), _rand(H, C, d, seed=60 + i)
        o, s = av.varlen_attention_scores(q, lc, nk, nv, 0.3, S, 5, base, kernel=KERNEL)
        wo, ws = ref.prefill_attention_scores(q, lc, nk, nv, 0.3, S, 5, base)
        torch.testing.assert_close(o, wo, atol=ATOL, rtol=0)
        torch.testing.assert_close(s, ws, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", POLICIES)
def test_decode_layer_equals_reference_with_recall_watch(runner, ctx, name):
    cache = _cache(runner, ctx, name, 260, seed=5)
    for t in range(4):
        runner.decode_step(7 + t, cache)
    base = _queries(runner, cache, 1, seed=70)
    H, G, d = runner.num_kv_heads, runner.num_heads // runner.num_kv_heads, runner.head_dim
    from headwise.attention import _base_rows

    for i, lc in enumerate(cache.layers):
        q = base.queries[i]
        view = av.build_varlen([lc], lc.tail_len, [cache.layers])
        bq = _base_rows(view, {b: x.reshape(H, G, d) for b, x in base.queries.items()}) if view.dist_keys is not None else None
        for thr in (None, 0.0, 0.02):
            t = None if thr is None else torch.full((H, 1), thr)
            got, hits = av.varlen_decode(q.reshape(H, G, d), view, 0, 0.3, bq, t, kernel=KERNEL)
            want, wh = ref.ragged_decode_attention(q, lc, 0.3, thr, base)
            torch.testing.assert_close(got.reshape(-1, 1, d), want, atol=ATOL, rtol=0)
            from headwise.attention_paged import paged_shares

            gh = [s for _, s in paged_shares(hits, H)]
            assert [(h.head, h.row) for h in gh] == [(h.head, h.row) for h in wh]
            assert [h.share for h in gh] == pytest.approx([h.share for h in wh], abs=ATOL)
        if name in ("razor", "ems"):
            assert av.varlen_decode(q.reshape(H, G, d), view, 0, 0.3, bq, torch.zeros(H, 1), kernel=KERNEL)[1][0].numel()
        if name == "pod" and view.dist_keys is not None:
            assert bool(view.sp_distant.any()), "PoD rows go through the explicit part"


@pytest.fixture
def varlen_runner(runner, monkeypatch):
    """The runner's decode_batch over VarlenDecodeViews and varlen_decode with the stand-in kernel,
    as `select_decode_attention(device, kernel=...)` hands them out."""
    monkeypatch.setattr(runner, "_decode_attention", av.select_decode_attention("cpu", kernel=KERNEL))
    runner._views = None
    yield runner
    runner._views = None


@pytest.mark.parametrize("B, steps", [(1, 8), (5, 8), pytest.param(5, 66, marks=pytest.mark.slow)])
def test_decode_batch_equals_reference(varlen_runner, ctx, B, steps):
    """B ragged sequences step together through the varlen views, recall watch on, a recall swap
    halfway; 66 steps outgrow the first capacity (64 tail slots) and rebuild."""
    runner = varlen_runner
    mine = [_cache(runner, ctx, n, L, seed=80 + j) for j, (n, L) in enumerate(SETUPS[:B])]
    theirs = [c.clone() for c in mine]
    thr = [0.02] * B
    s_mine, s_theirs = [DecodeStats() for _ in range(B)], [DecodeStats() for _ in range(B)]
    swapped = False
    for step in range(steps):
        toks = [int(3 + (7 * step + 11 * j) % 250) for j in range(B)]
        got = runner.decode_batch(toks, mine, thr, s_mine)
        assert isinstance(runner._views, av.VarlenDecodeViews)
        want = torch.stack([_reference_step(runner, t, c, x, s) for t, c, x, s in zip(toks, theirs, thr, s_theirs, strict=True)])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"step {step}")
        if step == steps // 2:
            swapped = _swap_merged_row(mine[0]) and _swap_merged_row(theirs[0])
    for a, b in zip(s_mine, s_theirs, strict=True):
        assert [(i, s.head, s.row) for i, s in a.recalls] == [(i, s.head, s.row) for i, s in b.recalls]
    assert any(s.recalls for s in s_mine), "the watch saw merged rows"
    assert swapped
    for a, b in zip(mine, theirs, strict=True):
        for la, lb in zip(a.compacted().layers, b.compacted().layers, strict=True):
            assert torch.equal(la.positions, lb.positions) and torch.equal(la.head_offsets, lb.head_offsets)
            torch.testing.assert_close(la.keys, lb.keys, atol=ATOL, rtol=0)


def test_decode_layout_is_built_once_per_cache_change(varlen_runner, ctx):
    """Steps write into the same view (no rebuild) and the kernel reads only written slots."""
    runner = varlen_runner
    caches = [_cache(runner, ctx, "kvzip", 150, seed=3), _cache(runner, ctx, "adakv", 120, seed=4)]
    runner.decode_batch([5, 6], caches)
    views = runner._views
    first = views.views[0]
    for t in range(3):
        runner.decode_batch([7 + t, 8 + t], caches)
    assert runner._views is views and views.views[0] is first
    lc = caches[0].layers[0]
    assert first.used.tolist()[: lc.num_heads] == [p + lc.tail_len for p in first.plain[: lc.num_heads]]


def test_selection_keeps_the_cpu_path():
    assert av.select_decode_attention("cpu") == (DecodeViews, paged_decode)
    assert av.select_decode_attention("cpu", torch.bfloat16)[0] is DecodeViews
    assert not av.use_varlen("cpu", torch.float16)
    views, decode = av.select_decode_attention("cpu", kernel=KERNEL)
    assert views is av.VarlenDecodeViews and decode.keywords["kernel"] is KERNEL
    from headwise.attention import ragged_prefill_attention

    assert av.select_prefill_attention("cpu") is ragged_prefill_attention
    if torch.cuda.is_available():
        assert av.use_varlen("cuda", torch.bfloat16) == (av.cuda_kernel() is not None)
        assert not av.use_varlen("cuda", torch.float32)  # Flash Attention takes fp16/bf16 only


# ---- on CUDA: the real kernel ------------------------------------------------------------
@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_kernel_keeps_the_stand_in_contract(causal):
    """varlen_attn (fp16) against the stand-in: output, lse orientation, bottom-right causal,
    seqused_k, GQA with one KV head, an empty sequence."""
    kernel = av.cuda_kernel()
    assert kernel is not None, "torch.nn.attention.varlen.varlen_attn is missing"
    lq, lk, used = [1, 8, 5, 1], [40, 90, 33, 16], [37, 90, 20, 0]
    dev = "cuda"
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    used_t = torch.tensor(used, dtype=torch.int32, device=dev)
    q = _rand(sum(lq), 2, 64, seed=1).half().to(dev)
    k, v = (_rand(sum(lk), 1, 64, seed=s).half().to(dev) for s in (2, 3))
    kw = dict(return_aux=av._aux(), scale=0.125, window_size=(-1, 0) if causal else (-1, -1), enable_gqa=True, seqused_k=used_t)
    got, glse = kernel(q, k, v, cu_q, cu_k, max(lq), max(lk), **kw)
    want, wlse = KERNEL(q.float(), k.float(), v.float(), cu_q, cu_k, max(lq), max(lk), **kw)
    live = torch.tensor([u > 0 for u, n in zip(used, lq, strict=True) for _ in range(n)], device=dev)
    torch.testing.assert_close(got.float()[live], want[live], atol=2e-3, rtol=0)
    torch.testing.assert_close(av._lse_rows(glse, sum(lq), 2)[live], av._lse_rows(wlse, sum(lq), 2)[live], atol=1e-3, rtol=0)
    assert torch.isneginf(av._lse_rows(glse, sum(lq), 2)[~live]).all(), "a sequence with no key weighs nothing"


def _cuda_runner(dtype):
    from headwise.models import ModelRunner
    from tests.fixtures.models import tiny_llama

    model = tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96, seed=1).to(device="cuda", dtype=dtype)
    return ModelRunner(model, None, "cuda", name=f"tiny-gqa-cuda-{dtype}")


@pytest.mark.gpu
@cuda
def test_cuda_varlen_decode_and_prefill_equal_reference():
    """The engine in bf16 on CUDA through varlen_attn against the per-head reference (bf16, 2e-2)."""
    from tests.test_engine_devices import _ctx

    runner = _cuda_runner(torch.bfloat16)
    assert runner._decode_attention[0] is av.VarlenDecodeViews, "bf16 on CUDA selects the varlen path"
    ctx = _ctx(runner)
    mine = [_cache(runner, ctx, n, L, seed=80 + j) for j, (n, L) in enumerate(SETUPS)]
    theirs = [c.clone() for c in mine]
    stats = [DecodeStats() for _ in mine]
    for step in range(4):
        toks = [5 + step + j for j in range(len(mine))]
        got = runner.decode_batch(toks, mine, [0.02] * len(mine))
        want = torch.stack([_reference_step(runner, t, c, 0.02, s) for t, c, s in zip(toks, theirs, stats, strict=True)])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, atol=2e-2, rtol=0, msg=f"step {step}")
    prefill = av.select_prefill_attention(runner.device, runner.dtype)
    cache = mine[2]  # pod: distant rows
    S, d, H = 7, runner.head_dim, runner.num_kv_heads
    base = _queries(runner, cache, S, seed=10)
    base.queries = {i: x.to("cuda", torch.bfloat16) for i, x in base.queries.items()}
    for i, lc in enumerate(cache.layers):
        nk, nv = (_rand(H, S, d, seed=s + i).to("cuda", torch.bfloat16) for s in (20, 30))
        got = prefill(base.queries[i], lc, nk, nv, 0.3, base)
        want = ref.ragged_prefill_attention(base.queries[i], lc, nk, nv, 0.3, base)
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)




@pytest.mark.parametrize("name", ["razor", "pod", "adakv"])
def test_runner_prefill_on_cache_through_the_varlen_hook(runner, ctx, name, monkeypatch):
    """A question prefilled on a compressed cache: the same logits through `_prefill_attention`."""
    cache = _cache(runner, ctx, name, 240, seed=6)
    question = [7, 11, 13, 17, 19, 23]
    want = runner.prefill(question, cache).logits
    monkeypatch.setattr(runner, "_prefill_attention", av.select_prefill_attention("cpu", kernel=KERNEL))
    got = runner.prefill(question, cache).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
