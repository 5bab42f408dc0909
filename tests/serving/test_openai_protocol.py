"""The OpenAI protocol mapping alone (services/openai_api/protocol.py): no model, no server."""

from __future__ import annotations

import pytest

from services.errors import ServiceError
from services.openai_api import protocol as p
from services.protos.headwise.v1 import generate_pb2 as pb

LIMITS = p.Limits("m", 256, ("full", "kvzip", "streaming"))


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def user(*parts: str) -> dict:
    return {"role": "user", "content": [text(t) for t in parts]} if len(parts) > 1 else {"role": "user", "content": parts[0]}


def assistant(t: str) -> dict:
    return {"role": "assistant", "content": t}


def parse(**fields) -> p.ChatCall:
    return p.parse_chat({"model": "m", "messages": [user("doc", "q")]} | fields, LIMITS)


def test_every_part_but_the_last_is_the_document():
    conv = p.parse_messages([user("page one", "page two", "the question")])
    assert conv.document == "page one\n\npage two" and conv.question == "the question" and conv.turns == ()
    one = p.parse_messages([user("just a prompt")])
    assert one.document == "" and one.question == "just a prompt" and not p.keeps_session(one)
    single_part = p.parse_messages([{"role": "user", "content": [text("only")]}])
    assert single_part.document == "" and single_part.question == "only"


def test_system_then_alternating_turns():
    conv = p.parse_messages([{"role": "system", "content": "be brief"}, user("doc", "q1"), assistant("a1"), user("q2")])
    assert conv.system == "be brief" and conv.document == "doc"
    assert conv.turns == (p.Turn("q1", "a1"),) and conv.question == "q2" and p.keeps_session(conv)
    assert p.first_question(conv, "q1") == "be brief\n\nq1"
    assert "User: q1\nAssistant: a1" in p.replay_question(conv) and p.replay_question(conv).endswith("User: q2")


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ("hello", "messages"),
    ([assistant("a")], "messages[0].role"),
    ([user("q"), user("q")], "messages[1].role"),
    ([user("q"), assistant("a")], "messages"),
    ([user("q"), {"role": "tool", "content": "x"}], "messages[1].role"),
    ([user("doc", "q"), assistant("a"), user("doc2", "q2")], "messages[2].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": []}], "messages[0].content"),
    ([{"role": "user", "content": "q", "tool_calls": [{"id": "t"}]}], "messages[0].tool_calls"),
    ([user("  ")], "messages[0].content"),
    (["not an object"], "messages[0]"),
])
def test_bad_messages_name_the_place(messages, param):
    with pytest.raises(p.APIError) as e:
        p.parse_messages(messages)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_a_reply_passed_back_with_empty_fields_is_a_turn():
    reply = {"role": "assistant", "content": "a1", "refusal": None, "tool_calls": [], "audio": None}
    assert p.parse_messages([user("doc", "q1"), reply, user("q2")]).turns == (p.Turn("q1", "a1"),)


def test_a_turn_writes_the_session_the_next_turn_reads():
    turn1 = p.parse_messages([user("doc", "q1")])
    turn2 = p.parse_messages([user("doc", "q1"), assistant("a1"), user("q2")])
    turn3 = p.parse_messages([user("doc", "q1"), assistant("a1"), user("q2"), assistant("a2"), user("q3")])
    assert p.session_id("m", turn1, 1) == p.session_id("m", turn2, 1) == p.session_id("m", turn3, 1)
    assert p.session_id("m", turn2, 2) == p.session_id("m", turn3, 2)
    ids = {p.session_id("m", turn3, k) for k in (1, 2, 3)}
    other_doc = p.parse_messages([user("other", "q1")])
    other_model = p.session_id("m2", turn1, 1)
    assert len(ids) == 3 and p.session_id("m", other_doc, 1) not in ids and other_model not in ids
    assert all(len(s.encode()) <= 128 for s in ids)  # the Generate session_id limit


def test_fields_map_onto_the_generate_request():
    call = parse(max_tokens=12, temperature=0.5, top_p=0.9, seed=7, stop="END", policy="kvzip", kept=0.25,
                 recall=True, answer_prefix="The code is", stream=True, stream_options={"include_usage": True})
    r = call.request
    assert (r.max_new_tokens, r.temperature, r.top_p, r.seed, list(r.stop)) == (12, 0.5, pytest.approx(0.9), 7, ["END"])
    assert (r.policy, r.kept, r.recall, r.answer_prefix) == ("kvzip", 0.25, True, "The code is")
    assert call.stream and call.include_usage
    d = parse().request  # omitted = Generate's defaults (greedy, server policy and kept, 64 tokens)
    assert (d.max_new_tokens, d.temperature, d.top_p, d.policy, d.kept) == (0, 0.0, 1.0, "", 0.0)
    assert parse(max_completion_tokens=5, max_tokens=9).request.max_new_tokens == 5


