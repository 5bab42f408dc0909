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
import dataclasses
import functools
import logging
import secrets
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace

from headwise.cache import quant
from headwise.cache.codec import CODEC_VERSION, Prepared, encoded_nbytes, prepare, stored_nbytes
from headwise.cache.compact import CompactCache
from headwise.cache.keys import chain_keys, segment_key
from headwise.errors import InvalidInput
from headwise.models.query_aware import check_query_aware
from headwise.policies import Policy
from headwise.policies.full import FullPolicy
from headwise.profiles import profile_for
from headwise.prompt import build_segments, followup_ids
from services.asyncutil import quiet
from services.errors import ServiceError, invalid
from services.handoff import BYPASSED, COMPRESSING, PARTIAL, PRIVATE, REUSED, STORED, CacheHandle, PrefillRequest
from services.kvstore.errors import StoreError, StoreUnavailable
from services.metrics import Metrics
from services.policy import resolve_policy
from services.store import NotStored, fallback_status

log = logging.getLogger("headwise.prefill")
FILL_POLL_S = 0.25  # how often a request waiting for another replica's computation looks again
FILL_MAX_WAIT_LEASES = 5  # ... and how long it waits at most, in lease periods (5 min by default)

QUERY_AWARE_DEFAULT = "snapkv"  # an empty policy in a query-aware request (the server default may have no window)
HANDOFF_WAIT_S = 5.0  # a deferred compression waits this long at most for decode to fetch the exact rows
HANDOFF_POLL_S = 0.05
ELSEWHERE = "elsewhere"  # _lead_cluster: another replica holds the context's slot (and this request does not wait)


def for_store(seg: CompactCache, precision: str) -> tuple[Prepared, CompactCache]:
    """(model thread) `seg` ready for the store at `precision` (rows quantised once, recall blobs
    made: the put on the event loop only checksums and sends), and its rows as the store gives
    them back (`seg` itself when lossless), which later segments and decode run over."""
    prep = prepare(seg, precision)
    return prep, seg if quant.lossless(precision, seg.layers[0].keys.dtype) else prep.stored()


def resolve_precision(name: str, default: str) -> str:
    """The request's kv_precision, or the server default when empty; INVALID_ARGUMENT when unknown."""
    name = name or default
    if name not in quant.PRECISIONS:
        raise invalid(f"kv_precision {name!r} is not supported; allowed: {', '.join(quant.PRECISIONS)} (empty = {default})")
    return name


def describe(policy: Policy) -> str:
    params = {k: v for k, v in policy.params().items() if k != "policy"}
    return f"{policy.name}(" + ", ".join(f"{k}={v}" for k, v in params.items()) + ")"


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
    segment: Prepared  # the segment as computed, ready for the store (rows quantised once, here)
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


@dataclass
class _Held:
    """A document's exact rows held on this replica while its compressed cache is computed (here, or
    by another replica: then this replica's own plain prefill): requests for the document that arrive
    meanwhile answer from them, running only their question. `key` is where the rows are in the
    store for those requests' decode: a one-request key, deleted once nobody can still need it."""
    key: str
    rows: _Computed


@dataclass
class _Flight:
    """One request's single flight over a context on this replica."""
    done: asyncio.Future  # resolved when the flight ends: the context stored, or given up
    ready: asyncio.Future  # resolved when `held` is set (or at the end): waiters look again then
    held: _Held | None = None

    def hold(self, held: _Held) -> None:
        self.held = held
        if not self.ready.done():
            self.ready.set_result(None)


