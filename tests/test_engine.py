"""ModelRunner over a CompactCache: equality with transformers, segments, generation, bad input."""

from __future__ import annotations

import pytest
import torch

from headwise.errors import InvalidInput
from headwise.models import ModelRunner, SamplingParams
from headwise.policies import get_policy


def _ids(n: int, vocab: int = 256, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


def test_full_prefill_matches_transformers(tiny_model, tiny_runner):
    ids = _ids(200)
    res = tiny_runner.prefill_segment(ids)
    assert torch.allclose(res.logits, _hf_logits(tiny_model, ids), atol=1e-4)
    assert res.cache.seq_len == 200 and res.cache.kept_fraction() == 1.0


@pytest.mark.parametrize("cuts", [(50,), (1, 120), (70, 71, 150)])
def test_segments_on_top_of_cache_equal_one_prefill(tiny_model, tiny_runner, cuts):
    ids = _ids(200, seed=2)
    bounds = [0, *cuts, len(ids)]
    cache = None
    for a, b in zip(bounds, bounds[1:], strict=False):
        res = tiny_runner.prefill_segment(ids[a:b], cache)
        cache = res.cache
    assert cache.seq_len == len(ids)
    assert torch.allclose(res.logits, _hf_logits(tiny_model, ids), atol=1e-4)
    one = tiny_runner.prefill_segment(ids).cache
    for la, lb in zip(cache.layers, one.layers, strict=False):
        assert torch.allclose(la.keys, lb.keys, atol=1e-5) and torch.equal(la.positions, lb.positions)


def test_decode_steps_match_transformers_across_tail_growth(tiny_model, tiny_runner):
    ids = _ids(40, seed=3)
    res = tiny_runner.prefill_segment(ids)
    seq, cache = list(ids), res.cache
    for t in _ids(140, seed=4):  # the tail grows past its first capacity (64)
        seq.append(t)
        logits = tiny_runner.decode_step(t, cache)
    assert cache.layers[0].tail_len == 140
    assert torch.allclose(logits, _hf_logits(tiny_model, seq), atol=1e-4)
    assert cache.compacted().layers[0].tail_len == 0


def test_greedy_generation_equals_model_generate(tiny_model, tiny_runner):
    ids = _ids(64, seed=5)
    res = tiny_runner.prefill_segment(ids)
    mine = list(tiny_runner.generate(res.cache, res.logits, SamplingParams(max_new_tokens=32, ignore_eos=True)))
    x = torch.tensor([ids])
    ref = tiny_model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    assert mine == ref[0, 64:].tolist()


def test_sampling_is_seeded(tiny_runner):
    ids = _ids(30, seed=6)
    p = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    runs = []
    for _ in range(2):
        res = tiny_runner.prefill_segment(ids)
        runs.append(list(tiny_runner.generate(res.cache, res.logits, p)))
    assert runs[0] == runs[1] and len(runs[0]) == 16
    res = tiny_runner.prefill_segment(ids)
    other = list(tiny_runner.generate(res.cache, res.logits, SamplingParams(16, 1.0, 0.9, seed=8, ignore_eos=True)))
    assert other != runs[0]


def test_generation_stops_at_eos(tiny_runner):
    res = tiny_runner.prefill_segment(_ids(20, seed=9))
    logits = torch.full_like(res.logits, -1e9)
    logits[2] = 0.0  # EOS id of the tiny model
    assert list(tiny_runner.generate(res.cache, logits, SamplingParams(max_new_tokens=8))) == [2]


def test_streaming_at_full_budget_equals_full(tiny_runner):
    ids = _ids(300, seed=10)
    full = tiny_runner.prefill_segment(ids[:250])
    stream = tiny_runner.prefill_segment(ids[:250], policy=get_policy("streaming", kept=1.0))
    for a, b in zip(full.segment.layers, stream.segment.layers, strict=False):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) and torch.equal(a.head_offsets, b.head_offsets)
    f2 = tiny_runner.prefill_segment(ids[250:], full.cache)
    s2 = tiny_runner.prefill_segment(ids[250:], stream.cache)
    assert torch.equal(f2.logits, s2.logits)


def test_streaming_quarter_keeps_exact_rows_and_bytes(tiny_runner):
    ids = _ids(512, seed=11)
    full = tiny_runner.prefill_segment(ids).segment
    seg = tiny_runner.prefill_segment(ids, policy=get_policy("streaming", kept=0.25)).segment
    for layer in seg.layers:
        assert layer.head_lengths().tolist() == [128] * layer.num_heads
        pos = layer.positions[:128].tolist()
        assert pos[:4] == [0, 1, 2, 3] and pos[4:] == list(range(512 - 124, 512))
    assert seg.kept_fraction() == pytest.approx(0.25)
    assert seg.nbytes == pytest.approx(full.nbytes * seg.kept_fraction())
    assert seg.nbytes == seg.num_rows * 16 * 4 * 2  # rows x head_dim x fp32 x (K, V)