@pytest.mark.parametrize("fields, status, param", [
    ({"model": "other"}, 404, "model"),
    ({"model": None}, 400, "model"),
    ({"policy": "nope"}, 400, "policy"),
    ({"kept": 0}, 400, "kept"),
    ({"kept": 1.01}, 400, "kept"),
    ({"kept": "half"}, 400, "kept"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 257}, 400, "max_tokens"),
    ({"max_tokens": 2.5}, 400, "max_tokens"),
    ({"max_completion_tokens": 1000}, 400, "max_completion_tokens"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"temperature": float("nan")}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"seed": -1}, 400, "seed"),
    ({"stop": ["s"] * 17}, 400, "stop"),
    ({"stop": [""]}, 400, "stop"),
    ({"stop": 5}, 400, "stop"),
    ({"stream": "yes"}, 400, "stream"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"stream": True, "stream_options": {"x": 1}}, 400, "stream_options"),
    ({"n": 3}, 400, "n"),
    ({"logprobs": True}, 400, "logprobs"),
    ({"tools": [{"type": "function"}]}, 400, "tools"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty"),
    ({"kep": 0.5}, 400, "kep"),
])
def test_bad_fields_are_named(fields, status, param):
    with pytest.raises(p.APIError) as e:
        parse(**fields)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    assert e.value.body()["error"]["message"] == e.value.message


def test_off_values_and_ignored_fields_pass():
    call = parse(n=1, logprobs=False, frequency_penalty=0, tools=None, user="u", metadata={"a": "b"}, store=False)
    assert call.request.max_new_tokens == 0


def test_body_must_be_a_json_object_under_the_limit():
    assert p.parse_json(b'{"a": 1}') == {"a": 1}
    for raw in (b"{nope", b"[1, 2]", b"\xff\xfe"):
        with pytest.raises(p.APIError) as e:
            p.parse_json(raw)
        assert (e.value.status, e.value.param) == (400, "body")
    with pytest.raises(p.APIError) as e:
        p.parse_json(b" " * (p.MAX_BODY_BYTES + 1))
    assert e.value.status == 413


@pytest.mark.parametrize("code, message, status, param, err_code", [
    ("UNAUTHENTICATED", "no API key", 401, None, "invalid_api_key"),
    ("RESOURCE_EXHAUSTED", "tenant 'a' already has 2 open streams (limit 2)", 429, None, "rate_limit_exceeded"),
    ("RESOURCE_EXHAUSTED", "tenant 'a' is over its stored-bytes quota", 429, None, "insufficient_quota"),
    ("UNAVAILABLE", "no replica", 503, None, "service_unavailable"),
    ("INVALID_ARGUMENT", "prompt of 2000 tokens (document + question) exceeds the limit of 900 tokens", 400,
     "messages", "context_length_exceeded"),
    ("INVALID_ARGUMENT", "max_new_tokens=300 is outside the allowed range [1, 256]", 400, "max_tokens", None),
    ("INVALID_ARGUMENT", "policy 'full' rejected kept=0.5", 400, "policy", None),
    ("INTERNAL", "decode failed", 500, None, None),
])
def test_service_errors_map_to_http(code, message, status, param, err_code):
    e = p.from_service_error(ServiceError(code, message))
    assert (e.status, e.param, e.code) == (status, param, err_code) and e.message == message


def test_response_bodies():
    figures = pb.Figures(prompt_tokens=100, reused_tokens=90, full_kv_bytes=1000, held_kv_bytes=250,
                         realised_kept=0.25, store_status="reused", policy="kvzip(kept=0.25)", finish_reason="eos")
    call = parse()
    body = p.completion_body(call, "chatcmpl-1", "m", "hi", figures, 3, p.headwise_figures(figures, p.SINGLE, None))
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103,
                             "prompt_tokens_details": {"cached_tokens": 90}}
    ext = body["headwise"]
    assert ext["held_kv_bytes"] == 250 and ext["store_status"] == "reused" and ext["conversation"] == "single"
    assert "token_ids" not in ext and set(ext) >= {d.name for d in pb.Figures.DESCRIPTOR.fields}
    assert p.finish_reason(pb.Figures(finish_reason="length")) == "length"
    usage_chunk = p.chunk_body(call, "c", "m", None, usage=body["usage"])
    assert usage_chunk["choices"] == [] and usage_chunk["object"] == "chat.completion.chunk"
    assert p.sse("[DONE]") == b"data: [DONE]\n\n"


def test_same_answer_ignores_surrounding_space_and_a_cut_character():
    assert p.same_answer(" 4817.\ufffd", "4817.") and not p.same_answer("4817", "4818")
