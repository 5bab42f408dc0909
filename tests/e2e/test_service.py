"""Through the real gRPC port of a locally started Ray Serve app (slow: real model, Ray)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from cluster.client import HeadwiseClient
from cluster.engine_demo import PREFIX, QUESTION
from tests.e2e.conftest import TENANTS

pytestmark = pytest.mark.slow

ASK = {"answer_prefix": " " + PREFIX, "max_new_tokens": 8, "policy": "full"}


async def drain(call) -> list:
    out = []
    while (m := await call.read()) is not grpc.aio.EOF:
        out.append(m)
    return out


def client(cluster, tenant="acme", key=None) -> HeadwiseClient:
    return HeadwiseClient(cluster.endpoints.grpc, key or TENANTS[tenant])


async def test_tokens_stream_before_the_answer_is_complete(cluster, document):
    async with client(cluster) as c:
        call = c.stream("Count from one to one hundred in words.", document, max_new_tokens=40, policy="streaming")
        first = await call.read()
        assert first.HasField("delta")
        stats = await asyncio.to_thread(cluster.decode_stats)
        rec = stats["recent"][-1]
        assert stats["active"] == 1 and not rec["finished"] and rec["tokens"] < 40
        rest = await drain(call)
    assert rest[-1].HasField("figures") and sum(m.HasField("delta") for m in rest) >= 1


async def test_second_session_reuses_and_answers_identically(cluster, document):
    async with client(cluster) as a:
        cold = await a.ask(QUESTION, document, **ASK)
    async with client(cluster) as b:  # another connection: nothing shared but the tenant
        warm = await b.ask(QUESTION, document, **ASK)
    assert cold.figures["store_status"] == "stored" and cold.figures["reused_tokens"] == 0
    assert warm.figures["store_status"] == "reused"
    context_tokens = warm.figures["prompt_tokens"] - warm.figures["reused_tokens"]
    assert 0 < context_tokens < 40  # only the question was prefilled
    assert warm.token_ids == cold.token_ids and warm.text == cold.text
    assert "4817" in cold.text


async def test_other_tenant_gets_no_reuse(cluster, document):
    async with client(cluster, "acme") as a:
        await a.ask(QUESTION, document, **ASK)
    async with client(cluster, "globex") as g:
        other = await g.ask(QUESTION, document, **ASK)
    assert other.figures["reused_tokens"] == 0 and other.figures["store_status"] == "stored"


async def status_of(cluster, key="acme-key", context="", **fields) -> grpc.aio.AioRpcError:
    async with client(cluster, key=key) as c:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await c.ask(fields.pop("prompt", "What?"), context, **fields)
    return e.value


async def test_wrong_key_is_unauthenticated(cluster):
    e = await status_of(cluster, key="not-a-key")
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_input_is_invalid_argument(cluster):
    e = await status_of(cluster, policy="no-such-policy")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "streaming" in e.details() and "full" in e.details()
    e = await status_of(cluster, policy="streaming", kept=1.5)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "(0, 1]" in e.details()
    e = await status_of(cluster, context="word " * 3000)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "1500" in e.details()


async def test_a_cache_over_the_quota_is_answered_not_stored_and_only_the_stream_limit_is_exhausted(cluster, document):
    async with client(cluster, "small") as c:  # quota of 1000 bytes: the cache cannot be kept
        ans = await c.ask(QUESTION, document, **ASK)
    assert ans.figures["store_status"] == "not_stored" and "4817" in ans.text
    import redis.asyncio as redis

    r = redis.from_url(cluster.endpoints.redis)
    async with client(cluster, "solo") as c:  # one stream at a time
        call = c.stream("Count from one to one hundred.", "", max_new_tokens=40)
        assert (await call.read()).HasField("delta")
        assert await r.zcard("hw:solo:sem:streams") == 1  # the cluster-wide slot it holds
        e = await status_of(cluster, key="solo-key")
        call.cancel()
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit 1" in e.details()
    for _ in range(100):  # the cancel gives the slot back
        if await r.zcard("hw:solo:sem:streams") == 0:
            break
        await asyncio.sleep(0.1)
    assert await r.zcard("hw:solo:sem:streams") == 0
    await r.aclose()


async def test_a_session_is_a_store_record_any_replica_can_read(cluster, document):
    import redis.asyncio as redis

    async with client(cluster) as c:
        first = await c.ask(QUESTION, document, session_id="e2e-session", **ASK)
        second = await c.ask("And what is the code again?", "", session_id="e2e-session", **ASK)
    r = redis.from_url(cluster.endpoints.redis)
    keys = [k async for k in r.scan_iter("hw:acme:rec:session-*")]
    ttl = await r.ttl(keys[0]) if keys else -2
    await r.aclose()
    assert len(keys) == 1 and 0 < ttl <= 3600
    assert second.figures["reused_tokens"] >= first.figures["prompt_tokens"] - 1


@pytest.mark.parametrize("reads, idle_s", [(2, 0.0), (1, 1.0)], ids=["while-reading", "client-idle"])
async def test_cancellation_stops_decoding(cluster, reads, idle_s):
    # services/decode/grpc_proxy.py makes this hold wherever the cancel lands in Serve's proxy
    async with client(cluster) as c:
        # this prompt never reaches EOS on the default model: 256 tokens take ~17 s even on an
        # idle machine, so a generation that ends early can only have been cancelled
        call = c.stream("Write out, in words, every number from one to two hundred, separated by commas.", "",
                        max_new_tokens=256, policy="full")
        for _ in range(reads):
            await call.read()
        await asyncio.sleep(idle_s)  # tokens pile up in the client while the proxy keeps writing
        call.cancel()
    for _ in range(150):  # Ray Serve propagates the client's cancel to the replica
        stats = await asyncio.to_thread(cluster.decode_stats)
        if stats["active"] == 0:
            break
        await asyncio.sleep(0.1)
    rec = [r for r in stats["recent"] if r["max_new_tokens"] == 256][-1]
    assert stats["active"] == 0 and rec["cancelled"] and not rec["finished"] and rec["tokens"] < 256, rec


async def test_corrupt_segment_is_recomputed(cluster, document):
    import redis.asyncio as redis

    async with client(cluster) as c:
        ref = await c.ask(QUESTION, document, **ASK)
        r = redis.from_url(cluster.endpoints.redis)
        chunks = [k async for k in r.scan_iter("hw:acme:c:*")]
        assert chunks
        for k in chunks:  # flip bytes in the middle of every stored chunk
            n = await r.strlen(k)
            await r.setrange(k, n // 2, b"\xff\x00\xff\x00")
        await r.aclose()
        again = await c.ask(QUESTION, document, **ASK)
    assert again.token_ids == ref.token_ids
    assert again.figures["reused_tokens"] == 0 and again.figures["store_status"] == "stored"


async def test_recall_through_a_merging_policy(cluster, document):
    """EMS merges rows and stores their originals; decode recalls the ones attention asks for."""
    import redis.asyncio as redis

    opts = {"answer_prefix": " " + PREFIX, "max_new_tokens": 8, "policy": "ems", "kept": 0.25}
    async with client(cluster) as c:
        with_recall = await c.ask(QUESTION, document, recall=True, **opts)
        without = await c.ask(QUESTION, document, recall=False, **opts)
    r = redis.from_url(cluster.endpoints.redis)
    recall_keys = [k async for k in r.scan_iter("hw:acme:r:*")]
    await r.aclose()
    assert recall_keys  # the originals of merged rows are in Redis
    assert with_recall.figures["recalls"] > 0 and without.figures["recalls"] == 0
    assert without.figures["store_status"] == "reused" and len(with_recall.token_ids) > 0


async def test_metrics_are_exported_in_prometheus_format(cluster, document):
    import urllib.request

    async with client(cluster) as c:
        await c.ask(QUESTION, document, **ASK)
    assert cluster.endpoints.metrics.startswith("http://")
    want = ("ray_headwise_requests_total", "ray_headwise_ttft_seconds_bucket", "ray_headwise_prefill_seconds_bucket")
    for _ in range(60):  # Ray exports application metrics every few seconds
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(cluster.endpoints.metrics, timeout=5).read().decode())
        ok = [line for line in text.splitlines() if line.startswith("ray_headwise_requests_total{")
              and 'tenant="acme"' in line and 'code="OK"' in line]
        if ok and all(w in text for w in want):
            break
        await asyncio.sleep(1)
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 1, ok
    assert all(w in text for w in want)


async def test_killing_kvstore_still_answers(cluster, document):  # last: the store restarts behind a breaker
    async with client(cluster) as c:
        call = c.stream(QUESTION, document + "\nA second copy.", **ASK)
        cluster.stop_kvstore()  # mid-run: the request was just sent
        msgs = [m async for m in call]
        after = await c.ask(QUESTION, document, **ASK)
    try:
        assert msgs[-1].figures.store_status in ("bypassed", "stored")
        assert after.figures["store_status"] == "bypassed" and "4817" in after.text
    finally:
        cluster.start_kvstore()
