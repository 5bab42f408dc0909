"""The OpenAI HTTP API in one process: the official `openai` client -> ASGI -> ingress -> decode worker
-> prefill worker (tiny model, the kvstore server over its MemoryBackend). tests/e2e/test_openai.py does it again through
Ray Serve's HTTP port with the real model."""

from __future__ import annotations

import json

import httpx2
import openai
import pytest

from services.decode.worker import DecodeWorker
from services.openai_api.ingress import OpenAIIngress, asgi_app
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings
from services.tenancy import TenantRegistry
from tests.serving.test_workers import DOC, ByteTokenizer

MODEL = "tiny-llama"
OPTS = {"policy": "streaming", "kept": 0.5, "return_token_ids": True}


class ChatTokenizer(ByteTokenizer):
    """ByteTokenizer with a chat template, so a prompt without a document still has a template head."""

    chat_template = "tags"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(f"<{m['role']}>{m['content']}</>" for m in messages) + "<assistant>"


@pytest.fixture
async def stack(tiny_model, store):
    from headwise.models import ModelRunner
    from headwise.policies import policy_names

    runner = ModelRunner(tiny_model, ChatTokenizer(), name="tiny-llama")
    settings = Settings(tenants="acme:ka:2,globex:kb", default_policy="streaming", max_prompt_tokens=900,
                        max_new_tokens=32)
    stores = store.clients()
    pw = PrefillWorker(runner, stores, settings)
    dw = DecodeWorker(runner, stores, pw.prefill, TenantRegistry.from_settings(settings), settings)
    return dw, OpenAIIngress(dw, MODEL, tuple(policy_names()))


def http(ingress) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=asgi_app(ingress)), base_url="http://hw")


def client(ingress, key="ka") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url="http://hw/v1", http_client=http(ingress), max_retries=0)


def doc_messages(question="what jumps?", doc=DOC):
    return [{"role": "user", "content": [{"type": "text", "text": doc}, {"type": "text", "text": question}]}]


async def chat(ingress, key="ka", messages=None, **kw):
    kw = {"max_tokens": 6, "extra_body": OPTS} | kw
    return await client(ingress, key).chat.completions.create(model=MODEL, messages=messages or doc_messages(), **kw)


async def generate_ids(dw, **fields) -> list[int]:
    req = pb.GenerateRequest(**({"context": DOC, "prompt": "what jumps?", "max_new_tokens": 6, "policy": "streaming",
                                 "kept": 0.5} | fields))
    return [t async for m in dw.generate(req, {"authorization": "Bearer ka"}) if m.HasField("delta")
            for t in m.delta.token_ids]


async def test_models_lists_the_served_model(stack):
    _, ingress = stack
    models = await client(ingress).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert (await client(ingress).models.retrieve(MODEL)).owned_by == "headwise"


async def test_document_is_reused_and_equals_generate(stack):
    dw, ingress = stack
    cold = await chat(ingress)
    warm = await chat(ingress)
    ref = await generate_ids(dw)
    assert cold.headwise["store_status"] == "stored" and cold.usage.prompt_tokens_details.cached_tokens == 0
    assert warm.headwise["store_status"] == "reused" and warm.usage.prompt_tokens_details.cached_tokens > 0
    assert warm.headwise["token_ids"] == cold.headwise["token_ids"] == ref and len(ref) == 6
    assert warm.choices[0].message.content == cold.choices[0].message.content != ""
    assert cold.usage.completion_tokens == 6 and cold.choices[0].finish_reason == "length"
    assert cold.usage.total_tokens == cold.usage.prompt_tokens + 6
    assert cold.headwise["held_kv_bytes"] < cold.headwise["full_kv_bytes"]


