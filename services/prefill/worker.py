"""Prefill without Ray: segments, keys, reuse, compute, compress, store (DESIGN.md 2, steps 3-4).

The prompt is a chain of segments: the context (compressed by the requested policy), then
for a session the earlier turns, then the question (raw rows). Their keys chain; the
store's longest stored prefix is fetched and the model runs only over the rest, on top of
it. The question segment is always computed (its logits give the first token); it is
stored under a one-request key that decode deletes, unless a session will build on it.
The same compressed rows that are stored are the ones the question ran over, so a cold
request and a reused one decode from identical caches and give identical answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace

from headwise.cache import quant
from headwise.cache.codec import encoded_nbytes, stored_nbytes
from headwise.cache.compact import CompactCache
from headwise.cache.keys import chain_keys, segment_key
from headwise.errors import InvalidInput
from headwise.models.query_aware import check_query_aware
from headwise.policies import Policy, get_policy, policy_names
from headwise.policies.full import FullPolicy
from headwise.prompt import build_segments
from services.metrics import Metrics
from services.prefill.api import (
    BYPASSED,
    PARTIAL,
    PRIVATE,
    REUSED,
    STORED,
    CacheHandle,
    PrefillRequest,
    ServiceError,
    invalid,
)
from services.prefill.store import NotStored, fallback_status

log = logging.getLogger("headwise.prefill")
FILL_POLL_S = 0.25  # how often a request waiting for another replica's computation looks again
FILL_MAX_WAIT_LEASES = 5  # ... and how long it waits at most, in lease periods (5 min by default)

QUERY_AWARE_DEFAULT = "snapkv"  # an empty policy in a query-aware request (the server default may have no window)
_A, _B, _C = "\x00HW_A\x00", "\x00HW_B\x00", "\x00HW_C\x00"


def codec_version() -> int:
    try:
        from headwise.cache.codec import CODEC_VERSION

        return int(CODEC_VERSION)
    except ImportError:  # the codec lands with the kvstore; keys only need a stable number
        return 1


def default_policy_name(configured: str) -> str:
    """The configured default when it exists, else the best available query-agnostic one."""
    names = policy_names()
    for name in (configured, "kvzip", "razor", "streaming", "full"):
        if name in names:
            return name
    return names[0]


def resolve_policy(name: str, kept: float, default_name: str, default_kept: float) -> Policy:
    """A Policy for a request: empty name / zero kept take the server defaults."""
    name = name or default_policy_name(default_name)
    kept = float(kept) if kept else default_kept
    try:
        return get_policy(name, kept=kept)
    except InvalidInput as e:
        raise invalid(str(e)) from None
    except TypeError as e:  # a policy without a `kept` setting
        raise invalid(f"policy {name!r} rejected kept={kept}: {e}") from None


def resolve_precision(name: str, default: str) -> str:
    """The request's kv_precision, or the server default when empty; INVALID_ARGUMENT when unknown."""
    name = name or default
    if name not in quant.PRECISIONS:
        raise invalid(f"kv_precision {name!r} is not supported; allowed: {', '.join(quant.PRECISIONS)} (empty = {default})")
    return name


def describe(policy: Policy) -> str:
    params = {k: v for k, v in policy.params().items() if k != "policy"}
    return f"{policy.name}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


