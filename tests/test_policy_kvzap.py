"""kvzap: a scorer distilled from KVzip's scores, its storage, and the policy over it."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.policies import get_policy
from headwise.policies.base import Capture, CompressContext, LayerState
from headwise.profiles.scorer import (
    CUTOFFS,
    FEATURES,
    READABLE_VERSIONS,
    SCORER_VERSION,
    KVScorer,
    _solve,
    doc_cutoffs,
    features,
    fit_cutoffs,
    fit_hidden,
    fit_on_prediction,
    forget_loaded,
    load_scorer,
    packaged_path,
    scorer_for,
    scorer_path,
    spearman,
    topk_overlap,
    train_scorer,
)

S = 600  # >= 512: the realised fraction must be within 1% of the request


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("profiles")
    mp.setenv("HEADWISE_PROFILE_DIR", str(d))
    forget_loaded()
    yield d
    forget_loaded()
    mp.undo()


@pytest.fixture(scope="module")
def runner(profile_dir):
    """A tiny GQA model whose runner name is its weights' hash, as for an installed model."""
    from headwise.models import ModelRunner
    from headwise.profiles import weights_key
    from tests.fixtures.models import tiny_llama

    model = tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96, seed=1)
    return ModelRunner(model, None, name=weights_key(ModelRunner(model, None, name="")))


@pytest.fixture(scope="module")
def trained(runner):
    """A scorer trained on the tiny model's KVzip scores of random documents (seconds), stored on disk."""
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (120, 150, 100)]
    return scorer_for(runner, train=True, docs=docs, heldout=1)


@pytest.fixture(scope="module")
def prefilled(runner):
    ids = torch.randint(3, 250, (S,), generator=torch.Generator().manual_seed(7)).tolist()
    return runner.prefill(ids, capture=Capture(hidden=True, reconstruction=True))


@pytest.fixture
def ctx(runner, trained):
    return runner.context(get_policy("kvzap"))


def test_trained_scorer_is_stored_by_the_weights_hash_and_round_trips(runner, trained, tmp_path):
    path = scorer_path(runner.name)
    assert path.is_file() and trained.model_id == runner.name
    # hidden 96, place 4, key and value norms and their logs for 3 KV heads, bias
    assert trained.weight.shape == (3, 96 + 4 + 6 + 6 + 1, 3) and torch.isfinite(trained.weight).all()
    assert trained.features == FEATURES and trained.hidden_size == 96
    assert trained.training["train_docs"] == 2 and set(trained.training["fit"]) >= {"spearman_global", "overlap_0.1"}
    back = KVScorer.load(trained.save(tmp_path / "copy.safetensors"))
    assert back.model_id == trained.model_id and back.training == trained.training and back.features == trained.features
    assert torch.equal(back.weight, trained.weight)
    st = _state(1, 10)
    assert torch.equal(back.predict(st), trained.predict(st)) and back.predict(st).shape == (3, 10)


def _state(layer: int, S: int, seed: int = 0) -> LayerState:
    g = torch.Generator().manual_seed(seed)
    return LayerState(layer, torch.randn(3, S, 16, generator=g), torch.randn(3, S, 16, generator=g), torch.arange(S), 0.25,
                      hidden=torch.randn(S, 96, generator=g))


def test_features_are_the_hidden_state_place_and_row_norms():
    st = _state(0, 12)
    f = features(st, FEATURES)
    assert f.shape == (12, 96 + 4 + 6 + 6)
    assert torch.equal(f[:, :96], st.hidden)
    assert torch.allclose(f[:, 96], torch.log1p(torch.arange(12.0)))  # place in the segment
    assert torch.allclose(f[:, 100:103], st.keys.norm(dim=-1).T) and torch.allclose(f[:, 103:106], st.keys.norm(dim=-1).T.log())
    assert torch.allclose(f[:, 106:109], st.values.norm(dim=-1).T)
    with pytest.raises(InvalidInput, match="feature 'attention' is not one of"):
        features(st, ("attention",))


