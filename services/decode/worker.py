"""Decode without Ray: authenticate, ask prefill for the handle, fetch, decode, recall, stream.

Orchestrated decode-first (ray.serve.llm's prefill/decode pattern): this worker is the
ingress, calls prefill for a cache handle, fetches the chain of segments from the store
and generates. The replica's streams step together in one decode loop (DecodeBatcher), which
hands each stream its tokens through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections import OrderedDict, deque
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Awaitable, Callable

from headwise.cache.codec import encoded_nbytes
from headwise.cache.compact import CompactCache
from services.asyncutil import quiet
from services.decode.batcher import DecodeBatcher
from services.decode.recall import Recall
from services.decode.request import check_request
from services.errors import ServiceError, exhausted
from services.handoff import NOT_STORED, CacheHandle, PrefillRequest
from services.kvstore.errors import StoreError
from services.metrics import Metrics
from services.protos.headwise.v1 import generate_pb2 as pb
from services.store import fallback_status
from services.tenancy import TenantRegistry

log = logging.getLogger("headwise.decode")
MAX_SESSIONS = 1024
STREAMS = "streams"  # the kvstore semaphore holding each tenant's concurrent streams


@dataclass
class Session:
    context: str
    history: list[list[int]]  # segments after the context, then the last answer


@dataclass
class RequestLog:
    """What one request did, kept for the last few requests (tests and `stats`)."""

    tenant: str
    tokens: int = 0
    max_new_tokens: int = 0
    cancelled: bool = False
    finished: bool = False
    figures: dict = field(default_factory=dict)


class TextStream:
    """Incremental detokenization: emit only whole characters, in order."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True) if self.tok is not None else ""
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    @property
    def text(self) -> str:
        return self.sent


