"""The query-aware regime (headwise/models/query_aware.py): the question's queries are the window,
only the document is compressed, the question's rows are exact."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.models.query_aware import document_state, prefill_query_aware, query_aware_names, supports_query_aware
from headwise.policies import get_policy
from headwise.policies.base import Capture
from headwise.policies.snapkv import window_scores

# every window-based policy, and the settings docs/policies.md names for the regime
SPECS = [("snapkv", {}), ("adakv", {}), ("adakv", {"scorer": "ahakv"}), ("ahakv", {}), ("ahakv", {"pooling": "none"}),
         ("ahakv", {"pooling": "avg"}), ("taskkv", {}), ("ems", {}), ("ems", {"kernel": 0}), ("ems", {"kernel": 7}), ("pod", {}), ("razor", {"fill": "snapkv"}),
         # the question's window beside KVzip's reconstruction of the document, and the settings tuned for the regime
         ("snapkv", {"signal": "window+kvzip"}), ("taskkv", {"signal": "window+kvzip"}), ("ahakv", {"signal": "window+kvzip"}),
         ("adakv", {"signal": "window+kvzip"}), ("adakv", {"signal": "window+kvzip", "scope": "model"}), ("ems", {"signal": "window+kvzip", "lam": 0.0}), ("ems", {"lam": 0.5}),
         ("ems", {"lam": 0.0}), ("adakv", {"alpha": 0.2}), ("pod", {"signal": "window+kvzip"}), ("pod", {"protect": "retrieval"}),
         ("snapkv", {"signal": "window"}), ("taskkv", {"signal": "window"}), ("ahakv", {"signal": "window"}),
         ("adakv", {"signal": "window"}), ("ems", {"signal": "window"}), ("pod", {"signal": "window"}),
         # scope "model" (the whole model's rows ranked at once) and the reconstruction's weight in the mix
         ("snapkv", {"scope": "model"}), ("snapkv", {"scope": "head"}), ("snapkv", {"scope": "model", "weight": 0.8}),
         ("ahakv", {"scope": "model"}), ("ahakv", {"scope": "model", "weight": 0.8}), ("taskkv", {"scope": "model"}),
         ("taskkv", {"scope": "model", "whole": 0.0}), ("taskkv", {"scope": "head"}), ("ems", {"scope": "model"}),
         ("ems", {"scope": "model", "weight": 0.8}), ("ems", {"scope": "head"}), ("adakv", {"scope": "model", "weight": 0.8}),
         ("adakv", {"scope": "layer"}), ("pod", {"protect": "all"}), ("pod", {"protect": "kv0"}),
         ("pod", {"scope": "model"}), ("pod", {"scope": "model", "weight": 0.8}), ("pod", {"protect": "head"}),
         ("pod", {"protect": "none"}), ("pod", {"protect": "layer"}), ("pod", {"share": 0.7}), ("pod", {"share": 0.0}),
         ("pod", {"protect": "head", "share": 0.0, "scope": "head", "weight": 0.5})]
D, Q = 600, 24  # document >= 512 rows: the realised fraction must be within 1% of the request


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


DOC, QUESTION = _ids(D, 7), _ids(Q, 8)


def _same(a, b) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f))
        for x, y in zip(a.layers, b.layers, strict=True)
        for f in ("keys", "values", "head_offsets", "positions", "log_weights", "recall_ids")
    )


@pytest.fixture(scope="module")
def full_prefill(runner):
    return runner.prefill_segment(DOC + QUESTION)


def test_supported_policies_are_the_window_based_ones():
    assert set(query_aware_names()) == {"snapkv", "adakv", "ahakv", "taskkv", "ems", "pod"}
    assert supports_query_aware(get_policy("razor", kept=0.5, fill="snapkv"))
    for name in ("kvzip", "razor", "streaming", "full"):
        assert not supports_query_aware(get_policy(name) if name == "full" else get_policy(name, kept=0.5))
    assert not supports_query_aware(get_policy("pod", kept=0.25, evict="kvzip"))


@pytest.mark.parametrize("name,settings", SPECS)
def test_kept_one_equals_full(name, settings, runner, ctx, full_prefill):
    res = prefill_query_aware(runner, DOC, QUESTION, get_policy(name, kept=1.0, **settings), ctx)
    assert _same(res.cache, full_prefill.cache)
    assert torch.allclose(res.logits, full_prefill.logits, atol=1e-5)


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("name,settings", SPECS)
def test_document_hits_kept_question_exact(name, settings, kept, runner, ctx, full_prefill):
    if name == "pod" and kept == 0.1:
        kept = 0.12  # sinks 16 + window 32 of a 600-row document: 0.08 is pod's floor here
    res = prefill_query_aware(runner, DOC, QUESTION, get_policy(name, kept=kept, **settings), ctx)
    assert abs(res.document.kept_fraction() - kept) <= 0.01
    assert res.document.start == 0 and res.document.seq_len == D
    assert res.question.start == D and res.cache.seq_len == D + Q
    # the question's rows are the full prefill's own rows, every one of them
    for qa, full in zip(res.question.layers, full_prefill.cache.layers, strict=True):
        for h in range(full.num_heads):
            a, b = int(qa.head_offsets[h]), int(qa.head_offsets[h + 1])
            fa = int(full.head_offsets[h + 1]) - Q
            assert torch.equal(qa.positions[a:b], torch.arange(D, D + Q))
            assert torch.equal(qa.keys[a:b], full.keys[fa : fa + Q]) and torch.equal(qa.values[a:b], full.values[fa : fa + Q])
    for layer in res.document.layers:
        rows = int(layer.head_offsets[-1])
        assert layer.values.shape[0] == layer.positions.numel() == rows  # ragged for real
        assert layer.keys.shape[0] == layer.num_key_rows  # pod: non-base layers hold fewer keys
    assert torch.allclose(res.logits, full_prefill.logits, atol=1e-5)  # the first token: full attention, as the papers


@pytest.mark.parametrize("name,settings", SPECS)
def test_deterministic(name, settings, runner, ctx):
    p = get_policy(name, kept=0.25, **settings)
    a, b = prefill_query_aware(runner, DOC, QUESTION, p, ctx), prefill_query_aware(runner, DOC, QUESTION, p, ctx)
    assert _same(a.cache, b.cache) and torch.equal(a.logits, b.logits)


def test_window_is_the_question(runner):
    """The document's scores are the attention of the question's queries in one prefill of both."""
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q))
    for st in out.states:
        qa = window_scores(document_state(st, D), Q)  # [Hq, D]
        joint = window_scores(st, Q)[:, :D]  # the question as the last Q rows of one segment
        assert torch.allclose(qa, joint, atol=1e-6)


def test_the_question_changes_what_is_kept(runner, ctx):
    p = get_policy("snapkv", kept=0.25)
    a = prefill_query_aware(runner, DOC, QUESTION, p, ctx)
    b = prefill_query_aware(runner, DOC, _ids(Q, 9), p, ctx)
    assert not torch.equal(a.document.layers[-1].positions, b.document.layers[-1].positions)


def test_column_sums_are_means_over_every_query(runner):
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q, column_sums=True))
    st = document_state(out.states[0], D)
    seen_by = torch.arange(D, 0, -1, dtype=torch.float32)  # what EMS divides by
    mean = out.states[0].column_sums[:, :D] / torch.arange(D + Q, Q, -1, dtype=torch.float32)
    assert torch.allclose(st.column_sums / seen_by, mean, rtol=1e-5)


def test_decode_over_the_result(runner, ctx):
    res = prefill_query_aware(runner, DOC, QUESTION, get_policy("ems", kept=0.25), ctx)
    toks = list(runner.generate(res.cache, res.logits))
    assert len(toks) >= 1 and res.cache.seq_len == D + Q + len(toks) - 1


def test_bad_requests_raise_clear_errors(runner, ctx):
    with pytest.raises(InvalidInput, match="no query-aware form.*snapkv"):
        prefill_query_aware(runner, DOC, QUESTION, get_policy("kvzip", kept=0.25), ctx)
    with pytest.raises(InvalidInput, match="non-empty question"):
        prefill_query_aware(runner, DOC, [], get_policy("snapkv", kept=0.25), ctx)


@pytest.mark.parametrize("name,settings", [s for s in SPECS if s[0] != "razor"])
def test_the_documents_last_rows_compete(name, settings, runner, ctx):
    """The window is the question, kept exactly: the document's own last rows are not forced (the
    reuse regime forces them as its window), so at kept 0.1 some head drops some of them."""
    res = prefill_query_aware(runner, DOC, QUESTION, get_policy(name, kept=0.1 if name != "pod" else 0.12, **settings), ctx)
    tail = torch.arange(D - 32, D)
    dropped = 0
    for layer in res.document.layers:
        for h in range(layer.num_heads):
            a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
            dropped += int((~torch.isin(tail, layer.positions[a:b])).sum())
    assert dropped > 0


@pytest.mark.parametrize("settings", [{}, {"kernel": 0}])
def test_ems_merged_rows_consistent(settings, runner, ctx):
    """Every document token is kept, merged into exactly one row (whose recall handle holds its
    original key and value), or evicted; the question's rows are never merged."""
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q, column_sums=True))
    from headwise.models.query_aware import compress_prefilled, document_reconstruction

    rec = document_reconstruction(runner, out, DOC, Capture(reconstruction=True))
    res = compress_prefilled(out, D, get_policy("ems", kept=0.25, **settings), ctx, rec)
    merged_any = False
    for layer, st in zip(res.document.layers, out.states, strict=True):
        for h in range(layer.num_heads):
            a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
            seen = []
            for r in range(a, b):
                rid, pos = int(layer.recall_ids[r]), int(layer.positions[r])
                if rid < 0:
                    seen.append(pos)
                    continue
                merged_any = True
                assert pos == -1 and int(layer.recall.heads[rid]) == h
                where, keys, values = layer.recall.group(rid)
                assert torch.equal(keys, st.keys[h, where]) and torch.equal(values, st.values[h, where])
                seen += where.tolist()
            assert len(seen) == len(set(seen)) and set(seen) <= set(range(D)) and len(seen) < D
    assert merged_any