def followup_ids(tokenizer, last_answer: list[int], eos_ids: frozenset[int], question: str, prefix: str) -> list[int]:
    """Tokens of a later turn: the previous answer, the template between turns, the question."""
    msgs = [{"role": "user", "content": _A}, {"role": "assistant", "content": _B}, {"role": "user", "content": _C}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        between, tail = text.split(_B)[1].split(_C)
    else:
        between, tail = "\n\n", "\n\nAnswer: "
    answer = list(last_answer)
    if answer and answer[-1] in eos_ids:  # the template between turns writes the end of turn itself
        answer = answer[:-1]
    return answer + list(tokenizer(between + question + tail + prefix, add_special_tokens=False).input_ids)


@dataclass
class _Plan:
    segments: list[list[int]]
    policies: list[Policy]
    keys: list[str]  # chain keys (what a later request looks up)
    store_keys: list[str]  # where each segment is put (the question's may be one-request)
    ephemeral: list[str]
    precision: str = "fp32"  # of the stored rows (part of every key)


@dataclass
class _Computed:
    logits: object  # [V] after the segment
    segment: CompactCache  # the segment as computed: what is put (quantised once, on the way out)
    stored: CompactCache  # its rows as the store gives them back: what decode and later segments use
    prev: CompactCache | None  # the cache the segment was computed on
    whole: CompactCache | None = None  # prev + stored, built when a later segment needs it

    @property
    def cache(self) -> CompactCache:
        """The whole cache so far, over stored rows (a copy of every row: built only when needed,
        so a request's last segment, whose cache decode fetches from the store, never pays it)."""
        if self.whole is None:
            s = self.stored
            self.whole = self.prev.extended(s) if self.prev is not None else CompactCache(
                [replace(lc) for lc in s.layers], s.seq_len, s.start, dict(s.meta))
        return self.whole


class PrefillWorker:
    """One model, one thread for it; requests interleave on the event loop between model calls."""

    def __init__(self, runner, stores, settings, cache_bytes: int = 512 * 1024**2, metrics: Metrics | None = None):
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.stores = stores
        self.settings = settings
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-model")
        self._inflight: dict[str, asyncio.Future] = {}  # context key -> the lease of the request computing it
        self.single_flight_waits = 0  # requests that waited for this replica's computation of their context
        self.cluster_waits = 0  # ... for another replica's
        # Recently used reusable segments of this replica, so a reused document is not fetched
        # twice (here and in decode). The store stays the authority: a key is used only after
        # lookup says it is stored. Keys carry the tenant salt, so this never crosses tenants.
        self._recent: OrderedDict[str, CompactCache] = OrderedDict()
        self._recent_budget, self._recent_bytes = cache_bytes, 0

    async def _model(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- planning -----------------------------------------------------------------
    def plan(self, req: PrefillRequest, policy: Policy, precision: str = "fp32") -> _Plan:
        tok = self.runner.tokenizer
        if req.history:
            ctx = build_segments(tok, req.context, "", "").context
            *earlier, last_answer = [list(s) for s in req.history]
            question = followup_ids(tok, last_answer, self.runner.eos_ids, req.prompt, req.answer_prefix)
            segments = [ctx, *earlier, question]
        else:
            seg = build_segments(tok, req.context, req.prompt, req.answer_prefix)
            segments = [seg.context, seg.question]
        self.check_length(sum(len(s) for s in segments))
        full = FullPolicy()
        policies = [policy] + [full] * (len(segments) - 1)
        salt = req.salt if policy.reusable else f"{req.salt}:{secrets.token_hex(8)}"
        cv = codec_version()
        keys = list(chain_keys(segments, self.runner.name, [p.params() for p in policies], cv, salt, precision))
        store_keys, ephemeral = list(keys), []
        if not policy.reusable:
            ephemeral.append(keys[0])
        if not req.session:  # nobody will build on this question: one-request key, deleted by decode
            store_keys[-1] = segment_key(keys[-2] if len(keys) > 1 else None, segments[-1], self.runner.name,
                                         full.params(), cv, f"{salt}:{secrets.token_hex(8)}", precision)
            ephemeral.append(store_keys[-1])
        return _Plan(segments, policies, keys, store_keys, ephemeral, precision)

    async def _query_aware(self, req: PrefillRequest, policy: Policy) -> CacheHandle:
        """Document + question prefilled together, the document compressed with the question as the
        policy's window (headwise/models/query_aware.py). The cache depends on the question, so the
        store is never asked: no lookup, no put, no keys; the segments go to decode through Ray."""
        if req.history or req.session:
            raise invalid("query_aware is for one-shot requests (its cache depends on the question and is never "
                          "kept); leave session_id empty or set query_aware false")
        try:
            check_query_aware(policy)
        except InvalidInput as e:
            raise invalid(str(e)) from None
        seg = build_segments(self.runner.tokenizer, req.context, req.prompt, req.answer_prefix)
        self.check_length(len(seg.context) + len(seg.question))
        res = await self._model(self.runner.prefill_query_aware, seg.context, seg.question, policy)
        plan = _Plan([seg.context, seg.question], [policy, FullPolicy()], [], [], [])
        handle = self._handle(plan, [res.document, res.question], res.logits, 0, 0, PRIVATE)
        handle.inline_segments = [res.document, res.question]
        return handle

    def check_length(self, n: int) -> None:
        limit = min(self.settings.max_prompt_tokens, self.runner.max_positions - 1)
        if n > limit:
            raise invalid(f"prompt of {n} tokens (document + question + answer prefix) exceeds the limit of "
                          f"{limit} tokens; shorten the context to at most {limit} tokens in all")

    # ---- the request --------------------------------------------------------------
    async def prefill(self, req: PrefillRequest) -> CacheHandle:
        t0 = time.perf_counter()
        default = QUERY_AWARE_DEFAULT if req.query_aware else self.settings.default_policy
        policy = resolve_policy(req.policy, req.kept, default, self.settings.default_kept)
        precision = resolve_precision(req.kv_precision, self.settings.default_kv_precision)
        plan = None if req.query_aware else self.plan(req, policy, precision)
        if plan is None:  # query-aware: private, the store is never asked
            handle = await self._query_aware(req, policy)
        elif req.inline:
            handle = await self._bypass(plan, [], None)
        else:
            try:
                handle = await self._with_store(req, plan, policy)
            except ServiceError:
                raise
            except self.stores.errors[0] as e:  # any store failure: answer without the store
                log.warning("kvstore failed, answering without it: %s", e)
                handle = await self._bypass(plan, [], None, fallback_status(e, self.stores.errors[1]))
        handle.policy = describe(policy)
        handle.prefill_s = time.perf_counter() - t0
        self.metrics.prefill(policy.name, handle.store_status, handle.prefill_s)
        return handle

    async def _with_store(self, req: PrefillRequest, plan: _Plan, policy: Policy) -> CacheHandle:
        store = self.stores.for_tenant(req.tenant)
        key, reusable = plan.keys[0], policy.reusable and not req.recompute
        lease = await self._lead(key) if reusable else None
        try:
            async with AsyncExitStack() as stack:
                if reusable and (slot := await self._lead_cluster(store, key)) is not None:
                    await stack.enter_async_context(store.holding(
                        *slot, 1, self.settings.fill_lease_s, self.settings.store_timeout_s))
                return await self._lookup_and_compute(req, plan, policy, store)
        finally:
            if lease is not None:
                self._release(key, lease)

    async def _lookup_and_compute(self, req: PrefillRequest, plan: _Plan, policy: Policy, store) -> CacheHandle:
        try:
            n = 0 if req.recompute or not policy.reusable else await store.lookup(plan.keys[:-1])
        except self.stores.errors[1] as e:
            log.warning("kvstore unavailable, bypassing: %s", e)
            return await self._bypass(plan, [], None)
        segs, wire = [], 0
        for key in plan.keys[:n]:
            seg = None if req.recompute else self._recent.get(key)
            if seg is None:
                seg = await store.get(key)
                if seg is None:  # evicted or corrupt since the lookup: compute from here
                    break
                wire += encoded_nbytes(seg, plan.precision)
                self._remember(key, seg)
            segs.append(seg)
        reused = len(segs)
        cache = CompactCache.concat(segs) if segs else None
        logits = None
        for i in range(reused, len(plan.segments)):
            res = await self._model(self._prefill_segment, plan.segments[i], cache, plan.policies[i], plan.precision)
            cache, logits = res, res.logits  # its whole cache is built by the next segment, if any
            segs.append(res.stored)
            try:
                wire += await store.put(plan.store_keys[i], res.segment, plan.precision)
                if plan.store_keys[i] == plan.keys[i] and (i > 0 or policy.reusable):
                    self._remember(plan.keys[i], res.stored)
            except (self.stores.errors[1], NotStored) as e:  # down, or refused the segment
                log.warning("segment not stored, answering from the computed cache: %s", e)
                return await self._bypass(plan, segs, (cache, logits), fallback_status(e, self.stores.errors[1]))
        reused_tokens = sum(len(s) for s in plan.segments[:reused])
        status = PRIVATE if not policy.reusable else (STORED if reused == 0 else REUSED if reused == len(plan.segments) - 1 else PARTIAL)
        return self._handle(plan, segs, logits, reused_tokens, wire, status)

    def _prefill_segment(self, ids: list[int], prev: CompactCache | _Computed | None, policy: Policy,
                         precision: str) -> _Computed:
        """Prefill and compress a segment on top of `prev`; later segments run over its rows as
        stored (at a lossy precision, dequantised), so a cold request and a reused one see the same rows."""
        cache = prev.cache if isinstance(prev, _Computed) else prev
        res = self.runner.prefill_segment(ids, cache, policy)
        if quant.lossless(precision, res.segment.layers[0].keys.dtype):
            return _Computed(res.logits, res.segment, res.segment, cache, res.cache)
        return _Computed(res.logits, res.segment, quant.as_stored(res.segment, precision), cache)

    def _remember(self, key: str, seg: CompactCache) -> None:
        old = self._recent.pop(key, None)
        self._recent_bytes += seg.nbytes - (old.nbytes if old is not None else 0)
        self._recent[key] = seg
        while self._recent and self._recent_bytes > self._recent_budget:
            self._recent_bytes -= self._recent.popitem(last=False)[1].nbytes

    async def _lead(self, key: str) -> asyncio.Future:
        """Single flight per context: while another request of this replica looks up or computes the
        same context (same tenant, policy and text: the key says so), wait for it, then look up
        again; the stored result is reused instead of computed twice. Taken before the lookup, so
        requests that arrive together cannot all miss and all compute. Returns this request's lease."""
        while (fut := self._inflight.get(key)) is not None:
            self.single_flight_waits += 1
            self.metrics.single_flight_wait("replica")
            await asyncio.shield(fut)
        lease = asyncio.get_running_loop().create_future()
        self._inflight[key] = lease
        return lease

    async def _lead_cluster(self, store, key: str) -> tuple[str, str] | None:
        """The same single flight across prefill replicas, through a kvstore semaphore of one slot per
        context: the holder computes; the others poll until the context is stored (or the slot is
        free: the holder failed, or died and its slot lapsed). Without the store, compute.
        Returns (semaphore name, holder id) when this request took the slot, else None."""
        name, holder, ttl = f"fill-{key}", secrets.token_hex(12), self.settings.fill_lease_s
        waited, give_up = False, time.monotonic() + FILL_MAX_WAIT_LEASES * ttl
        try:
            while not (await store.acquire(name, holder, 1, ttl))[0]:
                if not waited:
                    self.cluster_waits, waited = self.cluster_waits + 1, True
                    self.metrics.single_flight_wait("cluster")
                await asyncio.sleep(FILL_POLL_S)
                if await store.lookup([key]) == 1:
                    return None  # another replica stored it: the lookup that follows reuses it
                if time.monotonic() > give_up:  # the holder renews but never finishes: stop waiting for it
                    log.warning("waited %.0f s for another replica computing context %s; computing it here",
                                FILL_MAX_WAIT_LEASES * ttl, key)
                    return None
        except self.stores.errors[0] as e:
            log.info("cluster-wide single flight skipped: %s", e)
            return None
        return name, holder

    def _release(self, key: str, lease: asyncio.Future) -> None:
        if self._inflight.get(key) is lease:
            del self._inflight[key]
        lease.set_result(None)

    async def _bypass(self, plan: _Plan, segs: list[CompactCache], state, status: str = BYPASSED) -> CacheHandle:
        """Without the store (unreachable, or it refused a segment): compute what is missing and
        hand the segments over through Ray."""
        segs = list(segs)
        cache, logits = state if state else (None, None)
        if not segs:
            cache = None
        for i in range(len(segs), len(plan.segments)):
            res = await self._model(self._prefill_segment, plan.segments[i], cache, plan.policies[i], plan.precision)
            cache, logits = res, res.logits  # its whole cache is built by the next segment, if any
            segs.append(res.stored)
        handle = self._handle(plan, segs, logits, 0, 0, status)
        handle.inline_segments = segs
        handle.ephemeral = []
        return handle

    def _handle(self, plan: _Plan, segs: list[CompactCache], logits, reused_tokens: int, wire: int, status: str) -> CacheHandle:
        full = sum(s.full_nbytes() for s in segs)
        held = sum(s.nbytes for s in segs)
        rows = sum(s.num_rows for s in segs)
        full_rows = sum(s.num_layers * s.layers[0].num_heads * s.num_tokens for s in segs)
        return CacheHandle(
            keys=plan.store_keys, ephemeral=plan.ephemeral, segment_tokens=plan.segments, logits=logits.float().cpu(),
            prompt_tokens=sum(len(s) for s in plan.segments), reused_tokens=reused_tokens, full_kv_bytes=full,
            held_kv_bytes=held, realised_kept=rows / full_rows if full_rows else 1.0, wire_bytes=wire,
            store_status=status, policy="", kv_precision=plan.precision,
            stored_kv_bytes=sum(stored_nbytes(s, plan.precision) for s in segs),
        )