class DecodeWorker:
    def __init__(self, runner, stores, prefill: Callable[[PrefillRequest], Awaitable[CacheHandle]],
                 tenants: TenantRegistry, settings, metrics: Metrics | None = None):
        self.runner, self.stores, self.prefill, self.tenants, self.settings = runner, stores, prefill, tenants, settings
        self.metrics = metrics or Metrics()
        # one model thread steps, samples and streams every live stream (continuous batching)
        self.batcher = DecodeBatcher(runner, settings.decode_max_batch)
        self.sessions: OrderedDict[tuple[str, str], Session] = OrderedDict()
        self.recent: deque[RequestLog] = deque(maxlen=64)
        self.active = 0

    def stats(self) -> dict:
        return {"active": self.active, "recent": [vars(r) | {} for r in self.recent],
                "batching": self.batcher.figures()}

    # ---- the request --------------------------------------------------------------
    async def generate(self, request, metadata, parent_session: str | None = None) -> AsyncIterator[pb.GenerateResponse]:
        """One Generate stream. `parent_session`, when given, is the session this turn continues
        instead of `request.session_id` ("" = none): its record is read, `request.session_id`'s is
        written. The OpenAI ingress keys each turn of a stateless conversation by its messages, so
        two branches from one turn never overwrite each other's history."""
        t0 = time.perf_counter()
        tenant_id, code, rec = "unauthenticated", "OK", None
        try:
            tenant = self.tenants.authenticate(metadata)
            tenant_id = tenant.id
            params = check_request(request, self.settings)
            with self._replica_slot(tenant):  # this replica's count first (no store call), then the cluster's
                async with self._cluster_slot(tenant):
                    rec = RequestLog(tenant.id, max_new_tokens=params.max_new_tokens)
                    self.recent.append(rec)
                    self.active += 1
                    try:
                        async for msg in self._generate(request, tenant, params, rec, t0, parent_session):
                            yield msg
                        rec.finished = True
                    except (asyncio.CancelledError, GeneratorExit):
                        rec.cancelled = True  # before the slot is given back (an await)
                        raise
                    finally:
                        self.active -= 1
        except ServiceError as e:
            code = e.code
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            figures = rec.figures | {"decode_tokens": rec.tokens} if rec is not None and rec.finished else None
            self.metrics.request(tenant_id, code, figures)

    @contextmanager
    def _replica_slot(self, tenant):
        with ExitStack() as stack:
            try:
                stack.enter_context(self.tenants.stream(tenant))
            except ServiceError:
                self.metrics.stream_rejected(tenant.id, "replica")
                raise
            yield

    @asynccontextmanager
    async def _cluster_slot(self, tenant):
        """One of the tenant's `max_streams` slots across all decode replicas (a kvstore semaphore),
        renewed while the stream lives and given back at its end. When the store cannot be asked,
        the replica's own count (above) is the limit, and the request goes on."""
        store = self.stores.for_tenant(tenant.id)
        holder, ttl = secrets.token_hex(12), self.settings.stream_lease_s
        try:
            granted, held = await store.acquire(STREAMS, holder, tenant.max_streams, ttl)
        except StoreError as e:  # any StoreError: unreachable, or an older kvstore
            log.warning("cluster-wide stream limit not checked (%s); this replica's limit applies", e)
            yield
            return
        if not granted:
            self.metrics.stream_rejected(tenant.id, "cluster")
            raise exhausted(f"tenant {tenant.id!r} already has {held} open streams across the cluster "
                            f"(limit {tenant.max_streams}); wait for one to finish")
        async with store.holding(STREAMS, holder, tenant.max_streams, ttl, self.settings.store_timeout_s):
            yield  # given back before the request ends, so the tenant's next request finds the slot free

    async def _prefill_request(self, request, tenant, parent_session: str | None = None) -> PrefillRequest:
        read = request.session_id if parent_session is None else parent_session
        session = await self._session(tenant.id, read) if read else None
        context = request.context
        if session is not None:
            if context and context != session.context:
                raise ServiceError("INVALID_ARGUMENT", f"session {request.session_id!r} is about another context; "
                                   "send the same context (or none) or use a new session_id")
            context = session.context
        return PrefillRequest(
            tenant=tenant.id, salt=tenant.salt, context=context, prompt=request.prompt,
            answer_prefix=request.answer_prefix, policy=request.policy, kept=request.kept,
            history=tuple(tuple(s) for s in session.history) if session else (), session=bool(request.session_id),
            kv_precision=request.kv_precision,
            query_aware=request.query_aware,
        )

    async def _generate(self, request, tenant, params, rec: RequestLog, t0: float, parent_session: str | None):
        preq = await self._prefill_request(request, tenant, parent_session)
        handle = await self.prefill(preq)
        handle, cache, fetched = await self._load(preq, handle)
        threshold = self.settings.recall_threshold if (request.recall and self.settings.recall) else None
        recall = (Recall(handle.keys[0], cache, self.stores.for_tenant(tenant.id))
                  if threshold is not None and handle.keys else None)  # private: nothing stored to recall
        text = TextStream(self.runner.tokenizer)
        ids: list[int] = []
        t_first = t_last = None
        stream = self.batcher.open(cache, handle.logits, params, threshold if recall else None, recall)
        try:
            async for tok in stream:
                t_last = time.perf_counter()
                t_first = t_first or t_last
                ids.append(tok)
                rec.tokens = len(ids)
                delta = text.push(tok)
                yield pb.GenerateResponse(delta=pb.TokenDelta(text=delta, token_ids=[tok]))
        finally:
            stream.close()  # a client gone mid-stream: its row leaves the batch at the next step
        if request.session_id:
            await self._remember(tenant.id, request.session_id, preq.context, handle, ids)
        n = len(ids)
        figures = pb.Figures(
            prompt_tokens=handle.prompt_tokens, reused_tokens=handle.reused_tokens,
            full_kv_bytes=handle.full_kv_bytes, held_kv_bytes=handle.held_kv_bytes,
            wire_bytes=handle.wire_bytes + fetched, realised_kept=handle.realised_kept,
            recalls=recall.count if recall else 0, ttft_s=(t_first or time.perf_counter()) - t0,
            decode_tok_s=(n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else 0.0,
            store_status=handle.store_status, policy=handle.policy,
            finish_reason=self._finish_reason(ids, text.text, params),
            stored_kv_bytes=handle.stored_kv_bytes, kv_precision=handle.kv_precision,
        )
        rec.figures = {f.name: v for f, v in figures.ListFields()}
        yield pb.GenerateResponse(figures=figures)

    def _finish_reason(self, ids: list[int], text: str, params) -> str:
        if ids and ids[-1] in self.runner.eos_ids:
            return "eos"
        if params.stop and any(s in text for s in params.stop):
            return "stop"
        return "length"

    # ---- sessions: this replica's LRU in front of the store, so any replica can take the next turn
    @staticmethod
    def _session_key(session_id: str) -> str:
        return "session-" + hashlib.blake2b(session_id.encode(), digest_size=16).hexdigest()

    async def last_answer(self, tenant: str, session_id: str) -> tuple[str, str] | None:
        """(context, text of the last answer) of a kept session; None when there is none."""
        session = await self._session(tenant, session_id)
        if session is None or not session.history or self.runner.tokenizer is None:
            return None
        return session.context, self.runner.tokenizer.decode(session.history[-1], skip_special_tokens=True)

    async def _session(self, tenant: str, session_id: str) -> Session | None:
        session = self.sessions.get((tenant, session_id))
        if session is not None:
            return session
        try:
            data = await self.stores.for_tenant(tenant).get_record(self._session_key(session_id))
        except StoreError as e:
            log.warning("session %r not on this replica and the store cannot be asked: %s", session_id, e)
            return None
        if data is None:
            return None
        try:
            d = json.loads(data)
            session = Session(str(d["context"]), [[int(t) for t in seg] for seg in d["history"]])
        except (ValueError, KeyError, TypeError) as e:
            log.warning("stored session %r is unreadable, starting afresh: %s", session_id, e)
            return None
        self._cache_session(tenant, session_id, session)
        return session

    async def _remember(self, tenant: str, session_id: str, context: str, handle: CacheHandle, answer: list[int]) -> None:
        session = Session(context, [list(s) for s in handle.segment_tokens[1:]] + [answer])
        self._cache_session(tenant, session_id, session)
        data = json.dumps({"context": session.context, "history": session.history}, separators=(",", ":")).encode()
        try:
            await self.stores.for_tenant(tenant).put_record(self._session_key(session_id), data,
                                                            self.settings.session_ttl_s)
        except StoreError as e:
            log.warning("session %r kept on this replica only: %s", session_id, e)

    def _cache_session(self, tenant: str, session_id: str, session: Session) -> None:
        self.sessions[(tenant, session_id)] = session
        self.sessions.move_to_end((tenant, session_id))
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)

    # ---- fetching the chain -------------------------------------------------------
    async def _load(self, preq: PrefillRequest, handle: CacheHandle) -> tuple[CacheHandle, CompactCache, int]:
        """The handle's cache, from the store; a miss is recomputed once, a dead store bypassed."""
        if handle.inline_segments is not None:
            return handle, await self._join(handle.inline_segments), 0
        try:
            for attempt in range(2):
                segs, fetched = await self._fetch(preq.tenant, handle)
                if segs is not None:
                    return handle, await self._join(segs), fetched
                log.warning("stored chain failed to load (attempt %d): recomputing", attempt + 1)
                handle = await self.prefill(replace(preq, recompute=True))
                if handle.inline_segments is not None:
                    return handle, await self._join(handle.inline_segments), 0
        except StoreError as e:  # unavailable, or any other failure: a request never fails for the store
            log.warning("kvstore failed for decode, asking prefill for the cache inline: %s", e)
            status = fallback_status(e)
        else:
            status = NOT_STORED  # stored, but evicted twice before decode read it (a quota too small for the load)
        handle = await self.prefill(replace(preq, inline=True))
        handle.store_status = status
        return handle, await self._join(handle.inline_segments), 0

    async def _join(self, segments: list[CompactCache]) -> CompactCache:
        """The chain as one cache, joined on the model thread (the event loop runs no parallel
        torch work: services/decode/batcher.py, "Threads and OpenMP")."""
        return segments[0] if len(segments) == 1 else await self.batcher.run(CompactCache.concat, segments)

    async def _fetch(self, tenant: str, handle: CacheHandle) -> tuple[list[CompactCache] | None, int]:
        store = self.stores.for_tenant(tenant)
        segs, nbytes = [], 0
        try:
            for key in handle.keys:
                seg = await store.get(key)
                if seg is None:
                    return None, nbytes
                segs.append(seg)
                nbytes += encoded_nbytes(seg, handle.kv_precision)  # the bytes Get carried
        finally:
            for key in handle.ephemeral:
                asyncio.ensure_future(quiet(store.delete(key)))
        return segs, nbytes

