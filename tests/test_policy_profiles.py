"""Head profiles: echo/induction scores, PoD blocks, the on-disk cache keyed by weights."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.profiles import (
    HeadProfile,
    echo_induction,
    load_profile,
    pod_blocks,
    profile_for,
    profile_path,
    weights_key,
)


def test_echo_head_scores_echo_not_induction():
    """Queries equal to their own token's key: attention goes to earlier copies of the same token."""
    seg, reps, d = 8, 3, 16
    tok = list(range(seg)) * reps
    k = torch.zeros(1, 1 + seg * reps, d)
    for i, t in enumerate(tok):
        k[0, 1 + i, t] = 10.0
    echo, ind = echo_induction(k.clone(), k, 1.0, seg, reps)
    assert float(echo[0]) > 0.5 and float(ind[0]) < 0.05
    # shift the queries by one token: now they look for the *next* token of earlier copies
    q = torch.zeros_like(k)
    for i, t in enumerate(tok):
        q[0, 1 + i, (t + 1) % seg] = 10.0
    echo2, ind2 = echo_induction(q, k, 1.0, seg, reps)
    assert float(ind2[0]) > 0.5 and float(echo2[0]) < 0.05


def test_pod_blocks_group_similar_layers():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 1, 4, 50, generator=g) * 3, -1)
    b = torch.softmax(torch.randn(2, 1, 4, 50, generator=g) * 3, -1)
    sharp = torch.zeros(2, 1, 4, 50); sharp[..., 0] = 1.0
    assert pod_blocks([a, a, a], 0.5) == [[0, 0], [0, 0], [0, 0]]
    assert pod_blocks([a, sharp, sharp, a], 0.5) == [[0, 0], [1, 1], [1, 1], [3, 3]]
    assert pod_blocks([a, b], 0.0) == [[0, 0], [0, 0]]


def test_profile_computed_once_then_loaded(tiny_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADWISE_PROFILE_DIR", str(tmp_path))
    tiny_runner.__dict__.pop("_head_profile", None)
    calls = []
    prof = profile_for(tiny_runner, progress=lambda s, f: calls.append(f))
    assert calls and calls[-1] == 1.0
    path = profile_path(weights_key(tiny_runner))
    assert path.is_file() and path.parent == tmp_path
    assert load_profile(path) == prof
    tiny_runner.__dict__.pop("_head_profile")
    import headwise.profiles as hp

    monkeypatch.setattr(hp, "compute_profile", lambda *a, **k: pytest.fail("recomputed a cached profile"))
    assert profile_for(tiny_runner) == prof
    assert len(prof.echo) == tiny_runner.num_layers and len(prof.echo[0]) == tiny_runner.num_kv_heads
    tiny_runner.__dict__.pop("_head_profile")


def test_key_follows_the_weights(tiny_runner):
    from headwise.models import ModelRunner
    from tests.fixtures.models import tiny_llama

    other = ModelRunner(tiny_llama(seed=5), None, name="tiny-llama")
    assert weights_key(other) != weights_key(tiny_runner)
    assert weights_key(ModelRunner(tiny_llama(), None, name="tiny-llama")) == weights_key(tiny_runner)


def test_unknown_profile_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidInput, match="headwise profile"):
        load_profile(tmp_path / "missing.json")
    bad = tmp_path / "old.json"
    bad.write_text('{"version": 0}')
    with pytest.raises(InvalidInput, match="version"):
        load_profile(bad)


def test_retrieval_order_is_echo_then_induction():
    p = HeadProfile("x", 2, 5, echo=[[0, 0, 0, 0, 9], [0] * 5], induction=[[5, 4, 0, 0, 0], [0, 0, 0, 3, 0]], base_of=[[0] * 5] * 2)
    assert p.retrieval_order(induction=0.3, echo=0.1) == [(0, 4), (0, 0), (0, 1), (1, 3)]
