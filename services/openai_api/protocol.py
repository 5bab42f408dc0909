"""The OpenAI chat-completions protocol as headwise speaks it: parse, validate, map, answer.

Pure (no Ray, no network, no model): `parse_chat` turns a request body into a `ChatCall`
(every bad field an `APIError` naming it), `plan` maps the conversation onto Generate's
document / question / session chain, and the `*_body` functions build the response objects.
The ingress (`services/openai_api/ingress.py`) only moves bytes between these and the decode
worker, so the HTTP API and gRPC `Generate` share one code path. Conventions: docs/openai.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field

from services.decode.request import MAX_STOP_BYTES, MAX_STOP_STRINGS, MAX_TEXT_BYTES
from services.errors import ServiceError
from services.protos.headwise.v1 import generate_pb2 as pb

MAX_BODY_BYTES = 4 * MAX_TEXT_BYTES  # a document at the text limit, JSON-escaped, with its turns
DOCUMENT_SEPARATOR = "\n\n"  # between the document's text parts
# Standard fields headwise accepts but does not act on (clients send them by default).
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key"})
# Standard fields accepted only at their "off" value: anything else is a 400 naming the field.
OFF_VALUES = {"n": (1, None), "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
              "logprobs": (False, None), "top_logprobs": (0, None), "logit_bias": ({}, None), "tools": ([], None),
              "tool_choice": ("none", None), "response_format": ({"type": "text"}, None)}
STANDARD = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                      "temperature", "top_p", "seed", "stop"}) | IGNORED | set(OFF_VALUES)
# headwise's own fields (`extra_body` in the openai client).
EXTRA = frozenset({"policy", "kept", "recall", "answer_prefix", "return_token_ids"})

# grpc.StatusCode name of a ServiceError -> (HTTP status, OpenAI error type, code)
STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error", None),
    "UNAUTHENTICATED": (401, "invalid_request_error", "invalid_api_key"),
    "PERMISSION_DENIED": (403, "invalid_request_error", None),
    "NOT_FOUND": (404, "invalid_request_error", None),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UNAVAILABLE": (503, "service_unavailable", "service_unavailable"),
    "DEADLINE_EXCEEDED": (504, "timeout", "timeout"),
    "CANCELLED": (499, "cancelled", None),
}
# the GenerateRequest field a worker's message starts with -> the request field to name
PARAM_OF = (("max_new_tokens", "max_tokens"), ("kept", "kept"), ("unknown policy", "policy"), ("policy", "policy"),
            ("stop", "stop"), ("temperature", "temperature"), ("top_p", "top_p"), ("prompt of", "messages"),
            ("context", "messages"), ("prompt", "messages"), ("answer_prefix", "answer_prefix"),
            ("session", "messages"))


class APIError(Exception):
    """An error the client gets as `{"error": {...}}` with `status`; never a traceback."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_service_error(e: ServiceError) -> APIError:
    """The OpenAI error of a gRPC status from the shared path (auth, limits, prefill, decode)."""
    status, kind, code = STATUS.get(e.code, (500, "server_error", None))
    param = None
    if status == 400:
        param = next((p for prefix, p in PARAM_OF if e.message.lower().startswith(prefix)), None)
        if "exceeds the limit" in e.message or " bytes; the allowed prompt" in e.message:
            code = "context_length_exceeded"
    if status == 429 and "quota" in e.message:
        code = "insufficient_quota"
    return APIError(status, e.message, kind, param, code)


# ---- the request --------------------------------------------------------------------------
@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class Conversation:
    """The messages as headwise reads them: instructions, a document, answered turns, the question."""

    system: str  # system/developer messages before the first user message, joined
    document: str  # every text part of the first user message but its last ("" = none)
    turns: tuple[Turn, ...]  # earlier (question, answer) pairs, in order
    question: str  # the last user message


@dataclass
class ChatCall:
    conversation: Conversation
    request: pb.GenerateRequest  # everything but context / prompt / session_id (set by `plan`)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(frozen=True)
class Limits:
    model: str  # the served model id
    max_new_tokens: int  # Settings.max_new_tokens
    policies: tuple[str, ...]  # allowed policy names


def served_model(settings) -> str:
    """The model id the API serves: the model directory's name (e.g. SmolLM2-135M-Instruct)."""
    from headwise.models import resolve_model_path

    return resolve_model_path(settings.model_path or None).name