def test_an_older_format_is_rejected_with_what_to_run(runner, trained, tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "old.safetensors"
    save_file({"weight": trained.weight[:, : 96 + 1].contiguous()}, str(old), metadata={"model_id": runner.name, "version": "1"})
    with pytest.raises(InvalidInput, match=r"format version .1.; this headwise reads versions 2, 3.*headwise scorer train --force"):
        KVScorer.load(old)


def _hidden_scorer(model_id: str, units: int = 5, seed: int = 3) -> KVScorer:
    g = torch.Generator().manual_seed(seed)
    F1 = 96 + 4 + 6 + 6 + 1
    return KVScorer(model_id, torch.randn(3, F1, 3, generator=g), {"hidden_units": units}, FEATURES,
                    hidden_in=torch.randn(3, F1, units, generator=g), hidden_out=torch.randn(3, units, 3, generator=g))


def test_a_hidden_layer_scorer_round_trips_and_adds_its_relu_units(runner, tmp_path):
    sc = _hidden_scorer(runner.name)
    path = sc.save(tmp_path / "hidden.safetensors")
    back = KVScorer.load(path)
    assert back.version == SCORER_VERSION == 3 and back.hidden_units == 5 and back.training == sc.training
    assert torch.equal(back.hidden_in, sc.hidden_in) and torch.equal(back.hidden_out, sc.hidden_out)
    st = _state(2, 11, seed=4)
    f = torch.cat([features(st, FEATURES), torch.ones(11, 1)], 1)
    want = f @ sc.weight[2] + torch.relu(f @ sc.hidden_in[2]) @ sc.hidden_out[2]
    torch.testing.assert_close(back.predict(st), want.T, rtol=1e-4, atol=1e-3)
    linear = KVScorer(runner.name, sc.weight, features=FEATURES)
    assert not torch.allclose(linear.predict(st), back.predict(st))  # the hidden layer counts


def test_a_version_2_scorer_still_loads_and_is_found(runner, trained, tmp_path, profile_dir):
    """Format 2 (the linear map alone, no hidden-layer metadata) reads as a scorer without a hidden layer."""
    from safetensors.torch import save_file

    key = "2" * 64
    v2 = scorer_path(key, 2)
    save_file({"weight": trained.weight.contiguous()}, str(v2),
              metadata={"model_id": key, "version": "2", "features": '["position", "key_norm", "value_norm"]'})
    forget_loaded()
    try:
        sc = load_scorer(key)
        assert sc.version == 2 and sc.hidden_units == 0 and torch.equal(sc.weight, trained.weight)
        st = _state(0, 9)
        assert torch.equal(sc.predict(st), trained.predict(st))
    finally:
        v2.unlink()
        forget_loaded()


def test_a_damaged_hidden_layer_is_rejected(runner, tmp_path):
    from safetensors.torch import save_file

    sc = _hidden_scorer(runner.name)
    meta = {"model_id": runner.name, "version": "3", "features": '["position", "key_norm", "value_norm"]', "hidden_units": "5"}
    lost = tmp_path / "lost.safetensors"
    save_file({"weight": sc.weight.contiguous()}, str(lost), metadata=meta)
    with pytest.raises(InvalidInput, match="declares 5 hidden units but holds no hidden layer"):
        KVScorer.load(lost)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": sc.weight.contiguous(), "hidden_in": sc.hidden_in.contiguous(),
               "hidden_out": sc.hidden_out[:, :4].contiguous()}, str(wrong), metadata=meta)
    with pytest.raises(InvalidInput, match="does not fit the linear map"):
        KVScorer.load(wrong)


