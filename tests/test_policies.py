"""Every head-wise policy, one matrix: full-budget identity, realised fraction, raggedness,
determinism, decoding over the result, and bad parameters."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.policies import get_policy, policy_names
from headwise.policies.base import CompressContext, keep_all

# every registered policy (a new policy file is tested without editing this list), plus the
# setting combinations docs/policies.md names
SETTINGS = ["razor:fill=recent", "razor:fill=kvzip", "razor:fill=snapkv", "razor:compensation=none", "pod:evict=kvzip",
            "pod:block_score=max", "adakv:scorer=ahakv", "ems:log_weight=mass",
            # the papers' ideas on KVzip's signal (docs/policies.md)
            "kvzip:heads=retrieval", "kvzip:heads=heterogeneous", "kvzip:prior=value", "kvzip:merge=ems",
            "kvzip:merge=ems:log_weight=mass", "kvzip:heads=retrieval:prior=value:merge=ems", "kvzap:merge=ems:prior=value",
            "kvzap:heads=retrieval", "ems:signal=kvzip", "taskkv:signal=kvzip", "ahakv:signal=kvzip", "snapkv:signal=kvzap",
            "adakv:signal=kvzip", "ahakv:pooling=avg", "ahakv:pooling=none", "ems:kernel=7", "ems:kernel=0",
            # the question's window beside KVzip's reconstruction (in the reuse regime: the last tokens' window)
            "snapkv:signal=window+kvzip", "taskkv:signal=window+kvzip", "ahakv:signal=window+kvzip",
            "adakv:signal=window+kvzip", "ems:signal=window+kvzip:lam=0", "ems:lam=0", "pod:signal=window+kvzip",
            "pod:protect=retrieval", "pod:protect=retrieval:signal=window+kvzip", "adakv:scope=model",
            "adakv:scope=model:signal=window+kvzip",
            # scope=model: every row of the model ranked at once, the mix over model-wide means; weight: the
            # reconstruction's share of the window+kvzip mix
            "snapkv:scope=model", "snapkv:scope=model:signal=window+kvzip:weight=0.8", "snapkv:weight=0.8:signal=window+kvzip",
            "ahakv:scope=model:signal=window+kvzip", "ahakv:scope=model:signal=window+kvzip:weight=0.8",
            "taskkv:scope=model:signal=window+kvzip", "taskkv:scope=model:signal=window+kvzip:whole=0",
            "taskkv:scope=model:signal=window+kvzip:weight=0.8", "ems:scope=model:signal=window+kvzip:lam=0",
            "ems:scope=model:signal=window+kvzip:lam=0:weight=0.8", "ems:scope=model",
            "adakv:scope=model:signal=window+kvzip:weight=0.8", "pod:scope=model", "pod:scope=model:signal=window+kvzip:weight=0.8",
            "pod:weight=0.8:signal=window+kvzip", "pod:protect=all", "pod:protect=kv0", "pod:protect=layer", "pod:protect=head", "razor:scope=model",
            "pod:share=0.7", "pod:protect=none:share=0.7", "pod:protect=none:share=0.6",
            "razor:scope=model:compensation=none"]
POLICIES = [n for n in policy_names() if n != "full"] + SETTINGS
S = 600  # >= 512: the realised fraction must be within 1% of the request


def build(spec: str, **kw):
    """`name` or `name:setting=value` at the given settings."""
    name, *settings = spec.split(":")
    params = dict(item.split("=", 1) for item in settings)
    return get_policy(name, **kw, **{k: _value(v) for k, v in params.items()})


def _value(v: str):
    """A setting's value: an int, a float ("0.8") or the string."""
    if v.isdigit():
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v


@pytest.fixture(scope="module")
def gqa_runner(tmp_path_factory):
    """3 layers, 6 query heads over 3 KV heads: GQA like the default model, seconds on CPU.
    Named by its weights' hash, with a kvzap scorer trained on it in a private profile directory."""
    from headwise.models import ModelRunner
    from headwise.profiles import weights_key
    from headwise.profiles.scorer import forget_loaded, scorer_for
    from tests.fixtures.models import tiny_llama

    mp = pytest.MonkeyPatch()
    mp.setenv("HEADWISE_PROFILE_DIR", str(tmp_path_factory.mktemp("profiles")))
    forget_loaded()
    model = tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96, seed=1)
    runner = ModelRunner(model, None, name=weights_key(ModelRunner(model, None, name="")))
    g = torch.Generator().manual_seed(5)
    scorer_for(runner, train=True, docs=[torch.randint(3, 250, (n,), generator=g).tolist() for n in (120, 150, 100)],
               heldout=1)
    yield runner
    forget_loaded()
    mp.undo()


@pytest.fixture(scope="module")
def gqa_profile(gqa_runner):
    from headwise.profiles import compute_profile

    return compute_profile(gqa_runner, segment=64)


@pytest.fixture(scope="module")
def ctx(gqa_runner, gqa_profile):
    return CompressContext(num_layers=gqa_runner.num_layers, model_id=gqa_runner.name, profile=gqa_profile)


@pytest.fixture(scope="module")
def prefilled(gqa_runner):
    """One prefill capturing everything any policy asks for, shared by the matrix."""
    from headwise.policies.base import Capture

    ids = torch.randint(3, 250, (S,), generator=torch.Generator().manual_seed(7)).tolist()
    return gqa_runner.prefill(ids, capture=Capture(window=64, column_sums=True, reconstruction=True, hidden=True))


def _same(a, b) -> bool:
    return all(
        torch.equal(getattr(x, f), getattr(y, f))
        for x, y in zip(a.layers, b.layers, strict=True)
        for f in ("keys", "values", "head_offsets", "positions", "log_weights", "recall_ids")
    )