def test_regime_defaults_of_ahakv_and_ems(runner, ctx):
    """Unset, AhaKV's pooling and EMS's kernel take the regime's default: the paper's (none, 0) in
    the reuse regime, avg / 7 with the question as the window; the segment key is unchanged."""
    assert "pooling" not in get_policy("ahakv", kept=0.25).params() and "kernel" not in get_policy("ems", kept=0.25).params()
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q, column_sums=True))
    from headwise.models.query_aware import compress_prefilled, document_reconstruction

    rec = document_reconstruction(runner, out, DOC, Capture(reconstruction=True))
    for name, unset, qa, reuse in (("ahakv", {}, {"pooling": "avg"}, {"pooling": "none"}),
                                   ("ems", {}, {"kernel": 7}, {"kernel": 0})):
        got = compress_prefilled(out, D, get_policy(name, kept=0.25, **unset), ctx, rec).document
        assert _same(got, compress_prefilled(out, D, get_policy(name, kept=0.25, **qa), ctx, rec).document)
        assert not _same(got, compress_prefilled(out, D, get_policy(name, kept=0.25, **reuse), ctx, rec).document)
        plain = runner.prefill(DOC, capture=get_policy(name, kept=0.25).capture)
        a = get_policy(name, kept=0.25).compress(plain.states, 0, ctx)
        assert _same(a, get_policy(name, kept=0.25, **reuse).compress(plain.states, 0, ctx))