async def test_stream_carries_the_same_answer_usage_and_figures(stack):
    _, ingress = stack
    whole = await chat(ingress)
    chunks = [c async for c in await chat(ingress, stream=True, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].headwise["store_status"] == "reused"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1


async def test_plain_string_is_one_shot(stack):
    dw, ingress = stack
    r = await chat(ingress, messages=[{"role": "user", "content": "hello there"}])
    assert r.headwise["conversation"] == "single" and r.headwise["reused_tokens"] == 0
    assert r.headwise["token_ids"] == await generate_ids(dw, context="", prompt="hello there")


async def test_other_tenant_never_reuses(stack):
    _, ingress = stack
    await chat(ingress, "ka")
    other = await chat(ingress, "kb")
    assert other.headwise["store_status"] == "stored" and other.headwise["reused_tokens"] == 0


async def test_earlier_turns_chain_onto_the_session(stack):
    dw, ingress = stack
    first = await chat(ingress)
    answer = first.choices[0].message.content
    follow = doc_messages() + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and then?"}]
    second = await chat(ingress, messages=follow)
    assert second.headwise["conversation"] == "chained"
    assert second.headwise["reused_tokens"] >= first.headwise["prompt_tokens"] - 1
    # the gRPC session path gives the same tokens for the same two turns
    await generate_ids(dw, session_id="grpc-s")
    assert second.headwise["token_ids"] == await generate_ids(dw, session_id="grpc-s", context="", prompt="and then?")
    # a third turn chains onto the second; a branch from the first turn does not see the second
    third = await chat(ingress, messages=follow + [{"role": "assistant", "content": second.choices[0].message.content},
                                                    {"role": "user", "content": "why?"}])
    branch = await chat(ingress, messages=follow[:2] + [{"role": "user", "content": "and then?"}])
    assert third.headwise["conversation"] == branch.headwise["conversation"] == "chained"
    assert branch.headwise["token_ids"] == second.headwise["token_ids"]


async def test_edited_history_is_replayed(stack):
    _, ingress = stack
    await chat(ingress)
    edited = doc_messages() + [{"role": "assistant", "content": "something else"}, {"role": "user", "content": "so?"}]
    r = await chat(ingress, messages=edited)
    assert r.headwise["conversation"] == "replayed" and r.headwise["reused_tokens"] > 0  # the document still is


def body_of(**fields) -> dict:
    return {"model": MODEL, "messages": doc_messages(), "max_tokens": 4} | fields


BAD = [  # (request body fields, status, error param, code)
    ({"model": "gpt-4o"}, 404, "model", "model_not_found"),
    ({"policy": "nope"}, 400, "policy", None),
    ({"kept": 0}, 400, "kept", None),
    ({"kept": 1.5}, 400, "kept", None),
    ({"max_tokens": 0}, 400, "max_tokens", None),
    ({"max_tokens": 33}, 400, "max_tokens", None),
    ({"stop": [f"s{i}" for i in range(17)]}, 400, "stop", None),
    ({"messages": doc_messages(doc="x" * 2000)}, 400, "messages", "context_length_exceeded"),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", None),
    ({"temperature": "hot"}, 400, "temperature", None),
    ({"n": 2}, 400, "n", None),
    ({"kep": 0.5}, 400, "kep", None),
]


@pytest.mark.parametrize("fields, status, param, code", BAD, ids=[f"{s}-{p}" for _, s, p, _ in BAD])
async def test_bad_request_gets_its_status_and_error_object(stack, fields, status, param, code):
    _, ingress = stack
    async with http(ingress) as h:
        r = await h.post("/v1/chat/completions", json=body_of(**fields), headers={"authorization": "Bearer ka"})
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param and err["code"] == code, err
    assert err["message"] and "Traceback" not in r.text


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer wrong"}], ids=["missing", "wrong"])
async def test_key_missing_or_wrong_is_401(stack, headers):
    _, ingress = stack
    async with http(ingress) as h:
        r = await h.post("/v1/chat/completions", json=body_of(), headers=headers)
        m = await h.get("/v1/models", headers=headers)
    assert r.status_code == m.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert ("Authorization: Bearer" in r.json()["error"]["message"]) == (not headers)
    with pytest.raises(openai.AuthenticationError):
        await chat(ingress, key="wrong")


async def test_malformed_body_is_400(stack):
    _, ingress = stack
    async with http(ingress) as h:
        r = await h.post("/v1/chat/completions", content=b"{not json", headers={"authorization": "Bearer ka"})
        nf = await h.get("/v1/nothing", headers={"authorization": "Bearer ka"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    assert nf.status_code == 404 and "error" in nf.json()


async def test_stream_limit_is_429(stack):
    dw, ingress = stack
    held = []
    for _ in range(2):  # acme's limit: two open streams
        g = dw.generate(pb.GenerateRequest(prompt="count", max_new_tokens=30), {"authorization": "Bearer ka"})
        await anext(g)
        held.append(g)
    with pytest.raises(openai.RateLimitError) as e:
        await chat(ingress)
    for g in held:
        await g.aclose()
    assert "limit 2" in e.value.body["message"] and e.value.status_code == 429
    assert (await chat(ingress)).headwise["store_status"] == "stored"  # the slots came back


async def test_closing_the_stream_stops_the_decode(stack):
    dw, ingress = stack
    from starlette.requests import Request

    body = json.dumps(body_of(max_tokens=30, stream=True)).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [(b"authorization", b"Bearer ka")],
             "query_string": b""}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    response = await ingress(Request(scope, receive))
    events = response.body_iterator
    got = [await anext(events) for _ in range(3)]  # role, then two tokens
    assert dw.active == 1
    await events.aclose()  # what a client disconnect does to the response's iteration
    rec = dw.recent[-1]
    assert got[1].startswith(b"data: {") and dw.active == 0 and rec.cancelled and not rec.finished and rec.tokens < 30


async def test_no_prefill_replica_is_503(stack):
    from ray.serve.exceptions import BackPressureError

    from services.decode.deployment import prefill_error

    dw, _ = stack

    async def no_replica(req):  # what Decode's handle call raises when Prefill's queue is full
        raise prefill_error(BackPressureError(num_queued_requests=9, max_queued_requests=8))

    full = DecodeWorker(dw.runner, dw.stores, no_replica, dw.tenants, dw.settings)
    with pytest.raises(openai.InternalServerError) as e:
        await chat(OpenAIIngress(full, MODEL, ("streaming",)))
    assert e.value.status_code == 503 and e.value.body["code"] == "service_unavailable"
    assert e.value.response.headers["retry-after"] == "1"