@pytest.mark.parametrize("name", POLICIES)
def test_full_budget_equals_full(name, prefilled, ctx):
    full = get_policy("full").compress(prefilled.states, prefilled.start, ctx)
    out = build(name, kept=1.0).compress(prefilled.states, prefilled.start, ctx)
    assert _same(out, full)


@pytest.mark.parametrize("kept", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("name", POLICIES)
def test_realised_fraction_and_raggedness(name, kept, prefilled, ctx):
    out = build(name, kept=kept).compress(prefilled.states, prefilled.start, ctx)
    assert abs(out.kept_fraction() - kept) <= 0.01
    for layer in out.layers:
        rows = int(layer.head_offsets[-1])
        # rows are really gone: storage holds exactly the kept rows, nothing masked (PoD's distant
        # rows hold a value and no key)
        keyless = 0 if layer.distant is None else int(layer.distant.sum())
        assert layer.keys.shape[0] + keyless == layer.values.shape[0] == layer.positions.numel() == rows
        assert layer.log_weights.numel() == layer.recall_ids.numel() == rows
        assert int(layer.head_lengths().sum()) == rows < layer.num_heads * S
    assert out.nbytes < out.full_nbytes()


@pytest.mark.parametrize("name", POLICIES)
def test_merged_rows_consistent(name, prefilled, ctx):
    """Every original token is kept, merged into exactly one row (with a recall handle to its
    original key and value), or evicted; a synthetic row always has a handle."""
    out = build(name, kept=0.25).compress(prefilled.states, prefilled.start, ctx)
    for layer, st in zip(out.layers, prefilled.states, strict=True):
        for h in range(layer.num_heads):
            a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
            seen = []
            for r in range(a, b):
                rid, pos = int(layer.recall_ids[r]), int(layer.positions[r])
                if rid < 0:
                    assert pos >= 0
                    seen.append(pos)
                    continue
                assert pos == -1 and int(layer.recall.heads[rid]) == h
                where, keys, values = layer.recall.group(rid)
                idx = where - prefilled.start
                assert torch.equal(keys, st.keys[h, idx]) and torch.equal(values, st.values[h, idx])
                seen += where.tolist()
            assert len(seen) == len(set(seen)) and set(seen) <= set(range(prefilled.start, prefilled.start + S))


@pytest.mark.parametrize("name", POLICIES)
def test_deterministic(name, prefilled, ctx):
    p = build(name, kept=0.25)
    assert _same(p.compress(prefilled.states, 0, ctx), p.compress(prefilled.states, 0, ctx))


@pytest.mark.parametrize("name", POLICIES)
def test_query_agnostic_by_default(name):
    assert build(name, kept=0.5).reusable is True


@pytest.mark.parametrize("name", POLICIES)
def test_generation_over_compressed_cache(name, gqa_runner, ctx):
    ids = torch.randint(3, 250, (520,), generator=torch.Generator().manual_seed(3)).tolist()
    seg = gqa_runner.prefill_segment(ids, policy=build(name, kept=0.25), ctx=ctx)
    q = gqa_runner.prefill_segment([5, 6, 7], seg.cache)
    assert torch.isfinite(q.logits).all()
    toks = list(gqa_runner.generate(q.cache, q.logits))
    assert len(toks) >= 1 and q.cache.seq_len == 523 + len(toks) - 1


def test_scorers_keep_the_token_the_window_attends_to():
    """A key that every window query points at must survive; a random key mostly does not."""
    from headwise.policies.base import LayerState

    g = torch.Generator().manual_seed(0)
    N, d = 600, 16
    keys = torch.randn(1, N, d, generator=g) * 0.1
    target = 300
    keys[0, target] = torch.ones(d) * 3
    q = torch.ones(2, 32, d)  # 2 query heads over 1 KV head
    st = LayerState(0, keys, torch.randn(1, N, d, generator=g) + 2, torch.arange(N), 0.25, window_queries=q)
    for name in ("snapkv", "ahakv", "adakv", "taskkv"):
        out = get_policy(name, kept=0.1).compress_layer(st, CompressContext(1))
        assert target in out.positions.tolist(), name


def test_bad_parameters_raise_clear_errors(prefilled, ctx):
    with pytest.raises(InvalidInput, match="window"):
        get_policy("snapkv", kept=0.5, window=-1)
    with pytest.raises(InvalidInput, match="kept"):
        get_policy("ems", kept=0.0)
    with pytest.raises(InvalidInput, match="sinks"):  # 0.05 * 600 = 30 rows < 4 sinks + 32 window
        get_policy("snapkv", kept=0.05).compress(prefilled.states, 0, ctx)
    with pytest.raises(InvalidInput, match="sinks \\+ recent"):
        get_policy("taskkv", kept=0.05).compress(prefilled.states, 0, ctx)
    with pytest.raises(InvalidInput, match="scorer"):
        get_policy("adakv", scorer="nope")
    with pytest.raises(InvalidInput, match="log_weight"):
        get_policy("ems", log_weight="sometimes")
    with pytest.raises(InvalidInput, match="compensation"):
        get_policy("razor", compensation="sometimes")
    with pytest.raises(InvalidInput, match="induction"):
        get_policy("razor", induction=1.5)
    with pytest.raises(InvalidInput, match="head profile"):
        get_policy("razor", kept=0.5).compress(prefilled.states, 0, CompressContext(3))


def test_full_keep_all_matches_state(prefilled):
    st = prefilled.states[0]
    layer = keep_all(st)
    assert torch.equal(layer.head(1)[0], st.keys[1])