def test_a_hidden_layer_scorer_of_another_model_is_rejected(runner, profile_dir):
    other = "e" * 64
    _hidden_scorer(runner.name).save(scorer_path(other))
    forget_loaded()
    try:
        with pytest.raises(InvalidInput, match=r"trained for model .* not for model eeeeeeeeeeeeeeee.*headwise scorer train"):
            load_scorer(other)
    finally:
        scorer_path(other).unlink()


def test_loaded_automatically_from_disk(runner, trained):
    forget_loaded()
    assert torch.equal(load_scorer(runner.name).weight, trained.weight)


def test_wrong_model_is_rejected(runner, trained, profile_dir):
    other = "f" * 64
    scorer_path(other).write_bytes(scorer_path(runner.name).read_bytes())  # a file copied under another model's key
    with pytest.raises(InvalidInput, match=r"trained for model .* not for model ffffffffffffffff.*headwise scorer train"):
        load_scorer(other)
    with pytest.raises(InvalidInput, match=r"3 layers x 3 KV heads x hidden 96, the model has 30 x 3 x 576"):
        trained.check_shape(30, 3, 576)


def test_missing_or_broken_scorer_says_what_to_run(tmp_path, profile_dir):
    with pytest.raises(InvalidInput, match=r"no kvzap scorer for model 0000000000000000 .*headwise scorer train"):
        load_scorer("0" * 64)
    v1 = scorer_path("1" * 64).with_name(f"kvzap-{'1' * 64}-v1.safetensors")
    v1.parent.mkdir(parents=True, exist_ok=True)
    v1.write_bytes(b"an older scorer")
    with pytest.raises(InvalidInput, match=r"found only another format version: kvzap-1+-v1.safetensors.*headwise scorer train"):
        load_scorer("1" * 64)
    v1.unlink()
    with pytest.raises(InvalidInput, match="needs the model's identity"):
        load_scorer("")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInput, match="unreadable"):
        KVScorer.load(bad)


def test_kept_one_equals_full(runner, ctx, prefilled):
    full = get_policy("full").compress(prefilled.states, 0, ctx)
    seg = get_policy("kvzap", kept=1.0).compress(prefilled.states, 0, ctx)
    for a, b in zip(full.layers, seg.layers, strict=True):
        for f in ("keys", "values", "head_offsets", "positions", "log_weights"):
            assert torch.equal(getattr(a, f), getattr(b, f))


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.1])
def test_kept_fraction_global_ragged_and_forced_rows(ctx, prefilled, kept):
    seg = get_policy("kvzap", kept=kept).compress(prefilled.states, 0, ctx)
    assert seg.kept_fraction() == pytest.approx(kept, rel=0.01)
    lens = torch.stack([layer.head_lengths() for layer in seg.layers])  # [L, H]
    assert len(set(lens.flatten().tolist())) > 1  # heads hold different numbers of rows
    for layer in seg.layers:
        for h in range(layer.num_heads):
            pos = layer.positions[int(layer.head_offsets[h]) : int(layer.head_offsets[h + 1])].tolist()
            assert pos[:4] == [0, 1, 2, 3] and pos[-8:] == list(range(S - 8, S)) and pos == sorted(pos)


def test_kept_rows_are_the_top_predicted(trained, ctx, prefilled):
    seg = get_policy("kvzap", kept=0.3, sinks=0, window=0).compress(prefilled.states, 0, ctx)
    pred = torch.stack([trained.predict(s) for s in prefilled.states])  # [L, H, S]
    threshold = pred.flatten().topk(seg.num_rows).values.min()
    for i, layer in enumerate(seg.layers):
        for h in range(layer.num_heads):
            pos = layer.positions[int(layer.head_offsets[h]) : int(layer.head_offsets[h + 1])]
            assert bool((pred[i, h, pos] >= threshold).all())
            assert int((pred[i, h] > threshold).sum()) <= len(pos)


