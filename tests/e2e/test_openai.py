"""The official `openai` client against the local cluster's Serve HTTP port (slow: real model, Ray).

One cluster for the module (tests/e2e/conftest.py); the in-process twin of these tests, with
every error case, is tests/serving/test_openai_ingress.py.
"""

from __future__ import annotations

import asyncio

import httpx2
import openai
import pytest

from cluster.client import HeadwiseClient
from cluster.engine_demo import PREFIX, QUESTION
from tests.e2e.conftest import TENANTS

pytestmark = pytest.mark.slow

EXTRA = {"policy": "full", "answer_prefix": " " + PREFIX, "return_token_ids": True}


def client(cluster, key="acme-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.endpoints.openai, api_key=key, max_retries=0)


def ask_document(document, question=QUESTION):
    return [{"role": "user", "content": [{"type": "text", "text": document}, {"type": "text", "text": question}]}]


@pytest.fixture(scope="module")
def model(cluster) -> str:
    return openai.OpenAI(base_url=cluster.endpoints.openai, api_key="acme-key").models.list().data[0].id


async def test_document_reused_streamed_and_equal_to_generate(cluster, document, model):
    oa = client(cluster)
    cold = await oa.chat.completions.create(model=model, messages=ask_document(document), max_tokens=8,
                                            temperature=0, extra_body=EXTRA)
    chunks = [c async for c in await oa.chat.completions.create(
        model=model, messages=ask_document(document), max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=EXTRA)]
    async with HeadwiseClient(cluster.endpoints.grpc, TENANTS["acme"]) as g:
        ref = await g.ask(QUESTION, document, answer_prefix=" " + PREFIX, max_new_tokens=8, policy="full")
    warm = next(c for c in chunks if c.choices and c.choices[0].finish_reason).headwise
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert cold.headwise["store_status"] == "stored" and warm["store_status"] == "reused"
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == warm["reused_tokens"] > 0
    assert cold.headwise["token_ids"] == warm["token_ids"] == ref.token_ids
    assert cold.choices[0].message.content == text == ref.text and "4817" in text
    assert cold.usage.completion_tokens == len(ref.token_ids) and cold.usage.prompt_tokens == ref.figures["prompt_tokens"]


async def test_second_tenant_never_reuses(cluster, document, model):
    await client(cluster).chat.completions.create(model=model, messages=ask_document(document), max_tokens=4,
                                                  extra_body=EXTRA)
    other = await client(cluster, "globex-key").chat.completions.create(
        model=model, messages=ask_document(document), max_tokens=4, extra_body=EXTRA)
    assert other.headwise["store_status"] == "stored" and other.headwise["reused_tokens"] == 0


BAD = [  # (body fields, status, error param)
    ({"model": "gpt-4o"}, 404, "model"),
    ({"policy": "nope"}, 400, "policy"),
    ({"kept": 0}, 400, "kept"),
    ({"kept": 1.5}, 400, "kept"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 100000}, 400, "max_tokens"),
    ({"stop": ["x"] * 17}, 400, "stop"),
    ({"messages": ask_document("word " * 3000)}, 400, "messages"),
]


async def test_bad_requests_get_status_and_error_object(cluster, model):
    base = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx2.AsyncClient(base_url=cluster.endpoints.openai, timeout=120) as h:
        auth = {"authorization": "Bearer acme-key"}
        got = [(await h.post("/chat/completions", json=base | fields, headers=auth), status, param)
               for fields, status, param in BAD]
        got.append((await h.post("/chat/completions", json=base), 401, None))
        got.append((await h.post("/chat/completions", json=base, headers={"authorization": "Bearer nope"}), 401, None))
        got.append((await h.post("/chat/completions", content=b'{"model": ', headers=auth), 400, "body"))
    for r, status, param in got:
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (status, param) and err["message"] and "Traceback" not in r.text, err
    assert "1500" in got[7][0].json()["error"]["message"] and got[7][0].json()["error"]["code"] == "context_length_exceeded"


async def test_stream_limit_is_429(cluster, model):
    async with HeadwiseClient(cluster.endpoints.grpc, TENANTS["solo"]) as g:  # one stream at a time
        call = g.stream("Count from one to one hundred.", "", max_new_tokens=40)
        assert (await call.read()).HasField("delta")
        with pytest.raises(openai.RateLimitError) as e:
            await client(cluster, "solo-key").chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        call.cancel()
    assert e.value.status_code == 429 and "limit 1" in e.value.body["message"]


async def test_client_disconnect_stops_decoding(cluster, model):
    stream = await client(cluster).chat.completions.create(
        model=model, max_tokens=256, stream=True, extra_body={"policy": "full"},
        messages=[{"role": "user", "content": "Write out, in words, every number from one to two hundred, "
                                              "separated by commas."}])
    n = 0
    async for _ in stream:
        n += 1
        if n == 3:
            break
    await stream.close()  # drops the connection mid-stream
    for _ in range(150):  # the HTTP proxy sees the disconnect and cancels the replica's call
        stats = await asyncio.to_thread(cluster.decode_stats)
        if stats["active"] == 0:
            break
        await asyncio.sleep(0.1)
    rec = [r for r in stats["recent"] if r["max_new_tokens"] == 256][-1]
    assert stats["active"] == 0 and rec["cancelled"] and not rec["finished"] and rec["tokens"] < 256, rec
