"""The engine off fp32 CPU: on CUDA (tests marked `gpu`, skipped without a GPU) and in bf16 on CPU.

Each runs the policy matrix (prefill, compress, two sequences decoding together against the
per-head reference) and the equality of `full` with transformers' forward. Tolerances: fp32 on
CUDA 1e-4 (TF32 off, the default for matmuls); bf16 (8 bits of mantissa, ~4e-3 relative) on
logits of the tiny model, whose magnitude is ~1: 5e-2 between two bf16 computations of the same
thing in different orders, and the vectorised attention within 2e-2 of the per-head one.
"""

from __future__ import annotations

import pytest
import torch

from headwise.models import ModelRunner
from headwise.models.runner import DecodeStats
from headwise.policies import get_policy
from headwise.policies.base import CompressContext
from tests.fixtures.models import tiny_llama
from tests.test_attention import POLICIES, _ids, _reference_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _runner(device: str, dtype: torch.dtype) -> ModelRunner:
    model = tiny_llama(layers=3, heads=6, kv_heads=3, hidden=96, seed=1).to(device=device, dtype=dtype)
    return ModelRunner(model, None, device, name=f"tiny-gqa-{device}-{dtype}")


def _ctx(runner: ModelRunner) -> CompressContext:
    from headwise.profiles import compute_profile

    return CompressContext(num_layers=runner.num_layers, model_id=runner.name, profile=compute_profile(runner, segment=64))


def _matrix(runner: ModelRunner, atol: float) -> None:
    ctx = _ctx(runner)
    dev = runner.device
    for name in POLICIES:
        res = [runner.prefill_segment(_ids(n, seed), policy=get_policy(name, kept=0.3), ctx=ctx) for n, seed in ((260, 1), (200, 2))]
        for r in res:
            for lc in r.cache.layers:
                assert lc.keys.device.type == dev.type and lc.values.dtype == runner.dtype and lc.head_offsets.device.type == dev.type
        mine = [r.cache for r in res]
        theirs = [c.clone() for c in mine]
        stats = DecodeStats()
        for step in range(4):
            toks = [5 + step, 9 + step]
            got = runner.decode_batch(toks, mine, [0.02, None])
            want = torch.stack([_reference_step(runner, t, c, x, stats) for t, c, x in zip(toks, theirs, [0.02, None], strict=True)])
            assert got.device.type == dev.type and torch.isfinite(got).all()
            torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=f"{name} step {step}")


@torch.inference_mode()
def _full_equals_transformers(runner: ModelRunner, atol: float) -> None:
    ids = _ids(200, seed=3)
    res = runner.prefill_segment(ids)
    x = torch.tensor([ids], device=runner.device)
    want = runner.model(x).logits[0, -1].float()
    torch.testing.assert_close(res.logits, want, atol=atol, rtol=0)
    seq, cache, logits = list(ids), res.cache, res.logits
    for _ in range(8):
        seq.append(int(logits.argmax()))
        logits = runner.decode_step(seq[-1], cache)
    want = runner.model(torch.tensor([seq], device=runner.device)).logits[0, -1].float()
    torch.testing.assert_close(logits, want, atol=atol, rtol=0)


@pytest.mark.gpu
@cuda
def test_cuda_policy_matrix_and_decode():
    _matrix(_runner("cuda", torch.float32), atol=1e-4)


@pytest.mark.gpu
@cuda
def test_cuda_full_equals_transformers():
    _full_equals_transformers(_runner("cuda", torch.float32), atol=1e-4)


@pytest.mark.slow
def test_bf16_cpu_policy_matrix_and_decode():
    _matrix(_runner("cpu", torch.bfloat16), atol=2e-2)


def test_bf16_cpu_full_equals_transformers():
    _full_equals_transformers(_runner("cpu", torch.bfloat16), atol=5e-2)
