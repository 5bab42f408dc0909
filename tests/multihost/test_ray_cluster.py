"""The Serve application over a Ray head host and two worker hosts (custom resources place replicas)."""

from __future__ import annotations

import asyncio

import pytest

from cluster.client import HeadwiseClient
from tests.multihost.conftest import TENANT, TENANT_KEY, app_settings, serve_config_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WORDS = ("harbour lantern copper meadow silver quarry orchard falcon ember willow granite tide "
         "beacon cedar marble thistle").split()
QUESTIONS = ["What is the document about?", "Name one metal in it.", "Which bird appears?"]
GREEDY = dict(max_new_tokens=16, temperature=0.0)
# Prefill on one worker host, Decode on the other: every cache crosses hosts through the store
SPLIT = {"Prefill": {"replicas": 1, "resources": {"hw_w1": 0.01}},
         "Decode": {"replicas": 1, "resources": {"hw_w2": 0.01}}}


def document(seed: int, words: int = 240) -> str:
    return " ".join(WORDS[(i * 7 + seed * 3 + i // 5) % len(WORDS)] for i in range(words)) + "."


async def ask_all(addr: str, pairs: list[tuple[str, str]]) -> list:
    async with HeadwiseClient(addr, TENANT_KEY) as c:
        return [await asyncio.wait_for(c.ask(q, doc, **GREEDY), 120) for doc, q in pairs]


PAIRS = [(document(0), QUESTIONS[0]), (document(0), QUESTIONS[1]), (document(1), QUESTIONS[2])]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The single-host local cluster's answers to PAIRS (the same settings and model)."""
    from cluster.local import LocalCluster

    settings = app_settings(tiny_model_dir, "unused:0")
    with LocalCluster(settings, tenants={TENANT: TENANT_KEY}, num_cpus=2, log=lambda s: None) as c:
        return asyncio.run(ask_all(c.endpoints.grpc, PAIRS))


@pytest.fixture(scope="module")
def split(ray_cluster, kvstores, tiny_model_dir, reference):
    ray_cluster.deploy(serve_config_for(app_settings(tiny_model_dir, kvstores), SPLIT))
    return ray_cluster


def test_answers_equal_the_single_host_cluster(split, reference, net) -> None:
    assert split.replicas() == {"Prefill": [net["w1"].addr], "Decode": [net["w2"].addr]}
    got = asyncio.run(ask_all(split.grpc_addr, PAIRS))
    for (_doc, q), ref, ans in zip(PAIRS, reference, got, strict=True):
        assert ans.token_ids and ans.token_ids == ref.token_ids, q
        assert ans.figures["prompt_tokens"] == ref.figures["prompt_tokens"]


def test_document_stored_by_one_host_is_reused_by_the_others_decode(split) -> None:
    doc = document(5)
    cold, warm = asyncio.run(ask_all(split.grpc_addr, [(doc, QUESTIONS[0]), (doc, QUESTIONS[1])]))
    assert cold.figures["store_status"] == "stored" and cold.figures["reused_tokens"] == 0
    assert warm.figures["store_status"] == "reused" and warm.figures["reused_tokens"] > 200
    assert warm.figures["wire_bytes"] > 0  # Decode on w2 fetched what Prefill on w1 put
