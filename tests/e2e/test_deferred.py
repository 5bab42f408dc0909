"""Deferred compression through the real gRPC port: two prefill replicas, the real model, kvzip.

The first request for a new document is answered from its exact cache (what `full` answers);
the compressed cache follows and later requests reuse it; requests arriving while it is computed
are answered exact too, without waiting for it; when the replicas computing it are killed, a later
request computes it again.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from cluster.client import HeadwiseClient
from cluster.engine_demo import PREFIX, QUESTION

pytestmark = pytest.mark.slow

KEY = "acme-key"
ASK = {"answer_prefix": " " + PREFIX, "max_new_tokens": 8}
KVZIP = ASK | {"policy": "kvzip", "kept": 0.25}


@pytest.fixture(scope="module")
def cluster(default_model_path):
    from cluster.local import LocalCluster
    from services.settings import Settings

    old = os.environ.get("HEADWISE_FILL_LEASE_S")
    os.environ["HEADWISE_FILL_LEASE_S"] = "20"  # replicas read it from the env: a dead holder's slot lapses soon
    settings = Settings(default_policy="kvzip", max_prompt_tokens=1500, store_timeout_s=5.0, prefill_min_replicas=2,
                        prefill_max_replicas=2, prefill_num_cpus=0.5, decode_num_cpus=0.5, torch_threads=1)
    try:
        with LocalCluster(settings, tenants={"acme": KEY}, num_cpus=2, max_replicas=2, log=lambda s: None) as c:
            yield c
    finally:
        if old is None:
            os.environ.pop("HEADWISE_FILL_LEASE_S", None)
        else:
            os.environ["HEADWISE_FILL_LEASE_S"] = old


@pytest.fixture(scope="module")
def documents(default_model_path):
    from transformers import AutoTokenizer

    from cluster.engine_demo import FACT, insert_fact
    from headwise.documents import document_tokens

    tok = AutoTokenizer.from_pretrained(default_model_path)
    base = document_tokens(tok, 1300)
    return [insert_fact(f"Report {i}.\n" + base, FACT, 0.5) for i in range(3)]


async def ask(cluster, doc: str, **opts):
    async with HeadwiseClient(cluster.endpoints.grpc, KEY) as c:
        return await c.ask(QUESTION, doc, **(KVZIP | opts))


async def until_reused(cluster, doc: str, exact: list[int], within_s: float = 300.0):
    """Ask until the answer comes from the compressed cache; every answer before it is the exact one."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        ans = await ask(cluster, doc)
        if ans.figures["store_status"] == "reused" or asyncio.get_running_loop().time() > deadline:
            return ans
        assert ans.figures["store_status"] == "compressing" and ans.token_ids == exact
        await asyncio.sleep(2.0)


def direct(runner, doc: str) -> list[int]:
    from headwise.models import SamplingParams
    from headwise.policies import get_policy
    from headwise.prompt import build_segments

    seg = build_segments(runner.tokenizer, doc, QUESTION, " " + PREFIX)
    ctx = runner.prefill_segment(seg.context, None, get_policy("kvzip", kept=0.25))
    q = runner.prefill_segment(seg.question, ctx.segment)
    return list(runner.generate(q.cache, q.logits, SamplingParams(max_new_tokens=8)))


async def test_first_answer_is_exact_and_the_next_reuses_the_compressed_cache(cluster, documents, real_runner):
    doc = documents[0]
    full = await ask(cluster, doc, policy="full", kept=0)
    cold = await ask(cluster, doc)
    assert cold.figures["store_status"] == "compressing" and cold.figures["realised_kept"] == 1.0
    assert cold.figures["held_kv_bytes"] == cold.figures["full_kv_bytes"]
    assert cold.token_ids == full.token_ids and "4817" in cold.text
    warm = await until_reused(cluster, doc, full.token_ids)  # exact while it is compressed, then reused
    assert warm.figures["store_status"] == "reused" and warm.figures["reused_tokens"] > 0
    assert warm.figures["held_kv_bytes"] < warm.figures["full_kv_bytes"] / 2
    assert warm.token_ids == direct(real_runner, doc)


async def test_two_cold_requests_neither_waits_nor_fails(cluster, documents, real_runner):
    a, b = await asyncio.gather(ask(cluster, documents[1]), ask(cluster, documents[1]))
    assert [a.figures["store_status"], b.figures["store_status"]] == ["compressing"] * 2
    assert a.token_ids == b.token_ids and "4817" in a.text
    later = await until_reused(cluster, documents[1], a.token_ids)
    assert later.token_ids == direct(real_runner, documents[1])


def prefill_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Prefill" in a["name"]}


def prefill_running() -> bool:
    from ray import serve

    from cluster.local import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    dep = app.deployments.get("Prefill") if app else None
    return dep is not None and str(dep.status).endswith("HEALTHY") and dep.replica_states.get("RUNNING", 0) == 2


async def test_killed_replicas_leave_the_compression_to_the_next_request(cluster, documents, real_runner):
    import ray

    doc = documents[2]
    full = await ask(cluster, doc, policy="full", kept=0)
    cold = await ask(cluster, doc, max_new_tokens=1)
    assert cold.figures["store_status"] == "compressing"
    # both prefill replicas die while the compression runs (a 1,300-token reconstruction pass takes seconds)
    dead = prefill_replicas()
    assert len(dead) == 2
    for name in dead:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for _ in range(600):  # Serve starts two new ones
        if len(prefill_replicas() - dead) == 2 and await asyncio.to_thread(prefill_running):
            break
        await asyncio.sleep(0.5)
    again = await ask(cluster, doc)  # new replicas: exact (the dead one's slot lapses, then one computes it)
    assert again.figures["store_status"] == "compressing" and again.token_ids == full.token_ids
    later = await until_reused(cluster, doc, full.token_ids)
    assert later.figures["store_status"] == "reused" and later.token_ids == direct(real_runner, doc)
