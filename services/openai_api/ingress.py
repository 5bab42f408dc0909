"""The OpenAI-compatible HTTP API on the Serve HTTP port: a thin layer over the decode worker.

`OpenAIIngress(worker, model)` is what the Decode deployment's `__call__` hands each HTTP
request to (Ray Serve passes a starlette Request and sends back the Response it returns).
Each chat completion becomes one `DecodeWorker.generate` stream, the same call gRPC
`Generate` makes, so tokenizing, reuse, compression, recall and decode are one code path.

Errors before the first token get their HTTP status; an error after the stream has started
is sent as an SSE event `{"error": {...}}`. A client that disconnects cancels the request
(Ray Serve's HTTP proxy cancels the replica's call), which stops the decode at the next token.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.errors import ServiceError
from services.openai_api import protocol as p
from services.protos.headwise.v1 import generate_pb2 as pb

log = logging.getLogger("headwise.openai")
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(e: p.APIError) -> JSONResponse:
    headers = {401: {"www-authenticate": "Bearer"}, 429: {"retry-after": "1"}, 503: {"retry-after": "1"}}
    return JSONResponse(e.body(), status_code=e.status, headers=headers.get(e.status))


def internal(e: BaseException) -> p.APIError:
    return p.APIError(500, f"internal error ({type(e).__name__}); the server log has the details", "server_error")


class OpenAIIngress:
    def __init__(self, worker, model: str, policies: tuple[str, ...]):
        self.worker, self.model = worker, model
        self.limits = p.Limits(model, worker.settings.max_new_tokens, tuple(policies))
        self.created = int(time.time())

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except p.APIError as e:
            return error_response(e)
        except ServiceError as e:
            return error_response(p.from_service_error(e))
        except Exception as e:  # noqa: BLE001 - a client gets an error object, never a traceback
            log.exception("OpenAI API request failed")
            return error_response(internal(e))

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path.rstrip("/"), request.method
        routes = {"/v1/chat/completions": ("POST", self.chat), "/v1/models": ("GET", self.models)}
        if path.startswith("/v1/models/"):
            routes[path] = ("GET", self.one_model)
        if path not in routes:
            raise p.APIError(404, f"no route {method} {path}; this server has POST /v1/chat/completions and "
                             "GET /v1/models", code="unknown_url")
        want, handler = routes[path]
        if method != want:
            raise p.APIError(405, f"{path} takes {want}, not {method}", code="method_not_allowed")
        return await handler(request)

    def _authenticate(self, request: Request):
        try:
            return self.worker.tenants.authenticate(request.headers.items())
        except ServiceError as e:
            if e.message.startswith("no API key"):  # the registry speaks of gRPC metadata
                raise p.APIError(401, "no API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key") from None
            raise

    async def models(self, request: Request) -> Response:
        self._authenticate(request)
        return JSONResponse(p.models_body(self.model, self.created))

    async def one_model(self, request: Request) -> Response:
        self._authenticate(request)
        name = request.url.path.rstrip("/").removeprefix("/v1/models/")
        if name != self.model:
            raise p.APIError(404, f"the model {name!r} does not exist; this server serves {self.model!r}",
                             param="model", code="model_not_found")
        return JSONResponse(p.model_body(self.model, self.created))

    # ---- chat completions -------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        tenant = self._authenticate(request)
        call = p.parse_chat(p.parse_json(await _body(request)), self.limits)
        parent, mode = await self._map_conversation(tenant.id, call)
        metadata = dict(request.headers.items())
        stream = self.worker.generate(call.request, metadata, parent_session=parent)
        try:
            first = await anext(stream)  # auth, limits, prefill: errors here get their HTTP status
        except StopAsyncIteration:
            raise p.APIError(500, "the stream ended before its figures", "server_error") from None
        cid = "chatcmpl-" + secrets.token_hex(12)
        if call.stream:
            return StreamingResponse(self._events(call, cid, mode, first, stream), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return JSONResponse(await self._complete(call, cid, mode, first, stream))

    async def _map_conversation(self, tenant: str, call: p.ChatCall) -> tuple[str | None, str]:
        """Fill the request's context / prompt / session_id; returns (parent session, mapping)."""
        conv, req = call.conversation, call.request
        req.context = conv.document
        if not p.keeps_session(conv):
            req.prompt = p.first_question(conv, conv.question)
            return None, p.SINGLE
        n = len(conv.turns) + 1
        req.session_id = p.session_id(self.model, conv, n)
        if not conv.turns:
            req.prompt = p.first_question(conv, conv.question)
            return "", p.SINGLE  # a fresh session, even if this turn was asked before
        parent = p.session_id(self.model, conv, n - 1)
        held = await self.worker.last_answer(tenant, parent)
        if held is not None and held[0] == conv.document and p.same_answer(held[1], conv.turns[-1].answer):
            req.prompt = conv.question
            return parent, p.CHAINED
        req.prompt = p.replay_question(conv)
        return "", p.REPLAYED

    async def _complete(self, call, cid, mode, first, stream) -> dict:
        text, ids, figures = [], [], None
        async for msg in _chain(first, stream):
            if msg.HasField("delta"):
                text.append(msg.delta.text)
                ids += msg.delta.token_ids
            else:
                figures = msg.figures
        ext = p.headwise_figures(figures, mode, ids if call.return_token_ids else None)
        return p.completion_body(call, cid, self.model, "".join(text), figures, len(ids), ext)

    async def _events(self, call, cid, mode, first, stream) -> AsyncIterator[bytes]:
        ids = []
        try:
            yield p.sse(p.chunk_body(call, cid, self.model, {"role": "assistant", "content": ""}))
            async for msg in _chain(first, stream):
                if msg.HasField("delta"):
                    ids += msg.delta.token_ids
                    if msg.delta.text:
                        yield p.sse(p.chunk_body(call, cid, self.model, {"content": msg.delta.text}))
                    continue
                ext = p.headwise_figures(msg.figures, mode, ids if call.return_token_ids else None)
                yield p.sse(p.chunk_body(call, cid, self.model, {}, p.finish_reason(msg.figures), headwise=ext))
                if call.include_usage:
                    yield p.sse(p.chunk_body(call, cid, self.model, None, usage=p.usage(msg.figures, len(ids))))
            yield p.sse("[DONE]")
        except ServiceError as e:  # after the headers: the error is the stream's last event
            yield p.sse(p.from_service_error(e).body())
        except Exception as e:  # noqa: BLE001
            log.exception("OpenAI API stream failed")
            yield p.sse(internal(e).body())
        finally:
            await stream.aclose()


async def _chain(first: pb.GenerateResponse, rest) -> AsyncIterator[pb.GenerateResponse]:
    yield first
    async for msg in rest:
        yield msg


async def _body(request: Request) -> bytes:
    """The body, refused once it passes MAX_BODY_BYTES (never read whole into memory first)."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > p.MAX_BODY_BYTES:
            raise p.APIError(413, f"request body over the limit of {p.MAX_BODY_BYTES} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def asgi_app(ingress: OpenAIIngress):
    """The ingress as a plain ASGI app (what Ray Serve does with a deployment's `__call__`): for tests."""

    async def app(scope, receive, send):
        response = await ingress(Request(scope, receive))
        await response(scope, receive, send)

    return app