def test_kvzip_scores_are_left_alone(ctx, prefilled):
    """The bench compresses one prefill with kvzip and kvzap: kvzap must not overwrite kvzip's scores."""
    before = [s.reconstruction.clone() for s in prefilled.states]
    get_policy("kvzap", kept=0.2).compress(prefilled.states, 0, ctx)
    assert all(torch.equal(a, s.reconstruction) for a, s in zip(before, prefilled.states, strict=True))


def test_through_the_runner_with_only_its_own_capture(runner, trained):
    ids = torch.randint(3, 250, (S,), generator=torch.Generator().manual_seed(9)).tolist()
    pol = get_policy("kvzap", kept=0.25)
    assert pol.capture == Capture(hidden=True) and pol.reusable
    res = runner.prefill_segment(ids, policy=pol)
    assert res.segment.kept_fraction() == pytest.approx(0.25, rel=0.01) and torch.isfinite(res.logits).all()
    assert res.segment.meta["policy"]["scorer_version"] >= 1


def test_missing_inputs_are_clear_errors(runner, trained, prefilled):
    with pytest.raises(InvalidInput, match="needs the model's identity"):
        get_policy("kvzap", kept=0.2).compress(prefilled.states, 0)
    with pytest.raises(InvalidInput, match="no kvzap scorer for model"):
        get_policy("kvzap", kept=0.2).compress(prefilled.states, 0, CompressContext(3, model_id="a" * 64))
    bare = runner.prefill(list(range(3, 100)))
    with pytest.raises(InvalidInput, match=r"Capture\(hidden=True\)"):
        get_policy("kvzap", kept=0.2).compress(bare.states, 0, runner.context())


def test_ridge_recovers_a_planted_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, 8, generator=g, dtype=torch.float64), torch.ones(2000, 1, dtype=torch.float64)], 1)
    w = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = x @ w + 0.01 * torch.randn(2000, 3, generator=g, dtype=torch.float64)
    got = _solve((x.T @ x)[None], (x.T @ y)[None])[0]
    torch.testing.assert_close(got, w.float(), atol=0.01, rtol=0)


def test_cutoff_fit_ranks_the_top_where_least_squares_is_pulled_by_the_floor():
    """Below the median the log scores sit at a floor whose spread follows a feature the top rows
    ignore: least squares spends weight on it, the cutoff fit keeps KVzip's top rows and the log scale."""
    g = torch.Generator().manual_seed(0)
    n = 6000
    x = torch.cat([torch.randn(n, 12, generator=g), torch.ones(n, 1)], 1)
    w = torch.randn(13, 2, generator=g)
    w[0] = 0
    z = x @ w
    y = torch.where(z > 0, z, -10 + 3 * x[:, :1]) + 0.1 * torch.randn(n, 2, generator=g)
    flat = y.flatten()
    tau = torch.tensor([float(flat.topk(round(q * flat.numel())).values[-1]) for q in CUTOFFS]).expand(n, -1)
    ridge = _solve((x.T @ x).double()[None], (x.T @ y).double()[None])[0]
    cut = fit_cutoffs(x, y, tau, ridge)
    assert topk_overlap(x @ ridge, y, 0.1) < 0.9
    assert topk_overlap(x @ cut, y, 0.1) > 0.95 and topk_overlap(x @ cut, y, 0.25) > 0.95
    top = y > tau[:, 2:3]
    assert float((x @ cut - y)[top].abs().mean()) < 1.2  # still a log score near the cutoffs


