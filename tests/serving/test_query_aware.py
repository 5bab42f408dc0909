"""Query-aware requests through the prefill and decode workers, over the real KV store service and a
real Redis: the cache depends on the question, so it is private: never stored, never reused."""

from __future__ import annotations

import pytest

from services.errors import ServiceError
from services.protos.headwise.v1 import generate_pb2 as pb
from tests.kvstore.conftest import settings as store_settings
from tests.kvstore.conftest import start_service
from tests.serving.test_store_capacity import INTERNAL_NAME, Stack
from tests.serving.test_workers import ByteTokenizer

QA = {"query_aware": True, "policy": "snapkv", "kept": 0.5}


@pytest.fixture
async def stack(tiny_model, redis_url):
    from headwise.models import ModelRunner

    svc = await start_service(store_settings(redis_url))
    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    s = Stack(svc, runner, "acme:ka,globex:kb", cache_bytes=512 * 1024**2)
    s.computed = []  # one entry per query-aware prefill the model ran
    real = runner.prefill_query_aware

    def counting(*args, **kw):
        s.computed.append(args[0])
        return real(*args, **kw)

    runner.prefill_query_aware = counting
    yield s
    await s.close()


async def empty(stack: Stack, tenant: str = "acme") -> bool:
    st = await stack.stats(tenant)
    return st["segments"] == 0 and st["tenant_bytes"] == 0


async def test_a_query_aware_cache_is_never_stored_or_reused(stack):
    first_ids, first = await stack.ask(**QA)
    assert first.store_status == "private" and first.reused_tokens == 0 and first.wire_bytes == 0
    assert 0 < first.realised_kept < 1 and first.held_kv_bytes < first.full_kv_bytes
    assert first.policy.startswith("snapkv(kept=0.5")
    assert await empty(stack)
    second_ids, second = await stack.ask(**QA)  # the identical request computes again
    assert len(stack.computed) == 2
    assert second.store_status == "private" and second.reused_tokens == 0 and second.wire_bytes == 0
    assert second_ids == first_ids and len(first_ids) == 6  # deterministic: same cache, same answer
    assert await empty(stack)


async def test_a_stored_document_is_not_reused_by_a_query_aware_request(stack):
    _, stored = await stack.ask(policy="snapkv", kept=0.5)
    assert stored.store_status == "stored"
    before = await stack.stats()
    _, qa = await stack.ask(**QA)
    assert qa.store_status == "private" and qa.reused_tokens == 0 and len(stack.computed) == 1
    assert await stack.stats() == before  # nothing put, nothing evicted
    _, again = await stack.ask(policy="snapkv", kept=0.5)  # the reuse regime still finds its own cache
    assert again.store_status == "reused"


async def test_every_window_policy_answers_and_recall_is_skipped(stack):
    for name in ("snapkv", "adakv", "ahakv", "taskkv", "ems", "pod"):
        ids, fig = await stack.ask(query_aware=True, policy=name, kept=0.5, recall=True)
        assert fig.store_status == "private" and len(ids) == 6, name
    assert await empty(stack)


async def test_an_empty_policy_means_snapkv(stack):
    _, fig = await stack.ask(query_aware=True, policy="", kept=0.5)
    assert fig.store_status == "private" and fig.policy.startswith("snapkv(")


@pytest.mark.parametrize("fields,needle", [
    ({"policy": "kvzip"}, "no query-aware form"),
    ({"policy": "streaming"}, "no query-aware form"),
    ({"session_id": "s1"}, "one-shot"),
])
async def test_bad_query_aware_requests_are_invalid_argument(stack, fields, needle):
    with pytest.raises(ServiceError) as e:
        await stack.ask(**(QA | fields))
    assert e.value.code == "INVALID_ARGUMENT" and needle in e.value.message
    assert not INTERNAL_NAME.search(e.value.message)
    assert await empty(stack)


def test_the_field_is_in_the_api():
    assert pb.GenerateRequest(query_aware=True).query_aware is True
    assert pb.GenerateRequest().query_aware is False