class PrefillWorker:
    """One model, one thread for it; requests interleave on the event loop between model calls."""

    def __init__(self, runner, stores, settings, cache_bytes: int = 512 * 1024**2, metrics: Metrics | None = None):
        self.runner = runner
        self.metrics = metrics or Metrics()
        self.stores = stores
        self.settings = settings
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefill-model")
        self._inflight: dict[str, _Flight] = {}  # context key -> the flight of the request computing it
        self.single_flight_waits = 0  # requests that waited for this replica's computation of their context
        self.cluster_waits = 0  # ... for another replica's
        self.exact_waiters = 0  # requests answered from exact rows held while their context was compressed
        # Recently used reusable segments of this replica, so a reused document is not fetched
        # twice (here and in decode). The store stays the authority: a key is used only after
        # lookup says it is stored. Keys carry the tenant salt, so this never crosses tenants.
        self._recent: OrderedDict[str, CompactCache] = OrderedDict()
        self._recent_budget, self._recent_bytes = cache_bytes, 0
        self._background: set[asyncio.Task] = set()  # compressions still running after their handoff
        self.deferred: deque[dict] = deque(maxlen=64)  # the last ones done: outcome, seconds after handoff

    async def _model(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # ---- planning -----------------------------------------------------------------
    @property
    def model_dtype(self) -> str:
        """The runtime dtype of the weights: an fp32 and a bf16 replica compute different rows."""
        return str(self.runner.dtype).removeprefix("torch.")

    def key_params(self, policy: Policy) -> dict:
        """What of `policy` names its cache in the segment key: its parameters, and for a policy that
        reads the head profile (razor, pod) that profile's fingerprint. The profile is loaded (or
        computed) in the model thread before planning (`prefill`)."""
        params = policy.params()
        if getattr(policy, "needs_profile", False):
            profile = profile_for(self.runner, compute=False)
            if profile is None:
                raise RuntimeError(f"the head profile of {self.runner.name} is not loaded; `prefill` loads it before planning")
            params = {**params, "head_profile": profile.fingerprint()}
        return params

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
        self.check_document(segments[0])
        self.check_length(sum(len(s) for s in segments))
        full = FullPolicy()
        policies = [policy] + [full] * (len(segments) - 1)
        salt = req.salt if policy.reusable else f"{req.salt}:{secrets.token_hex(8)}"
        cv, dtype = CODEC_VERSION, self.model_dtype
        keys = list(chain_keys(segments, self.runner.name, [self.key_params(p) for p in policies], cv, salt, precision,
                               dtype))
        store_keys, ephemeral = list(keys), []
        if not policy.reusable:
            ephemeral.append(keys[0])
        if not req.session:  # nobody will build on this question: one-request key, deleted by decode
            store_keys[-1] = segment_key(keys[-2] if len(keys) > 1 else None, segments[-1], self.runner.name,
                                         full.params(), cv, f"{salt}:{secrets.token_hex(8)}", precision, dtype)
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
        self.check_document(seg.context)
        self.check_length(len(seg.context) + len(seg.question))
        res = await self._model(self.runner.prefill_query_aware, seg.context, seg.question, policy)
        plan = _Plan([seg.context, seg.question], [policy, FullPolicy()], [], [], [])
        handle = self._handle(plan, [res.document, res.question], res.logits, 0, 0, PRIVATE)
        handle.inline_segments = [res.document, res.question]
        return handle

    def check_document(self, ids: list[int]) -> None:
        """The document segment has at least one token: with a chat template its head is there even
        for an empty context; a tokenizer without one leaves nothing to prefill."""
        if not ids:
            raise invalid("context is empty and this model has no chat template, so the prompt has no document "
                          "segment to prefill; give a context")

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
        if getattr(policy, "needs_profile", False) and profile_for(self.runner, compute=False) is None:
            await self._model(profile_for, self.runner)  # computed once per model, in the model thread
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
            except StoreError as e:  # any store failure: answer without the store
                log.warning("kvstore failed, answering without it: %s", e)
                handle = await self._bypass(plan, [], None, fallback_status(e))
        handle.policy = describe(policy)
        handle.prefill_s = time.perf_counter() - t0
        self.metrics.prefill(policy.name, handle.store_status, handle.prefill_s)
        return handle

    async def _with_store(self, req: PrefillRequest, plan: _Plan, policy: Policy) -> CacheHandle:
        store = self.stores.for_tenant(req.tenant)
        key, reusable = plan.keys[0], policy.reusable and not req.recompute
        if req.recompute:  # what failed to load may be what this replica remembers: ask the store again
            self._forget(plan.keys)
        async with AsyncExitStack() as stack:
            flight = None
            if reusable:
                flight, held = await self._lead(key)
                if held is not None:  # compressed meanwhile: answer from the exact rows this replica holds
                    return (await self._answer_exact(req, plan, policy, store, held))[0]
                stack.callback(self._release, key, flight)
                slot = await self._lead_cluster(store, key, wait=not self.defers(policy))
                if slot == ELSEWHERE:  # another replica compresses it: answer exact, never compress it twice
                    handle, held, _ = await self._answer_exact(req, plan, policy, store)
                    if held is not None:
                        flight.hold(held)
                        self._spawn(self._hold_while_compressed(store, key, held, stack.pop_all()))
                    return handle
                if slot is not None:
                    await stack.enter_async_context(store.holding(
                        *slot, 1, self.settings.fill_lease_s, self.settings.store_timeout_s))
            handle, later = await self._lookup_and_compute(req, plan, policy, store, flight)
            if later is not None and reusable:  # the compressed cache follows; the single flight goes with it
                self._spawn(later(stack.pop_all()))
            return handle

    async def _lookup_and_compute(self, req: PrefillRequest, plan: _Plan, policy: Policy, store,
                                  flight: _Flight | None = None):
        """The request's handle, and when its document goes out exact first, the coroutine function
        that computes and stores the compressed cache afterwards (else None)."""
        try:
            n = 0 if req.recompute or not policy.reusable else await store.lookup(plan.keys[:-1])
        except StoreUnavailable as e:
            log.warning("kvstore unavailable, bypassing: %s", e)
            return await self._bypass(plan, [], None), None
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
        if not segs and self.defers(policy):
            lead = flight is not None  # else a recompute: answer exact, no compression, no rows held
            handle, held, later = await self._answer_exact(req, plan, policy, store, compress=lead, keep=lead)
            if held is not None and lead:
                flight.hold(held)  # until the compressed cache is stored, later requests answer from these rows
            return handle, later
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
            except (StoreUnavailable, NotStored) as e:  # down, or refused the segment
                log.warning("segment not stored, answering from the computed cache: %s", e)
                return await self._bypass(plan, segs, (cache, logits), fallback_status(e)), None
        reused_tokens = sum(len(s) for s in plan.segments[:reused])
        status = PRIVATE if not policy.reusable else (STORED if reused == 0 else REUSED if reused == len(plan.segments) - 1 else PARTIAL)
        return self._handle(plan, segs, logits, reused_tokens, wire, status), None

    # ---- the first answer exact, the compressed cache after it (deferred compression) ----------
    def defers(self, policy: Policy) -> bool:
        """Whether a document nobody stored yet is answered from its exact cache first: only where the
        compression costs a pass of its own (a reconstruction pass, KVzip's); a policy whose scores
        come with the prefill keeps the one-pass path, its first answer already over the kept rows."""
        return bool(self.settings.deferred_compression and policy.reusable and policy.capture.reconstruction)

    async def _answer_exact(self, req: PrefillRequest, plan: _Plan, policy: Policy, store, held: _Held | None = None,
                            compress: bool = False, keep: bool = True):
        """The rest of the prompt over the document's exact rows: the answer `full` gives. The rows are
        `held` ones (another request's, while the document is compressed: only the question runs) or this
        request's plain prefill, put under a one-request key that the requests answered from them share
        (deleted once the hold ends; unless `keep`, nobody holds them and decode deletes that key too). The question's segments go under one-request keys decode deletes
        once fetched (a sweep after a lease period catches a decode that died first), so exact rows count
        against the tenant's quota only while needed. With `compress`, also the coroutine function that
        computes and stores the compressed cache after the handoff, from the prefill's states.
        Returns (handle, the rows to hold for later requests (None if the store refused them), function)."""
        full = FullPolicy()
        out, doc = (None, held.rows) if held is not None else await self._model(
            self._plain_prefill, plan.segments[0], policy, plan.precision)
        computed = [doc]
        for ids in plan.segments[1:]:  # over the rows as stored (plan.precision), like a cold `full` request
            computed.append(await self._model(self._prefill_segment, ids, computed[-1], full, plan.precision))
        segs, logits = [c.stored for c in computed], computed[-1].logits
        salt = f"{req.salt}:{secrets.token_hex(8)}"
        keys = list(chain_keys(plan.segments, self.runner.name, [full.params()] * len(segs), CODEC_VERSION, salt,
                               plan.precision, self.model_dtype))
        if held is not None:
            keys[0] = held.key
        exact = dataclasses.replace(plan, store_keys=keys, ephemeral=keys[1:] if keep or held else list(keys))
        later = functools.partial(self._compress_later, store, plan, policy, out, keys) if compress else None
        wire, put = 0, []
        try:
            for key, c in zip(keys, computed, strict=True):
                if held is None or key != held.key:
                    put.append(key)
                    wire += await store.put(key, c.segment, plan.precision)
        except (StoreUnavailable, NotStored) as e:  # unreachable, or refused (larger than the quota)
            log.warning("exact cache handed to decode directly: %s", e)
            for key in put:
                asyncio.ensure_future(quiet(store.delete(key)))
            refused = isinstance(e, NotStored)  # the compressed cache is about 4x smaller: it may fit
            handle = self._handle(exact, segs, logits, 0, 0, COMPRESSING if refused else BYPASSED)
            handle.inline_segments, handle.ephemeral = segs, []
            return handle, None, later if refused else None
        if not compress:  # (else the compression sweeps them)
            self._sweep(store, exact.ephemeral, self.settings.fill_lease_s)
        return self._handle(exact, segs, logits, 0, wire, COMPRESSING), _Held(keys[0], doc), later

    async def _compress_later(self, store, plan: _Plan, policy: Policy, out, exact_keys: list[str],
                              single_flight: AsyncExitStack) -> None:
        """Compute and store the policy's cache of a document whose first answer went out exact. The
        request's single flight (this replica's lease, the cluster's slot) is held until the compressed
        segment is stored or given up: a request for the same document meanwhile answers from the held
        exact rows (here) or its own plain prefill (another replica), never compresses it again, and
        the next one after reuses it; the store's put is atomic, so nobody reads part of it. When this
        fails, or the replica dies (its slot lapses), the next request computes it again."""
        t0, outcome = time.perf_counter(), "failed"
        async with single_flight:
            try:
                await self._fetched(store, exact_keys[-1])
                seg, stored = await self._compressed(plan.segments[0], out, policy, plan.precision)
                del out  # the prefill's states: no longer needed here
                await store.put(plan.keys[0], seg, plan.precision)
                outcome = "stored"
                self._remember(plan.keys[0], stored)
            except NotStored as e:
                outcome = "refused"
                log.warning("compressed cache of context %s refused by the store; a later request computes it: %s",
                            plan.keys[0], e)
            except Exception as e:  # noqa: BLE001 - the answer went out; a later request computes it again
                log.warning("compressed cache of context %s not stored; a later request computes it: %s: %s",
                            plan.keys[0], type(e).__name__, e)
            finally:
                seconds = time.perf_counter() - t0
                self.metrics.deferred_compression(policy.name, outcome, seconds)
                self.deferred.append({"policy": policy.name, "key": plan.keys[0], "outcome": outcome,
                                      "handoff_to_stored_s": seconds, "done_at": time.time()})
                # the document's exact rows: kept a little for the decode of a request answered from them
                # just now; the question's (decode deletes them) a lease period after the handoff
                self._sweep(store, exact_keys[:1], self._held_grace())
                self._sweep(store, exact_keys[1:], self.settings.fill_lease_s - seconds)

    async def _hold_while_compressed(self, store, key: str, held: _Held, single_flight: AsyncExitStack) -> None:
        """Keep this replica's exact rows of a document another replica compresses, for the requests that
        arrive here meanwhile, until its compressed cache is stored or its slot is free (that replica
        gave up or died; a lapsed slot is free): then the next request looks up and reuses or computes."""
        name, probe, ttl = f"fill-{key}", secrets.token_hex(12), self.settings.fill_lease_s
        give_up = time.monotonic() + FILL_MAX_WAIT_LEASES * ttl
        async with single_flight:
            try:
                while time.monotonic() < give_up and await store.lookup([key]) == 0:
                    if (await store.acquire(name, probe, 1, ttl))[0]:  # nobody computes it any more
                        await store.release(name, probe)
                        break
                    await asyncio.sleep(FILL_POLL_S)
            except StoreError as e:
                log.info("stopped holding the exact rows of context %s: %s", key, e)
            finally:
                self._sweep(store, [held.key], self._held_grace())

    def _held_grace(self) -> float:
        """How long held exact rows stay in the store after the hold ends: a request answered from them
        just before has its decode fetch them meanwhile (one that misses them recomputes)."""
        return min(self.settings.fill_lease_s, HANDOFF_WAIT_S)

    def _sweep(self, store, keys: list[str], after_s: float) -> None:
        """Delete one-request keys after `after_s` (decode deletes most of them first)."""
        asyncio.get_running_loop().call_later(
            max(0.0, after_s), lambda: [asyncio.ensure_future(quiet(store.delete(k))) for k in keys])

    async def _fetched(self, store, exact_key: str) -> None:
        """Wait (at most HANDOFF_WAIT_S) until decode has fetched the exact rows (it deletes the question's
        segment then), so the compression does not take CPU from the first answer's fetch and first token."""
        give_up = time.monotonic() + HANDOFF_WAIT_S
        try:
            while time.monotonic() < give_up and await store.lookup([exact_key]) == 1:
                await asyncio.sleep(HANDOFF_POLL_S)
        except StoreError as e:
            log.info("could not see whether decode fetched the exact cache: %s", e)

    def _plain_prefill(self, ids: list[int], policy: Policy, precision: str):
        """(model thread) The document's prefill without the reconstruction pass: its output (what the
        policy's compression needs later) and its exact segment, with its rows as stored."""
        out = self.runner.prefill(ids, None, dataclasses.replace(policy.capture, reconstruction=False))
        seg = FullPolicy().compress(out.states, out.start)
        return out, _Computed(out.logits, *for_store(seg, precision), None)

    async def _compressed(self, ids: list[int], out, policy: Policy, precision: str):
        """What `runner.prefill_segment(ids, None, policy)` gives, from the plain prefill's states: the
        runner's reconstruction pass over them, one model job per layer of each chunk so that other
        requests' jobs run in between, then the policy's compression; and its rows as stored at `precision`."""
        steps = getattr(self.runner, "reconstruction_steps", None)
        if steps is None:  # a runner without a separate pass: the policy's whole prefill again
            seg = (await self._model(self.runner.prefill_segment, ids, None, policy)).segment
            return await self._model(for_store, seg, precision)
        cap = policy.capture
        chunks = steps(list(ids), None, out.states, out.start, cap.reconstruction_span, cap.reconstruction_precision)
        while (scores := await self._model(next, chunks)) is None:
            pass
        return await self._model(self._compress, out, scores, policy, precision)

    def _compress(self, out, scores, policy: Policy, precision: str):
        """(model thread) The policy's compression of the prefill's states with these reconstruction scores."""
        for state, s in zip(out.states, scores, strict=True):
            state.reconstruction = s
        return for_store(policy.compress(out.states, out.start, self.runner.context(policy)), precision)

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the compressions still running after their requests' handoff (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def stats(self) -> dict:
        return {"deferred": list(self.deferred), "background": len(self._background),
                "single_flight_waits": self.single_flight_waits, "cluster_waits": self.cluster_waits,
                "exact_waiters": self.exact_waiters}

    def _forget(self, keys: list[str]) -> None:
        for key in keys:
            old = self._recent.pop(key, None)
            self._recent_bytes -= old.nbytes if old is not None else 0

    def _prefill_segment(self, ids: list[int], prev: CompactCache | _Computed | None, policy: Policy,
                         precision: str) -> _Computed:
        """Prefill and compress a segment on top of `prev`; later segments run over its rows as
        stored (at a lossy precision, dequantised), so a cold request and a reused one see the same rows."""
        cache = prev.cache if isinstance(prev, _Computed) else prev
        res = self.runner.prefill_segment(ids, cache, policy)
        prep, stored = for_store(res.segment, precision)
        return _Computed(res.logits, prep, stored, cache, res.cache if stored is res.segment else None)

    def _remember(self, key: str, seg: CompactCache) -> None:
        old = self._recent.pop(key, None)
        self._recent_bytes += seg.nbytes - (old.nbytes if old is not None else 0)
        self._recent[key] = seg
        while self._recent and self._recent_bytes > self._recent_budget:
            self._recent_bytes -= self._recent.popitem(last=False)[1].nbytes

    async def _lead(self, key: str) -> tuple[_Flight | None, _Held | None]:
        """Single flight per context: while another request of this replica looks up or computes the
        same context (same tenant, policy and text: the key says so), wait for it, then look up
        again; the stored result is reused instead of computed twice. Taken before the lookup, so
        requests that arrive together cannot all miss and all compute. Returns this request's flight,
        or, while the context is compressed after its first answer, the exact rows held for it."""
        while (flight := self._inflight.get(key)) is not None:
            if flight.held is not None:
                self.exact_waiters += 1
                return None, flight.held
            self.single_flight_waits += 1
            self.metrics.single_flight_wait("replica")
            await asyncio.shield(flight.done if flight.ready.done() else flight.ready)
        loop = asyncio.get_running_loop()
        flight = _Flight(loop.create_future(), loop.create_future())
        self._inflight[key] = flight
        return flight, None

    async def _lead_cluster(self, store, key: str, wait: bool = True) -> tuple[str, str] | str | None:
        """The same single flight across prefill replicas, through a kvstore semaphore of one slot per
        context: the holder computes; the others poll until the context is stored (or the slot is
        free: the holder failed, or died and its slot lapsed). Without the store, compute. Unless
        `wait`, a request whose context another replica holds does not wait: ELSEWHERE.
        Returns (semaphore name, holder id) when this request took the slot, else None or ELSEWHERE."""
        name, holder, ttl = f"fill-{key}", secrets.token_hex(12), self.settings.fill_lease_s
        waited, give_up = False, time.monotonic() + FILL_MAX_WAIT_LEASES * ttl
        try:
            while not (await store.acquire(name, holder, 1, ttl))[0]:
                if await store.lookup([key]) == 1:
                    return None  # another replica stored it: the lookup that follows reuses it
                if not wait:
                    self.exact_waiters += 1
                    return ELSEWHERE
                if not waited:
                    self.cluster_waits, waited = self.cluster_waits + 1, True
                    self.metrics.single_flight_wait("cluster")
                await asyncio.sleep(FILL_POLL_S)
                if time.monotonic() > give_up:  # the holder renews but never finishes: stop waiting for it
                    log.warning("waited %.0f s for another replica computing context %s; computing it here",
                                FILL_MAX_WAIT_LEASES * ttl, key)
                    return None
        except StoreError as e:
            log.info("cluster-wide single flight skipped: %s", e)
            return None
        return name, holder

    def _release(self, key: str, flight: _Flight) -> None:
        if self._inflight.get(key) is flight:
            del self._inflight[key]
        flight.held = None
        for fut in (flight.ready, flight.done):
            if not fut.done():
                fut.set_result(None)

    async def _bypass(self, plan: _Plan, segs: list[CompactCache], state, status: str = BYPASSED) -> CacheHandle:
        """Without the store (unreachable, or it refused a segment): compute what is missing and
        hand the segments over through Ray. A compression with a pass of its own is skipped (exact
        rows instead): nothing would store it."""
        segs = list(segs)
        cache, logits = state if state else (None, None)
        policies = list(plan.policies)
        if not segs:
            cache = None
            if self.defers(policies[0]):
                policies[0] = FullPolicy()
        for i in range(len(segs), len(plan.segments)):
            res = await self._model(self._prefill_segment, plan.segments[i], cache, policies[i], plan.precision)
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


