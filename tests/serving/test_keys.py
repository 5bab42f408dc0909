"""Segment keys name everything the stored rows depend on: the model's runtime dtype and, for a policy
that reads it (razor, pod), the head profile (pod compresses in the prefill's pass, razor after the
handoff: both paths). Two replicas that would compute different rows never
reuse each other's cache; the same replica reuses its own."""

from __future__ import annotations

import copy

import pytest
import torch

from headwise.cache.keys import segment_key
from headwise.policies import get_policy
from headwise.profiles import HeadProfile
from services.handoff import PrefillRequest
from services.prefill.worker import PrefillWorker
from services.settings import Settings
from tests.serving.test_workers import DOC, ByteTokenizer


def request(policy: str = "streaming") -> PrefillRequest:
    return PrefillRequest(tenant="acme", salt="s", context=DOC, prompt="what jumps?", policy=policy, kept=0.5)


def prefill_worker(model, store) -> PrefillWorker:
    from headwise.models import ModelRunner

    return PrefillWorker(ModelRunner(model, ByteTokenizer(), name="tiny-llama"), store.clients(),
                         Settings(max_prompt_tokens=900), cache_bytes=0)


def profile(runner, echo: float) -> HeadProfile:
    L, H = runner.num_layers, runner.num_kv_heads
    return HeadProfile(model_id=runner.name, num_layers=L, num_kv_heads=H,
                       echo=[[echo * (h + 1) for h in range(H)] for _ in range(L)],
                       induction=[[0.1 * (i + h) for h in range(H)] for i in range(L)],
                       base_of=[[0] * H for _ in range(L)])


def test_the_key_names_the_model_dtype():
    args = (None, [1, 2, 3], "m", {"policy": "full"}, 3, "salt", "fp32")
    assert segment_key(*args) == segment_key(*args, "float32")
    assert segment_key(*args, "float32") != segment_key(*args, "bfloat16")


async def test_replicas_of_another_dtype_never_share_a_cache(tiny_model, store):
    fp32 = prefill_worker(tiny_model, store)
    bf16 = prefill_worker(copy.deepcopy(tiny_model).to(torch.bfloat16), store)
    assert (fp32.model_dtype, bf16.model_dtype) == ("float32", "bfloat16")
    a = await fp32.prefill(request())
    b = await bf16.prefill(request())  # the same document and policy, other rows: computed again
    assert (a.store_status, b.store_status) == ("stored", "stored") and a.keys[0] != b.keys[0]
    again = await bf16.prefill(request())
    assert again.store_status == "reused" and again.keys[0] == b.keys[0]


@pytest.mark.parametrize("policy", ["razor", "pod"])
def test_the_key_names_the_head_profile(tiny_model, store, policy):
    pw = prefill_worker(tiny_model, store)
    pol = get_policy(policy, kept=0.5)
    pw.runner._head_profile = profile(pw.runner, 0.2)
    first = pw.plan(request(policy), pol).keys
    assert pw.plan(request(policy), pol).keys == first
    pw.runner._head_profile = profile(pw.runner, 0.3)  # a recomputed profile: other retrieval heads
    assert pw.plan(request(policy), pol).keys[0] != first[0]
    plain = pw.plan(request("streaming"), get_policy("streaming", kept=0.5))
    assert "head_profile" not in pw.key_params(get_policy("streaming", kept=0.5)) and plain.keys[0] != first[0]


async def test_a_recomputed_profile_does_not_reuse_the_old_cache(tiny_model, store):
    """pod reads the profile and compresses in the prefill's pass: its first answer stores the cache."""
    pw = prefill_worker(tiny_model, store)
    assert not pw.defers(get_policy("pod", kept=0.5))
    pw.runner._head_profile = profile(pw.runner, 0.2)
    assert (await pw.prefill(request("pod"))).store_status == "stored"
    assert (await pw.prefill(request("pod"))).store_status == "reused"
    pw.runner._head_profile = profile(pw.runner, 0.3)
    assert (await pw.prefill(request("pod"))).store_status == "stored"


async def test_a_recomputed_profile_does_not_reuse_the_old_deferred_cache(tiny_model, store, monkeypatch):
    """razor reads the profile and, with its KVzip fill, compresses after the handoff (deferred): the
    first answer is exact, the compressed cache follows under the profile's key, and a recomputed
    profile is a document nobody stored yet."""
    from services.prefill import worker as worker_module

    monkeypatch.setattr(worker_module, "HANDOFF_WAIT_S", 0.5)  # no decode fetches the exact rows here
    pw = prefill_worker(tiny_model, store)
    assert pw.defers(get_policy("razor", kept=0.5))
    pw.runner._head_profile = profile(pw.runner, 0.2)
    assert (await pw.prefill(request("razor"))).store_status == "compressing"
    await pw.drain()
    assert [d["outcome"] for d in pw.stats()["deferred"]] == ["stored"]
    assert (await pw.prefill(request("razor"))).store_status == "reused"
    pw.runner._head_profile = profile(pw.runner, 0.3)
    assert (await pw.prefill(request("razor"))).store_status == "compressing"
    await pw.drain()
    assert [d["outcome"] for d in pw.stats()["deferred"]] == ["stored", "stored"]