def test_hidden_layer_fit_ranks_what_a_linear_map_cannot():
    """KVzip's top rows here are where |x0| is large (quadratic in the input): the linear cutoff fit
    cannot rank them, the hidden layer beside it does, and its predictions stay log scores."""
    g = torch.Generator().manual_seed(1)
    n = 6000
    x = torch.cat([torch.randn(n, 10, generator=g), torch.ones(n, 1)], 1)
    y = torch.stack([3 * x[:, 0].abs() + 0.5 * x[:, 1], 3 * x[:, 0].abs() - 0.5 * x[:, 2]], 1) - 8
    y = y + 0.05 * torch.randn(n, 2, generator=g)
    flat = y.flatten()
    tau = torch.tensor([float(flat.topk(round(q * flat.numel())).values[-1]) for q in CUTOFFS]).expand(n, -1)
    ridge = _solve((x.T @ x).double()[None], (x.T @ y).double()[None])[0]
    linear = fit_cutoffs(x, y, tau, ridge)
    w, a, b = fit_hidden(x, y, tau, ridge, units=8, iterations=200)
    hidden = x @ w + torch.relu(x @ a) @ b
    assert topk_overlap(x @ linear, y, 0.1) < 0.5
    assert topk_overlap(hidden, y, 0.1) > 0.85 and topk_overlap(hidden, y, 0.25) > 0.85
    top = y > tau[:, 2:3]
    assert float((hidden - y)[top].abs().mean()) < 1.0  # still a log score near the cutoffs


def test_hidden_layer_on_the_linear_prediction_is_a_hidden_layer_over_the_features():
    """fit_on_prediction's units read the linear prediction and the extra features; mapped back into the
    format's matrices over every feature they predict the same, and rank a planted nonlinearity of the
    extras (a product of two norms) better than the linear map they start from."""
    g = torch.Generator().manual_seed(4)
    n, D, E = 5000, 20, 4
    x = torch.cat([torch.randn(n, D + E, generator=g), torch.ones(n, 1)], 1)
    y = torch.stack([x[:, :D].sum(1) * 0.3 + 2 * x[:, D] * x[:, D + 1], x[:, 1] - 2 * x[:, D + 2] * x[:, D + 3]], 1) - 6
    flat = y.flatten()
    tau = torch.tensor([float(flat.topk(round(q * flat.numel())).values[-1]) for q in CUTOFFS]).expand(n, -1)
    lin = fit_cutoffs(x, y, tau, _solve((x.T @ x).double()[None], (x.T @ y).double()[None])[0])
    w, a, b = fit_on_prediction(x, y, tau, lin, units=8, hidden_size=D, iterations=150)
    assert w.shape == (D + E + 1, 2) and a.shape == (D + E + 1, 8) and b.shape == (8, 2)
    pred = x @ w + torch.relu(x @ a) @ b
    assert topk_overlap(pred, y, 0.1) > topk_overlap(x @ lin, y, 0.1) + 0.1
    # the units see the hidden-state inputs only through the linear prediction: rank <= Hkv + extras + bias
    assert torch.linalg.matrix_rank(a[:D]) <= 2


def test_doc_cutoffs_are_the_global_quantiles_of_the_ranked_rows():
    g = torch.Generator().manual_seed(2)
    states = [_state(2, 50, seed=i) for i in range(3)]
    states = [LayerState(s.layer, s.keys, s.values, s.positions, 0.0, reconstruction=torch.rand(3, 50, generator=g) ** 4,
                         hidden=s.hidden) for s in states]
    tau = doc_cutoffs(states)
    ranked = torch.cat([s.reconstruction[:, 4:42].flatten() for s in states]).log()
    for q, t in zip(CUTOFFS, tau, strict=True):
        assert float((ranked >= t).float().mean()) == pytest.approx(q, abs=1 / ranked.numel() + 1e-6)
    assert list(tau) == sorted(tau)


def test_objectives_are_recorded_and_checked(runner):
    g = torch.Generator().manual_seed(9)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (120, 100, 90)]
    sc = train_scorer(runner, docs=docs, heldout=1, objective="ridge")
    assert sc.training["objective"] == "ridge" and "cutoffs" not in sc.training
    with pytest.raises(InvalidInput, match="objective 'mse' is not one of"):
        train_scorer(runner, docs=docs, heldout=1, objective="mse")
    with pytest.raises(InvalidInput, match="hidden layer .* is fitted with objective 'cutoffs'"):
        train_scorer(runner, docs=docs, heldout=1, objective="ridge", hidden_units=4)


