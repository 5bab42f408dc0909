"""KVzip's windowed reconstruction pass (kvzip:span=N): what it attends to, and exact KVzip kept reachable."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.models.reconstruction import attend_scored
from headwise.policies import get_policy
from headwise.policies.base import Capture

PREFIX = [7, 8, 9, 10, 11]  # a stand-in for the repeat request (the tiny runner has no tokenizer)


@pytest.fixture
def runner(tiny_runner, monkeypatch):
    monkeypatch.setattr(tiny_runner, "_repeat_prefix", lambda: list(PREFIX))
    return tiny_runner


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 250, (300,), generator=torch.Generator().manual_seed(5)).tolist()


@pytest.mark.parametrize("block", [1 << 19, 1])
def test_attend_scored_is_softmax_and_its_max(monkeypatch, block):
    """Output and scores equal an explicit causal softmax over [context, new rows], in one query
    block or in blocks of 16 rows (the causal mask cut per block)."""
    import headwise.models.reconstruction as rec

    monkeypatch.setattr(rec, "BLOCK_FLOATS", block)
    g = torch.Generator().manual_seed(0)
    H, G, n, C, d = 2, 3, 12, 40, 8
    q = torch.randn(H * G, C, d, generator=g)
    keys, values = torch.randn(H, n + C, d, generator=g), torch.randn(H, n + C, d, generator=g)
    out, best = attend_scored(q, keys, values, n, 0.5, 9)
    for h in range(H):
        logits = q[h * G : (h + 1) * G] @ keys[h].T * 0.5
        logits[:, :, n:] += torch.full((C, C), float("-inf")).triu(1)
        p = torch.softmax(logits, -1)
        torch.testing.assert_close(out[h * G : (h + 1) * G], p @ values[h], atol=1e-5, rtol=0)
        torch.testing.assert_close(best[h], p[:, :, :9].amax(dim=(0, 1)), atol=1e-6, rtol=0)
    assert attend_scored(q, keys, values, n, 0.5, 9, out_needed=False)[0] is None


def test_a_window_over_the_whole_segment_is_exact_kvzip(runner, ids, monkeypatch):
    """With the exact pass's chunks and a span past the segment, every chunk sees every row: the
    windowed pass (the request run once, its rows reused by every chunk) gives exact KVzip's scores."""
    out = runner.prefill(ids)
    monkeypatch.setattr(runner, "RECONSTRUCT_CHUNK", 128)
    monkeypatch.setattr(runner, "RECONSTRUCT_WINDOWED_CHUNK", 128)
    exact = runner.reconstruction_scores(ids, None, out.states, out.start)
    wide = runner.reconstruction_scores(ids, None, out.states, out.start, len(ids))
    for a, b in zip(exact, wide, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_a_narrow_window_scores_rows_only_from_the_chunks_that_see_them(runner, ids, monkeypatch):
    """span 16, chunks of 64: a row is scored by the chunks within 16 tokens of it (the sinks by
    every chunk). Re-reading other tokens from 192 on changes the scores of the rows those chunks
    see (176 on, and the sinks) and of no other row; in the exact pass it changes every row's."""
    import headwise.models.reconstruction as rec

    monkeypatch.setattr(runner, "RECONSTRUCT_WINDOWED_CHUNK", 64)
    monkeypatch.setattr(runner, "RECONSTRUCT_CHUNK", 64)
    out = runner.prefill(ids)
    other = ids[:192] + [(t + 17) % 250 + 3 for t in ids[192:]]
    for span in (16, 0):
        a = torch.stack(runner.reconstruction_scores(ids, None, out.states, out.start, span))
        b = torch.stack(runner.reconstruction_scores(other, None, out.states, out.start, span))
        assert bool((a > 0).all())
        if span:
            assert torch.equal(a[..., rec.SINKS : 176], b[..., rec.SINKS : 176])
            assert not torch.allclose(a[..., 176:], b[..., 176:]) and not torch.allclose(a[..., : rec.SINKS], b[..., : rec.SINKS])
            narrow = a
        else:
            assert not torch.allclose(a[..., rec.SINKS : 176], b[..., rec.SINKS : 176])
            assert not torch.allclose(narrow, a, atol=1e-4)


def test_stepwise_equals_the_prefill_capture_bitwise(runner, ids, monkeypatch):
    """The pass one layer per step (the service's deferred compression) gives, bit for bit, what
    prefill's capture gives; one step per layer of the request, then per layer of each chunk."""
    monkeypatch.setattr(runner, "RECONSTRUCT_WINDOWED_CHUNK", 128)
    whole = runner.prefill(ids, capture=Capture(reconstruction=True, reconstruction_span=32))
    plain = runner.prefill(ids)
    steps = list(runner.reconstruction_steps(ids, None, plain.states, plain.start, 32))
    assert len(steps) == (1 + 3) * runner.num_layers + 1 and all(s is None for s in steps[:-1])
    for st, s in zip(whole.states, steps[-1], strict=True):
        assert torch.equal(st.reconstruction, s)


def test_a_span_on_a_cache_is_exact(runner, ids):
    """A segment prefilled on a cache is scored by the exact pass whatever the span."""
    first = runner.prefill_segment(ids[:50]).cache
    out = runner.prefill(ids[50:200], first)
    exact = runner.reconstruction_scores(ids[50:200], first, out.states, out.start)
    spanned = runner.reconstruction_scores(ids[50:200], first, out.states, out.start, 8)
    for a, b in zip(exact, spanned, strict=True):
        assert torch.equal(a, b)


def test_needs_room(runner):
    with pytest.raises(InvalidInput, match="no room to score it by reconstruction"):
        runner.prefill([5] * 1015, capture=Capture(reconstruction=True, reconstruction_span=64))


def test_kvzip_span_setting():
    assert get_policy("kvzip", kept=0.5).capture == Capture(reconstruction=True)  # exact KVzip by default
    pol = get_policy("kvzip", kept=0.5, span=128)
    assert pol.capture == Capture(reconstruction=True, reconstruction_span=128)
    assert pol.params()["span"] == 128 and "span" not in get_policy("kvzip", kept=0.5).params()
    with pytest.raises(InvalidInput, match="span=-1"):
        get_policy("kvzip", kept=0.5, span=-1)


def test_capture_merge_keeps_the_exact_pass_when_one_needs_it():
    exact, w64, w128 = (Capture(reconstruction=True, reconstruction_span=s) for s in (0, 64, 128))
    assert exact.merge(w64).reconstruction_span == 0 and w64.merge(exact).reconstruction_span == 0
    assert w64.merge(w128).reconstruction_span == 128
    assert Capture(window=8).merge(w64).reconstruction_span == 64


def test_bf16_pass_is_kvzip_in_bfloat16(runner, ids):
    """precision bf16 (span 0): KVzip's scores over the whole segment with the products in bfloat16:
    close to the fp32 pass's, not equal to them, bit for bit the same stepwise and through prefill's
    capture; the fp32 model is untouched (the plain prefill gives the same logits after it)."""
    before = runner.prefill(ids)
    exact = torch.stack(runner.reconstruction_scores(ids, None, before.states, before.start))
    half = runner.reconstruction_scores(ids, None, before.states, before.start, 0, "bf16")
    torch.testing.assert_close(torch.stack(half), exact, atol=0.03, rtol=0.1)
    assert not torch.equal(torch.stack(half), exact)
    whole = runner.prefill(ids, capture=Capture(reconstruction=True, reconstruction_precision="bf16"))
    steps = list(runner.reconstruction_steps(ids, None, before.states, before.start, 0, "bf16"))
    assert len(steps) == (1 + 1) * runner.num_layers + 1  # the request, then one chunk of 512
    for st, s, h in zip(whole.states, steps[-1], half, strict=True):
        assert torch.equal(st.reconstruction, s) and torch.equal(s, h)
    assert torch.equal(runner.prefill(ids).logits, before.logits)


def test_kvzip_precision_setting():
    pol = get_policy("kvzip", kept=0.5, precision="bf16", span=64)
    assert pol.capture == Capture(reconstruction=True, reconstruction_span=64, reconstruction_precision="bf16")
    assert pol.params()["precision"] == "bf16" and "precision" not in get_policy("kvzip", kept=0.5).params()
    with pytest.raises(InvalidInput, match="precision='fp16'"):
        get_policy("kvzip", kept=0.5, precision="fp16")
    half = Capture(reconstruction=True, reconstruction_precision="bf16")
    assert half.merge(Capture(reconstruction=True)).reconstruction_precision == "fp32"  # the fp32 pass serves both
    assert half.merge(Capture(window=8)).reconstruction_precision == "bf16"