def parse_json(raw: bytes) -> dict:
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {len(raw)} bytes is over the limit of {MAX_BODY_BYTES} bytes",
                       code="request_too_large")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad("body", f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad("body", "the request body must be a JSON object")
    return body


def parse_chat(body: dict, limits: Limits) -> ChatCall:
    unknown = sorted(set(body) - STANDARD - EXTRA)
    if unknown:
        raise bad(unknown[0], f"unrecognized request argument supplied: {unknown[0]} (headwise's own fields: "
                  f"{', '.join(sorted(EXTRA))})")
    _check_off_values(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required: a model id from GET /v1/models")
    if model != limits.model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {limits.model!r}",
                       param="model", code="model_not_found")
    conversation = parse_messages(body.get("messages"))
    req = pb.GenerateRequest(
        policy=_policy(body, limits), kept=_kept(body), recall=_bool(body, "recall", False),
        answer_prefix=_text(body, "answer_prefix"), max_new_tokens=_max_tokens(body, limits),
        temperature=_number(body, "temperature", 0.0, 2.0, 0.0), top_p=_top_p(body), seed=_seed(body),
        stop=_stop(body.get("stop")),
    )
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad("stream_options", "stream_options must be an object with at most include_usage")
    include_usage = bool(options and _bool(options, "include_usage", False, "stream_options.include_usage"))
    if options is not None and not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    return ChatCall(conversation, req, stream, include_usage, _bool(body, "return_token_ids", False))


def _check_off_values(body: dict) -> None:
    for name, allowed in OFF_VALUES.items():
        if name in body and body[name] not in allowed:
            raise bad(name, f"{name}={json.dumps(body[name])[:60]} is not supported by headwise "
                      f"(allowed: {json.dumps(allowed[0])} or omit it)")


def _bool(body: dict, name: str, default: bool, label: str | None = None) -> bool:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(label or name, f"{label or name} must be true or false")
    return v


def _text(body: dict, name: str) -> str:
    v = body.get(name)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise bad(name, f"{name} must be a string")
    if len(v.encode()) > MAX_TEXT_BYTES:
        raise bad(name, f"{name} is over {MAX_TEXT_BYTES} bytes")
    return v


def _number(body: dict, name: str, lo: float, hi: float, default: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not (
            (lo < v if lo_open else lo <= v) and v <= hi):
        raise bad(name, f"{name}={v!r} is outside the allowed range {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _policy(body: dict, limits: Limits) -> str:
    name = body.get("policy")
    if name is None:
        return ""
    if not isinstance(name, str) or name not in limits.policies:
        raise bad("policy", f"unknown policy {name!r}; allowed: {', '.join(limits.policies)}")
    return name


def _kept(body: dict) -> float:
    # 0 is Generate's "server default", so an explicit kept must be in (0, 1]
    return _number(body, "kept", 0.0, 1.0, 0.0, lo_open=True)


def _max_tokens(body: dict, limits: Limits) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    v = body.get(name)
    if v is None:
        return 0  # the server's default
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limits.max_new_tokens:
        raise bad(name, f"{name}={v!r} is outside the allowed range [1, {limits.max_new_tokens}]")
    return v


def _top_p(body: dict) -> float:
    return _number(body, "top_p", 0.0, 1.0, 1.0, lo_open=True)


def _seed(body: dict) -> int:
    v = body.get("seed")
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
        raise bad("seed", f"seed={v!r} must be an integer in [0, 2^64)")
    return v


def _stop(v) -> list[str]:
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"{len(stops)} stop strings given; at most {MAX_STOP_STRINGS} are allowed")
    for s in stops:
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise bad("stop", f"stop string {s[:20]!r} must be 1 to {MAX_STOP_BYTES} bytes long")
    return stops


# ---- messages -----------------------------------------------------------------------------
def parse_messages(messages) -> Conversation:
    """System first, then user / assistant turns alternating, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    system, i = [], 0
    while i < len(messages) and _role(messages, i) in ("system", "developer"):
        system.append(_content_text(messages, i))
        i += 1
    turns: list[str] = []  # user, assistant, user, ...
    document = ""
    for j in range(i, len(messages)):
        role = _role(messages, j)
        want = "user" if (j - i) % 2 == 0 else "assistant"
        if role != want:
            raise bad(f"messages[{j}].role", f"messages[{j}] is a {role!r} message where a {want!r} one is "
                      "expected: system messages first, then user and assistant turns alternating, "
                      "ending with a user message")
        if role == "user":
            parts = _parts(messages, j)
            if len(parts) > 1:
                if j != i:
                    raise bad(f"messages[{j}].content", "a document (several text parts) may only open the "
                              "conversation: send it in the first user message")
                document = DOCUMENT_SEPARATOR.join(parts[:-1])
            turns.append(parts[-1])
        else:
            turns.append(_content_text(messages, j))
    if not turns or len(turns) % 2 == 0:
        raise bad("messages", "messages must end with a user message")
    for k in range(0, len(turns), 2):
        if not turns[k].strip():
            raise bad(f"messages[{i + k}].content", f"messages[{i + k}] has an empty question")
    pairs = tuple(Turn(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2))
    return Conversation("\n\n".join(s for s in system if s), document, pairs, turns[-1])


def _role(messages: list, j: int) -> str:
    m = messages[j]
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise bad(f"messages[{j}]", f"messages[{j}] must be an object with a role and a content")
    if m["role"] not in ("system", "developer", "user", "assistant"):
        raise bad(f"messages[{j}].role", f"messages[{j}].role={m['role']!r} is not supported; allowed: "
                  "system, developer, user, assistant")
    # a reply passed back as the client got it may carry empty tool_calls / refusal / audio fields
    unknown = sorted(k for k in set(m) - {"role", "content", "name"} if m[k] not in (None, [], ""))
    if unknown:
        raise bad(f"messages[{j}].{unknown[0]}", f"messages[{j}].{unknown[0]} is not supported by headwise")
    return m["role"]


def _parts(messages: list, j: int) -> list[str]:
    """The text parts of a message: a string is one part."""
    content = messages[j].get("content")
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list) or not content:
        raise bad(f"messages[{j}].content", f"messages[{j}].content must be a string or a non-empty list of "
                  "text parts")
    out = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad(f"messages[{j}].content[{k}]", f"messages[{j}].content[{k}] must be "
                      '{"type": "text", "text": "..."}: headwise reads text only')
        out.append(part["text"])
    return out


def _content_text(messages: list, j: int) -> str:
    return "".join(_parts(messages, j))


# ---- the conversation onto Generate -------------------------------------------------------
CHAINED, REPLAYED, SINGLE = "chained", "replayed", "single"


def session_id(model: str, conv: Conversation, turns: int) -> str:
    """The session that holds the conversation after its first `turns` questions are answered.

    Keyed by the messages themselves (so a stateless client finds it again by resending them)
    and namespaced per tenant by the decode worker."""
    qa = [[t.question, t.answer] for t in conv.turns[:turns - 1]]
    question = conv.turns[turns - 1].question if turns <= len(conv.turns) else conv.question
    data = json.dumps([model, conv.system, conv.document, qa, question], ensure_ascii=False).encode()
    return "oa-" + hashlib.blake2b(data, digest_size=16).hexdigest()


def keeps_session(conv: Conversation) -> bool:
    """A document conversation (or any with earlier turns) keeps its turns for the next one; a
    plain one-shot prompt keeps nothing beyond what Generate keeps."""
    return bool(conv.document or conv.turns)


def first_question(conv: Conversation, question: str) -> str:
    return f"{conv.system}\n\n{question}" if conv.system else question


def replay_question(conv: Conversation) -> str:
    """Earlier turns the server does not hold (edited, expired, from elsewhere) as text before the
    question: the document is still reused, the turns are prefilled afresh."""
    lines = [f"User: {t.question}\nAssistant: {t.answer}" for t in conv.turns]
    return first_question(conv, "Earlier in this conversation:\n" + "\n".join(lines) + f"\n\nUser: {conv.question}")


def same_answer(held: str, sent: str) -> bool:
    return held.rstrip("\ufffd").strip() == sent.strip()


# ---- responses ----------------------------------------------------------------------------
def finish_reason(figures: pb.Figures) -> str:
    return "length" if figures.finish_reason == "length" else "stop"  # eos and stop strings are both "stop"


def usage(figures: pb.Figures, completion_tokens: int) -> dict:
    return {"prompt_tokens": figures.prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": figures.prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": figures.reused_tokens}}


def headwise_figures(figures: pb.Figures, conversation: str, token_ids: list[int] | None) -> dict:
    """The extension object: every Generate figure, how the conversation was mapped, token ids if asked."""
    out = {d.name: getattr(figures, d.name) for d in pb.Figures.DESCRIPTOR.fields}
    out["realised_kept"] = round(out["realised_kept"], 6)
    out["conversation"] = conversation
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


def completion_body(call: ChatCall, cid: str, model: str, text: str, figures: pb.Figures, n: int, extension: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": call.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason(figures)}],
            "usage": usage(figures, n), "headwise": extension}


def chunk_body(call: ChatCall, cid: str, model: str, delta: dict, finish: str | None = None, **extra) -> dict:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    return {"id": cid, "object": "chat.completion.chunk", "created": call.created, "model": model,
            "choices": choices, **extra}


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def models_body(model: str, created: int) -> dict:
    return {"object": "list", "data": [model_body(model, created)]}


def model_body(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "headwise"}
