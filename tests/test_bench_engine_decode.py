"""bench.engine_decode's streams and turn-taking decode what plain decode_batch over clones decodes."""

from __future__ import annotations

import torch

from bench.engine_decode import Kind, streams_of
from headwise.policies import get_policy
from tests.fixtures.models import random_ids, tiny_gqa_context, tiny_gqa_runner


def test_kinds_taking_turns_decode_as_alone():
    runner = tiny_gqa_runner()
    ctx = tiny_gqa_context(runner)
    made = {}
    for name, seed in (("pod", 1), ("ems", 2)):
        policy = get_policy(name, kept=0.3)
        res = runner.prefill_segment(random_ids(200, seed), policy=policy, ctx=ctx)
        made[name] = (res.cache, res.logits)
    shared = streams_of(made["pod"][0], 3)
    assert all(a.layers[0].keys is made["pod"][0].layers[0].keys for a in shared), "the streams share the held rows"
    with torch.inference_mode():
        kinds = {n: Kind(runner, c, lg, 3) for n, (c, lg) in made.items()}
        for _ in range(4):  # the two kinds alternate step by step on one runner, each with its own views
            for k in kinds.values():
                k.step()
        for name, (cache, logits) in made.items():
            runner._views = None
            alone = [cache.clone() for _ in range(3)]
            tokens = logits.expand(3, -1).argmax(-1).tolist()
            for _ in range(5):  # Kind's untimed first step + 4
                tokens = runner.decode_batch(tokens, alone).argmax(-1).tolist()
            assert kinds[name].tokens == tokens
            for a, b in zip(kinds[name].caches, alone, strict=True):
                assert a.seq_len == b.seq_len == cache.seq_len + 5
                for la, lb in zip(a.compacted().layers, b.compacted().layers, strict=True):
                    torch.testing.assert_close(la.keys, lb.keys, atol=1e-6, rtol=0)
            assert made[name][0].layers[0].tail_len == 0, "the prefilled cache itself is not decoded into"
    runner._views = None


def test_transformers_kind_decodes_as_the_full_cache():
    """HFKind (transformers' own forward and DynamicCache, B copies) gives the full cache's greedy tokens."""
    from transformers import DynamicCache

    from bench.engine_decode import HFKind

    runner = tiny_gqa_runner()
    ids = random_ids(120, seed=7)
    with torch.inference_mode():
        out = runner.model(torch.tensor([ids]), cache=DynamicCache(), use_cache=True)
        hf = HFKind(runner, (out.cache, out.logits[:, -1], len(ids)), 2)
        for _ in range(3):
            hf.step()
        res = runner.prefill_segment(ids, policy=get_policy("full"))
        runner._views = None
        caches = [res.cache.clone() for _ in range(2)]
        tokens = res.logits.expand(2, -1).argmax(-1).tolist()
        for _ in range(4):  # HFKind's untimed first step + 3
            tokens = runner.decode_batch(tokens, caches).argmax(-1).tolist()
    assert hf.next.flatten().tolist() == tokens
    assert hf.steps == 4 and hf.pos == len(ids) + 4
    runner._views = None