def test_decode_over_compressed_cache_runs_and_positions_continue(tiny_runner):
    ids = _ids(256, seed=12)
    seg = tiny_runner.prefill_segment(ids, policy=get_policy("streaming", kept=0.25))
    toks = list(tiny_runner.generate(seg.cache, seg.logits, SamplingParams(max_new_tokens=5, ignore_eos=True)))
    assert len(toks) == 5
    assert seg.cache.seq_len == 256 + 4  # RoPE positions continue from the original length
    assert seg.cache.layers[0].tail_positions[:4].tolist() == [256, 257, 258, 259]


# ---- bad input ------------------------------------------------------------------------
def test_empty_prompt(tiny_runner):
    with pytest.raises(InvalidInput, match="empty"):
        tiny_runner.prefill([])


@pytest.mark.parametrize("bad", [256, 10_000, -1])
def test_token_out_of_vocab(tiny_runner, bad):
    with pytest.raises(InvalidInput, match=r"out of the vocabulary; allowed range \[0, 255\]"):
        tiny_runner.prefill([5, bad])


def test_prompt_over_context(tiny_runner):
    with pytest.raises(InvalidInput, match="exceeds the model's context of 1024"):
        tiny_runner.prefill([5] * 1025)
    res = tiny_runner.prefill_segment([5] * 1000)
    with pytest.raises(InvalidInput, match="1030 tokens exceeds"):
        tiny_runner.prefill([5] * 30, res.cache)


def test_unknown_policy():
    with pytest.raises(InvalidInput, match=r"unknown policy 'nope'; allowed: .*streaming"):
        get_policy("nope")


@pytest.mark.parametrize("kept", [0.0, -0.5, 1.5, float("nan")])
def test_kept_outside_range(kept):
    with pytest.raises(InvalidInput, match=r"outside the allowed range \(0, 1\]"):
        get_policy("streaming", kept=kept)


def test_unknown_policy_setting():
    with pytest.raises(InvalidInput, match="has no setting window"):
        get_policy("streaming", kept=0.5, window=3)


def test_bad_sampling():
    with pytest.raises(InvalidInput, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_unsupported_model_paths(tmp_path):
    from headwise.errors import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="is not a directory"):
        ModelRunner.from_pretrained(tmp_path / "missing")
    with pytest.raises(UnsupportedModel, match="no config.json"):
        ModelRunner.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UnsupportedModel, match=r"'gpt2' .* not supported; allowed: llama, mistral, qwen2"):
        ModelRunner.from_pretrained(tmp_path)


def test_qwen2_family_with_bias_matches(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path)
    runner = ModelRunner.from_pretrained(tmp_path)
    ids = _ids(50, vocab=128)
    a = runner.prefill_segment(ids[:20])
    b = runner.prefill_segment(ids[20:], a.cache)
    assert torch.allclose(b.logits, _hf_logits(runner.model, ids), atol=1e-4)


def test_decode_never_grows_the_stored_segment(tiny_runner):
    res = tiny_runner.prefill_segment(_ids(64, seed=13), policy=get_policy("streaming", kept=0.5))
    before = res.segment.nbytes
    list(tiny_runner.generate(res.cache, res.logits, SamplingParams(max_new_tokens=4, ignore_eos=True)))
    assert res.segment.nbytes == before and res.cache.nbytes > before


def test_decode_batch_equals_separate_steps(tiny_runner):
    """Sequences of different lengths and policies (ragged, uniform, merged rows) stepped together."""
    setups = [(_ids(300, seed=21), None), (_ids(180, seed=22), get_policy("streaming", kept=0.25)),
              (_ids(260, seed=23), get_policy("snapkv", kept=0.5)), (_ids(90, seed=24), get_policy("razor", kept=0.5))]
    alone, together = [], []
    for ids, policy in setups:
        a = tiny_runner.prefill_segment(ids, policy=policy)
        b = tiny_runner.prefill_segment(ids, policy=policy)
        alone.append(a.cache)
        together.append(b.cache)
    for step in range(6):
        toks = [int(3 + (7 * step + 11 * i) % 250) for i in range(len(setups))]
        want = torch.stack([tiny_runner.decode_step(t, c) for t, c in zip(toks, alone, strict=True)])
        got = tiny_runner.decode_batch(toks, together[: len(toks)])
        assert torch.allclose(got, want, atol=1e-5), (step, (got - want).abs().max())
    assert [c.seq_len for c in together] == [c.seq_len for c in alone]


def test_decode_batch_rejects_shared_or_missing_caches(tiny_runner):
    c = tiny_runner.prefill_segment(_ids(20)).cache
    with pytest.raises(InvalidInput, match="same cache twice"):
        tiny_runner.decode_batch([5, 6], [c, c])
    with pytest.raises(InvalidInput, match="one cache per token"):
        tiny_runner.decode_batch([5], [])