def test_a_hidden_layer_scorer_trains_and_compresses(runner, prefilled, tmp_path):
    g = torch.Generator().manual_seed(9)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (120, 100, 90)]
    sc = train_scorer(runner, docs=docs, heldout=1, objective="cutoffs", hidden_units=4, iterations=20)
    t = sc.training
    assert sc.hidden_units == 4 and t["hidden_units"] == 4 and t["iterations"] == 20 and t["objective"] == "cutoffs"
    assert t["hidden_inputs"] == "prediction"
    assert sc.hidden_in.shape == (3, 96 + 4 + 12 + 1, 4) and bool(sc.hidden_out.abs().sum() > 0)  # the units were fitted
    assert set(t["fit"]) >= {"spearman_global", "overlap_0.1"} and t["seconds"] >= 0
    back = KVScorer.load(sc.save(tmp_path / "h.safetensors"))
    assert torch.equal(back.predict(prefilled.states[1]), sc.predict(prefilled.states[1]))
    every = train_scorer(runner, docs=docs, heldout=1, objective="cutoffs", hidden_units=3, iterations=5, hidden_inputs="features")
    assert every.hidden_units == 3 and every.training["hidden_inputs"] == "features"
    with pytest.raises(InvalidInput, match="hidden inputs 'keys' are not one of"):
        train_scorer(runner, docs=docs, heldout=1, objective="cutoffs", hidden_units=3, hidden_inputs="keys")


def test_spearman():
    a = torch.randn(500, generator=torch.Generator().manual_seed(0))
    assert spearman(a, a.exp()) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)


def test_train_needs_documents_to_fit(runner):
    with pytest.raises(InvalidInput, match="leave none to train on"):
        train_scorer(runner, docs=[[3, 4, 5] * 20], heldout=1)


@pytest.mark.slow
def test_shipped_scorer_of_the_default_model(real_runner):
    """The default model's scorer ships in the package and predicts KVzip's ranking on a bench-like document."""
    from headwise.documents import document_tokens
    from headwise.prompt import build_segments

    forget_loaded()
    assert any(packaged_path(real_runner.name, v).is_file() for v in READABLE_VERSIONS)
    scorer = load_scorer(real_runner.name).check_shape(real_runner.num_layers, real_runner.num_kv_heads, 576)
    tok = real_runner.tokenizer
    ids = build_segments(tok, document_tokens(tok, 700), "").context
    out = real_runner.prefill(ids, capture=Capture(hidden=True, reconstruction=True))
    n = out.states[0].num_tokens
    pred = torch.stack([scorer.predict(s)[:, 4 : n - 8] for s in out.states])
    true = torch.stack([s.reconstruction[:, 4 : n - 8] for s in out.states])
    assert spearman(pred.flatten(), true.flatten()) > 0.5
    seg = get_policy("kvzap", kept=0.1).compress(out.states, 0, real_runner.context())
    assert seg.kept_fraction() == pytest.approx(0.1, rel=0.01)


def test_kvzip_targets_are_cached_and_read_back(runner, tmp_path, monkeypatch):
    """A training run with a cache directory keeps KVzip's scores per document; the next reads them back, no pass runs."""
    g = torch.Generator().manual_seed(11)
    docs = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (110, 90, 100)]
    first = train_scorer(runner, docs=docs, heldout=1, cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    monkeypatch.setattr(runner, "prefill", lambda *a, **k: pytest.fail("KVzip's passes ran again"))
    again = train_scorer(runner, docs=docs, heldout=1, cache=tmp_path)
    st = _state(2, 50, seed=3)
    assert spearman(first.predict(st).flatten(), again.predict(st).flatten()) > 0.99  # keys/values are kept in fp16
    assert again.training["fit"]["spearman_global"] == pytest.approx(first.training["fit"]["spearman_global"], abs=0.02)