def test_the_reconstruction_is_the_documents_own(runner):
    """window+kvzip reads KVzip's scores of the document alone: the document's rows of the joint
    prefill re-read after the repeat request, exactly the document-only prefill's scores."""
    from headwise.models.query_aware import document_reconstruction

    cap = get_policy("snapkv", kept=0.25, signal="window+kvzip").capture
    assert cap.reconstruction and cap.window == 32
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q))
    got = document_reconstruction(runner, out, DOC, cap)
    alone = runner.prefill(DOC, capture=Capture(reconstruction=True))
    for a, b in zip(got, alone.states, strict=True):
        assert a.shape == (b.num_kv_heads, D) and torch.allclose(a, b.reconstruction, rtol=1e-4, atol=1e-6)


def test_a_policy_reading_the_reconstruction_needs_it(runner, ctx):
    from headwise.models.query_aware import compress_prefilled

    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q))
    with pytest.raises(InvalidInput, match="reconstruction"):
        compress_prefilled(out, D, get_policy("snapkv", kept=0.25, signal="window+kvzip"), ctx)
    assert supports_query_aware(get_policy("taskkv", kept=0.25, signal="window+kvzip"))
    assert not supports_query_aware(get_policy("taskkv", kept=0.25, signal="kvzip"))  # no window at all


