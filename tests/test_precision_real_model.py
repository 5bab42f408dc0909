"""int8 and int4 rows on real caches: the tiny random model in every engine dtype (fast), the
default model's kvzip and PoD caches (slow). Round trip within the bound; decode over the decoded
cache equals decode over the same rows dequantised by hand, within 1e-5."""

from __future__ import annotations

import pytest
import torch

from headwise.cache import quant
from headwise.cache.codec import decode, encode
from headwise.cache.compact import CompactCache, LayerCache
from tests.test_codec_precision import assert_exact_but_rows, assert_rows_within_bound


def _nibbles(packed: torch.Tensor, d: int) -> torch.Tensor:
    """int4 q values from their bytes, by hand: low nibble first, two's complement."""
    lo, hi = (packed & 0xF).to(torch.int16), (packed >> 4).to(torch.int16)
    q = torch.stack([lo, hi], dim=2).reshape(packed.shape[0], -1)[:, :d]
    return torch.where(q >= 8, q - 16, q)


def _by_hand(cache: CompactCache, precision: str = "int8") -> CompactCache:
    """The quantised rows dequantised to fp32 here, from the quantised tensors (not through the codec)."""
    layers = []
    for lc in cache.layers:
        out = []
        for x, offs in ((lc.keys, lc.key_offsets()), (lc.values, lc.head_offsets)):
            if precision == "int8":
                q, s = quant.quantise(x, offs)
                out.append(q.to(torch.float32) * s[quant.head_index(offs, q.shape[0])])
            else:
                q, s = quant.quantise4(x, offs)
                out.append(_nibbles(q, x.shape[1]).to(torch.float32) * s.float()[quant.group_index(offs, q.shape[0])])
        k, v = out
        layers.append(LayerCache(k, v, lc.head_offsets, lc.positions, lc.log_weights, lc.recall_ids, lc.recall,
                                 distant=lc.distant, distant_from=lc.distant_from))
    return CompactCache(layers, cache.seq_len, cache.start, dict(cache.meta))


def _check(runner, ids: list[int], policy, steps: int = 4, precision: str = "int8") -> None:
    seg = runner.prefill_segment(ids[:-1], policy=policy).segment
    enc = encode(seg, include_recall=False, precision=precision)
    back = decode(enc.header, enc.chunks)
    assert_exact_but_rows(seg, back, recall_data=False)
    for x, y in zip(seg.compacted().layers, back.layers, strict=True):
        assert_rows_within_bound(x, y, precision)
    if seg.layers[0].keys.dtype != torch.float32:
        return
    hand = _by_hand(seg, precision)
    tok = ids[-1]
    for _ in range(steps):  # decode steps over both (each cache grows by the same tokens)
        a, b = runner.decode_step(tok, back), runner.decode_step(tok, hand)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
        tok = int(a.argmax())


@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_model_caches_in_every_dtype(tiny_model, dtype, precision) -> None:
    import copy

    from headwise.models import ModelRunner
    from headwise.policies import get_policy

    runner = ModelRunner(copy.deepcopy(tiny_model).to(dtype), None, name="tiny-llama")  # the dtype of the weights
    ids = [int(t) for t in torch.randint(3, 250, (151,), generator=torch.Generator().manual_seed(0))]
    for policy in (get_policy("full"), get_policy("snapkv", kept=0.5), get_policy("ems", kept=0.5)):
        _check(runner, ids, policy, precision=precision)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("policy_name", ["kvzip", "pod", "ems"])
def test_default_model_caches(real_runner, policy_name, precision) -> None:
    from headwise.documents import document_tokens
    from headwise.policies import get_policy

    tok = real_runner.tokenizer
    ids = tok(document_tokens(tok, 500), add_special_tokens=False).input_ids[:400]
    policy = get_policy(policy_name, kept=0.25)
    ctx = real_runner.context(policy) if getattr(policy, "needs_profile", False) else None
    seg = real_runner.prefill_segment(ids[:-1], policy=policy, ctx=ctx).segment
    enc = encode(seg, include_recall=False, precision=precision)
    back = decode(enc.header, enc.chunks)
    assert_exact_but_rows(seg, back, recall_data=False)
    for x, y in zip(seg.compacted().layers, back.layers, strict=True):
        assert_rows_within_bound(x, y, precision)
    hand, tok_id = _by_hand(seg, precision), ids[-1]
    for _ in range(4):
        a, b = real_runner.decode_step(tok_id, back), real_runner.decode_step(tok_id, hand)
        assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
        tok_id = int(a.argmax())