def test_window_plus_kvzip_keeps_what_either_needs():
    """A row only the question attends to and a row only the reconstruction scores both survive the
    mixed signal; each signal alone drops the other's row."""
    from headwise.policies.base import CompressContext, LayerState

    g = torch.Generator().manual_seed(0)
    N, d = 600, 16
    keys = torch.randn(1, N, d, generator=g) * 0.1
    keys[0, 300] = torch.ones(d) * 3  # the question's queries point here
    rec = torch.rand(1, N, generator=g) * 0.01
    rec[0, 100] = 1.0  # the reconstruction needs this one
    st = LayerState(0, keys, torch.randn(1, N, d, generator=g) + 2, torch.arange(N), 0.25,
                    window_queries=torch.ones(2, 24, d), window_keys=torch.randn(1, 24, d, generator=g) * 0.1,
                    reconstruction=rec)
    kept = {}
    for signal in ("window", "kvzip", "window+kvzip"):
        out = get_policy("snapkv", kept=0.02, signal=signal, kernel=0).compress_layer(st, CompressContext(1))
        kept[signal] = set(out.positions.tolist())
    assert {100, 300} <= kept["window+kvzip"]
    assert 100 not in kept["window"] and 300 not in kept["kvzip"]


# the query-aware regime's signal of each method left unset (docs/policies.md "The query-aware regime")
QA_SIGNALS = {n: "window+kvzip" for n in ("snapkv", "taskkv", "ahakv", "adakv", "ems", "pod")}


def test_regime_defaults_of_the_signal_lam_and_alpha(runner, ctx):
    """Unset, the signal, EMS's lam and AdaKV's alpha take the query-aware regime's defaults with the
    question as the window (query_aware_form, lam_for, alpha_for), and the papers' in the reuse regime,
    whose segment keys keep lam 0.5 and alpha 0.2 and which runs no reconstruction pass for them."""
    from headwise.models.query_aware import compress_prefilled, document_reconstruction
    from headwise.policies.adakv import AdaKVPolicy
    from headwise.policies.ems import EMSPolicy

    for name, signal in QA_SIGNALS.items():
        pol = get_policy(name, kept=0.25)
        form = pol.query_aware_form()
        assert ((form.scorer if name == "adakv" else form).signal or "window") == signal, name
        assert not pol.capture.reconstruction and pol.params() == get_policy(name, kept=0.25).params()
        assert form.capture.reconstruction == (signal == "window+kvzip")
    assert get_policy("ems", kept=0.25).params()["lam"] == 0.5 and get_policy("adakv", kept=0.25).params()["alpha"] == 0.2
    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q, column_sums=True))
    rec = document_reconstruction(runner, out, DOC, Capture(reconstruction=True))
    plain = runner.prefill(DOC, capture=Capture(window=32, column_sums=True))
    for name, field, qa, reuse in (("ems", "lam", EMSPolicy.query_aware_lam, 0.5),
                                   ("adakv", "alpha", AdaKVPolicy.query_aware_alpha, 0.2)):
        unset = get_policy(name, kept=0.25)
        got = compress_prefilled(out, D, unset, ctx, rec).document
        assert _same(got, compress_prefilled(out, D, get_policy(name, kept=0.25, **{field: qa}), ctx, rec).document)
        other = 0.9 if qa != 0.9 else 0.1
        assert not _same(got, compress_prefilled(out, D, get_policy(name, kept=0.25, **{field: other}), ctx, rec).document)
        a = unset.compress(plain.states, 0, ctx)
        assert _same(a, get_policy(name, kept=0.25, **{field: reuse}).compress(plain.states, 0, ctx))


def test_regime_defaults_of_scope_and_weight(runner, ctx):
    """Unset, scope and weight take the query-aware regime's defaults (model, 0.8: the model's rows
    ranked at once, leaning on the reconstruction) for the five methods; the reuse regime keeps the
    papers' per-head split and its segment keys; pod's query-aware form also gates its score sharing
    (share 0.85, protect none) and its reuse form is the profile's blocks, uniform split."""
    from headwise.models.query_aware import compress_prefilled, document_reconstruction

    out = runner.prefill(DOC + QUESTION, capture=Capture(window=Q, column_sums=True))
    rec = document_reconstruction(runner, out, DOC, Capture(reconstruction=True))
    plain = runner.prefill(DOC, capture=Capture(window=32, column_sums=True))
    for name in ("snapkv", "ahakv", "taskkv", "ems", "adakv"):
        unset = get_policy(name, kept=0.25)
        form = unset.query_aware_form()
        assert form.scope == "model" and (form.scorer if name == "adakv" else form).weight == 0.8, name
        assert "scope" not in unset.params() and "weight" not in unset.params()
        got = compress_prefilled(out, D, unset, ctx, rec).document
        explicit = get_policy(name, kept=0.25, scope="model", weight=0.8, signal="window+kvzip")
        assert _same(got, compress_prefilled(out, D, explicit, ctx, rec).document), name
        head = "layer" if name == "adakv" else "head"
        per_head = get_policy(name, kept=0.25, scope=head, weight=0.8, signal="window+kvzip")
        assert not _same(got, compress_prefilled(out, D, per_head, ctx, rec).document), name
        assert _same(unset.compress(plain.states, 0, ctx), get_policy(name, kept=0.25, scope=head).compress(plain.states, 0, ctx))
    unset = get_policy("pod", kept=0.25)
    form = unset.query_aware_form()
    assert (form.scope, form.weight, form.share, form.protect, form.signal) == ("model", 0.8, 0.85, "none", "window+kvzip")
    assert not {"scope", "weight", "share", "protect", "signal"} & set(unset.params())
    got = compress_prefilled(out, D, unset, ctx, rec).document
    explicit = get_policy("pod", kept=0.25, scope="model", weight=0.8, share=0.85, protect="none", signal="window+kvzip")
    assert _same(got, compress_prefilled(out, D, explicit, ctx, rec).document)
    assert abs(got.kept_fraction() - 0.25) <= 0.01
    assert _same(unset.compress(plain.states, 0, ctx), get_policy("pod", kept=0.25, share=None).compress(plain.states, 0, ctx))
    explicit = get_policy("pod", kept=0.25, share=0.0, protect="none").query_aware_form()
    assert explicit.share == 0.0 and explicit.protect == "none"
