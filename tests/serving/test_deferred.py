"""Deferred compression: a document nobody stored yet is answered from its exact cache, and the
policy's compressed cache (kvzip: a reconstruction pass of its own) is computed after the handoff.

Tiny model, real kvstore server over a real Redis (the store's own guarantees are under test:
atomic puts, the one-slot semaphore per context, quotas), one or two prefill replicas.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
import torch

from headwise.models import ModelRunner, SamplingParams
from headwise.policies import get_policy
from headwise.prompt import build_segments
from services.decode.worker import DecodeWorker
from services.handoff import PrefillRequest
from services.kvstore.client import KVStoreClient
from services.kvstore.server import close_server, create_server, start_server
from services.kvstore.settings import KVStoreSettings
from services.metrics import RecordingMetrics
from services.prefill import worker as worker_module
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings
from services.store import StoreClients
from services.tenancy import TenantRegistry
from tests.serving.test_workers import DOC, ByteTokenizer

TOKEN = "deferred-test-token"
KVZIP = {"policy": "kvzip", "kept": 0.25}


class Store:
    """A kvstore server on loopback over the test's Redis, and clients of it."""

    def __init__(self, redis_url: str, quota: int = 0):
        self.settings = KVStoreSettings(service_token=TOKEN, redis_url=redis_url, metrics_enabled=False,
                                        redis_deadline_s=2.0, tenant_ttl_s=0, tenant_quota_bytes=quota)
        self.clients: list[KVStoreClient] = []

    async def start(self) -> "Store":
        self.server, port = create_server("127.0.0.1:0", self.settings)
        await start_server(self.server)
        self.addr = f"127.0.0.1:{port}"
        return self

    def client(self, tenant: str = "acme") -> KVStoreClient:
        c = KVStoreClient(self.addr, TOKEN, tenant, timeout_s=5.0, retries=1)
        self.clients.append(c)
        return c

    def stores(self) -> StoreClients:  # what a replica opens: its own clients and breaker
        return StoreClients(self.addr, TOKEN, timeout_s=5.0)

    async def close(self) -> None:
        for c in self.clients:
            await c.close()
        await close_server(self.server)


@pytest.fixture(autouse=True)
def short_handoff_wait(monkeypatch):
    """Requests sent to prefill alone have no decode fetching their exact rows: do not wait long for it."""
    monkeypatch.setattr(worker_module, "HANDOFF_WAIT_S", 0.5)


@pytest.fixture
async def store(redis_url):
    s = await Store(redis_url).start()
    yield s
    await s.close()


class Gate:
    """Counts the runner's reconstruction passes and their steps (`chunks`: one per layer of a chunk);
    `hold(at)` makes a pass wait before its step `at` (0: before it starts) until `open()`. `started`: a pass began on the model thread;
    `paused`: it is waiting."""

    def __init__(self, runner: ModelRunner):
        self.passes, self.chunks, self._at = 0, 0, 0
        self.started, self.paused, self._go = threading.Event(), threading.Event(), threading.Event()
        self._go.set()
        real = runner.reconstruction_steps

        def counted(*args):
            self.passes += 1
            return self._steps(real(*args))

        runner.reconstruction_steps = counted

    def _steps(self, inner):
        self.started.set()
        for i in itertools.count():
            if i >= self._at and not self._go.is_set():
                self.paused.set()
                self._go.wait(30)
            try:
                out = next(inner)
            except StopIteration:
                return
            self.chunks += 1
            yield out

    def hold(self, at: int = 0) -> None:
        self._at = at
        self._go.clear()

    def open(self) -> None:
        self._go.set()


def settings(**kw) -> Settings:
    return Settings(**({"tenants": "acme:ka:4", "default_policy": "kvzip", "max_prompt_tokens": 900} | kw))


def prefill_replica(tiny_model, store: Store, **kw) -> tuple[PrefillWorker, Gate, RecordingMetrics]:
    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    metrics = RecordingMetrics()
    pw = PrefillWorker(runner, store.stores(), settings(**kw), metrics=metrics)
    return pw, Gate(runner), metrics


def decode_replica(pw: PrefillWorker, store: Store, **kw) -> DecodeWorker:
    s = settings(**kw)
    return DecodeWorker(pw.runner, store.stores(), pw.prefill, TenantRegistry.from_settings(s), s)


async def ask(dw, prompt: str = "what jumps?", **fields):
    req = pb.GenerateRequest(**({"context": DOC, "prompt": prompt, "max_new_tokens": 8} | KVZIP | fields))
    ids, figures = [], None
    async for m in dw.generate(req, {"authorization": "Bearer ka"}):
        if m.HasField("delta"):
            ids += list(m.delta.token_ids)
        else:
            figures = m.figures
    return ids, figures


def preq(prompt: str = "what jumps?", **kw) -> PrefillRequest:
    return PrefillRequest(**({"tenant": "acme", "salt": "s", "context": DOC, "prompt": prompt} | KVZIP | kw))


def direct(runner: ModelRunner, policy: str, prompt: str = "what jumps?", n: int = 8):
    """The policy computed in process, no service: (context segment, greedy answer)."""
    seg = build_segments(runner.tokenizer, DOC, prompt)
    ctx = runner.prefill_segment(seg.context, None, get_policy(policy, kept=0.25))
    q = runner.prefill_segment(seg.question, ctx.segment)
    return ctx.segment, list(runner.generate(q.cache, q.logits, SamplingParams(max_new_tokens=n)))


def same_rows(a, b) -> bool:
    return all(torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
               and torch.equal(x.head_offsets, y.head_offsets) for x, y in zip(a.layers, b.layers, strict=True))


async def test_cold_answer_is_exact_then_the_compressed_cache_is_reused(tiny_model, store):
    pw, gate, metrics = prefill_replica(tiny_model, store)
    dw = decode_replica(pw, store)
    full_ids, full = await ask(dw, policy="full")
    cold_ids, cold = await ask(dw)
    assert cold.store_status == "compressing" and cold.realised_kept == 1.0 and cold.reused_tokens == 0
    assert cold.held_kv_bytes == cold.full_kv_bytes == full.full_kv_bytes
    assert cold_ids == full_ids  # the first answer is the uncompressed one
    await pw.drain()
    assert gate.passes == 1
    [(_, policy, outcome, seconds)] = [c for c in metrics.calls if c[0] == "deferred_compression"]
    assert (policy, outcome) == ("kvzip", "stored") and seconds > 0
    pw._recent.clear()  # the next request fetches what the store holds, not this replica's copy
    warm_ids, warm = await ask(dw)
    assert warm.store_status == "reused" and warm.reused_tokens > 0
    want_seg, want_ids = direct(pw.runner, "kvzip")
    question_bytes = warm.full_kv_bytes * (warm.prompt_tokens - warm.reused_tokens) // warm.prompt_tokens
    assert warm.held_kv_bytes == want_seg.nbytes + question_bytes and warm.realised_kept < 0.35
    assert warm_ids == want_ids
    key = pw.stats()["deferred"][0]["key"]
    assert same_rows(await store.client().get(key), want_seg)
    await segments_become(store, 2)  # full's context and kvzip's compressed one: the exact rows are gone


async def test_free_compressions_keep_the_one_pass_path_and_the_setting_turns_it_off(tiny_model, store):
    pw, gate, _ = prefill_replica(tiny_model, store)
    assert pw.defers(get_policy("kvzip", kept=0.25)) and pw.defers(get_policy("razor", kept=0.25))  # razor's KVzip fill
    assert not any(pw.defers(get_policy(p, kept=0.25)) for p in ("streaming", "snapkv", "full", "kvzap", "pod"))
    assert not pw.defers(get_policy("razor", kept=0.25, fill="recent"))  # the paper's fill: scores with the prefill
    _, fig = await ask(decode_replica(pw, store), policy="streaming", kept=0.5)
    assert fig.store_status == "stored" and fig.realised_kept < 1
    off, gate_off, _ = prefill_replica(tiny_model, store, deferred_compression=False)
    ids, fig = await ask(decode_replica(off, store), prompt="and the dog?")
    assert fig.store_status == "stored" and fig.realised_kept < 0.35 and gate_off.passes == 1
    assert not off._background and gate.passes == 0


async def test_two_cold_requests_on_two_replicas_compress_once_and_see_nothing_partial(tiny_model, store):
    (p1, g1, _), (p2, g2, _) = prefill_replica(tiny_model, store), prefill_replica(tiny_model, store)
    g1.hold(), g2.hold()
    jobs = [asyncio.ensure_future(p.prefill(preq(f"question {i}?"))) for i, p in enumerate((p1, p2))]
    first = await asyncio.gather(*jobs)  # neither waits for the compression, which is held open
    assert [h.store_status for h in first] == ["compressing"] * 2 and all(h.realised_kept == 1.0 for h in first)
    holder = p1 if p1._background and p1.stats()["exact_waiters"] == 0 else p2
    other = p2 if holder is p1 else p1
    assert other.stats()["exact_waiters"] == 1  # answered from its own plain prefill, compressing nothing
    await asyncio.to_thread((g1 if holder is p1 else g2).started.wait, 10)
    ctx_key = holder.plan(preq(), get_policy("kvzip", kept=0.25)).keys[0]
    reader = store.client()
    for _ in range(3):  # while the compression runs: the context is not stored, not even in part
        assert await reader.lookup([ctx_key]) == 0 and await reader.get(ctx_key) is None
        await asyncio.sleep(0.1)
    assert (await other.prefill(preq("question 3?"))).store_status == "compressing"  # its held rows
    g1.open(), g2.open()
    await asyncio.gather(p1.drain(), p2.drain())
    assert g1.passes + g2.passes == 1  # compressed once, across both replicas
    assert await reader.lookup([ctx_key]) == 1
    assert {(await p.prefill(preq("question 4?"))).store_status for p in (p1, p2)} == {"reused"}
    assert p1.cluster_waits + p2.cluster_waits == 0


async def test_requests_during_a_compression_answer_from_the_held_exact_rows(tiny_model, store, monkeypatch):
    pw, gate, _ = prefill_replica(tiny_model, store)
    dw = decode_replica(pw, store)
    plain, stored = [], asyncio.Event()
    real_plain, real_compressed = pw._plain_prefill, pw._compressed

    async def held_open(*args):  # the compression stays in flight (single flight held), the model thread free
        seg = await real_compressed(*args)
        await stored.wait()
        return seg

    monkeypatch.setattr(pw, "_plain_prefill", lambda *a: plain.append(1) or real_plain(*a))
    monkeypatch.setattr(pw, "_compressed", held_open)
    want = {p: direct(pw.runner, "full", p)[1] for p in ("what jumps?", "who is lazy?")}
    ids, cold = await ask(dw)
    assert cold.store_status == "compressing" and ids == want["what jumps?"]
    for prompt in ("who is lazy?", "what jumps?"):  # they must not wait for the compression (it never ends)
        ids, fig = await asyncio.wait_for(ask(dw, prompt=prompt), 60)
        assert fig.store_status == "compressing" and fig.realised_kept == 1.0 and fig.reused_tokens == 0
        assert ids == want[prompt]
    assert len(plain) == 1 and gate.passes == 1 and pw.stats()["exact_waiters"] == 2  # no document prefill again
    assert not pw.stats()["deferred"]  # still in flight
    stored.set()
    await pw.drain()
    assert gate.passes == 1 and pw.stats()["deferred"][-1]["outcome"] == "stored"
    ids, fig = await ask(dw, prompt="who is lazy?")
    assert fig.store_status == "reused" and ids == direct(pw.runner, "kvzip", "who is lazy?")[1]
    await segments_become(store, 1)  # the held exact rows go once the hold ends (after a short grace)


async def segments_become(store: Store, n: int) -> None:
    reader = store.client()
    for _ in range(60):
        if (await reader.stats())["segments"] == n:
            break
        await asyncio.sleep(0.05)
    assert (await reader.stats())["segments"] == n


async def test_the_pass_runs_in_steps_so_other_requests_interleave(tiny_model, store, monkeypatch):
    pw, gate, _ = prefill_replica(tiny_model, store)
    monkeypatch.setattr(pw.runner, "RECONSTRUCT_CHUNK", 64)
    chunks = -(-len(build_segments(pw.runner.tokenizer, DOC, "").context) // 64)
    steps = chunks * pw.runner.num_layers + 1  # one per layer of each chunk, then the scores
    assert steps >= 6
    gate.hold(at=1)
    assert (await pw.prefill(preq())).store_status == "compressing"
    await asyncio.to_thread(gate.paused.wait, 10)  # inside the pass, after its first step
    ran_at = []  # how many steps of the pass had run when the other request's prefill ran
    real = pw.runner.prefill_segment
    monkeypatch.setattr(pw.runner, "prefill_segment", lambda *a, **k: ran_at.append(gate.chunks) or real(*a, **k))
    other = asyncio.ensure_future(pw.prefill(preq(context="A different document, about cats. " * 4, policy="full")))
    for _ in range(100):
        if pw.pool._work_queue.qsize():  # its prefill queued behind the step
            break
        await asyncio.sleep(0.01)
    gate.open()
    handle = await other
    assert handle.store_status == "stored" and ran_at[0] < steps  # it ran between the pass's steps
    await pw.drain()
    assert gate.chunks == steps and pw.stats()["deferred"][-1]["outcome"] == "stored"
    assert (await pw.prefill(preq("again?"))).store_status == "reused"


async def test_a_replica_that_dies_while_compressing_leaves_it_to_the_next_request(tiny_model, store):
    p1, g1, _ = prefill_replica(tiny_model, store, fill_lease_s=0.6)
    p2, g2, _ = prefill_replica(tiny_model, store, fill_lease_s=0.6)
    d1, d2 = decode_replica(p1, store), decode_replica(p2, store)
    full_ids = direct(p1.runner, "full")[1]
    g1.hold()
    ids, cold = await ask(d1)
    assert cold.store_status == "compressing" and ids == full_ids
    await asyncio.to_thread(g1.started.wait, 10)
    # p1 dies: it reaches the store no more (its slot is neither renewed nor given back) and its task ends
    p1.stores.cooldown_s = 60.0
    p1.stores.trip()
    for task in list(p1._background):
        task.cancel()
    await p1.drain()
    g1.open()
    ids, meanwhile = await ask(d2)  # p1's slot has not lapsed yet: exact, from p2's own plain prefill
    assert meanwhile.store_status == "compressing" and ids == full_ids and g2.passes == 0
    await p2.drain()  # p2 holds those rows until p1's slot lapses
    ids, again = await ask(d2)  # then the next request computes it again
    assert again.store_status == "compressing" and ids == full_ids
    await p2.drain()
    assert g2.passes == 1 and p2.stats()["deferred"][-1]["outcome"] == "stored"
    ids, fig = await ask(d2)
    assert fig.store_status == "reused" and ids == direct(p2.runner, "kvzip")[1]


@pytest.mark.parametrize("fits", ["neither", "compressed"])
async def test_a_quota_refusal_still_answers_and_a_later_request_computes_again(tiny_model, redis_url, fits):
    probe = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    seg, _ = direct(probe, "kvzip")
    quota = 1000 if fits == "neither" else 2 * seg.nbytes  # the exact rows are about 4x the compressed ones
    store = await Store(redis_url, quota=quota).start()
    try:
        pw, gate, metrics = prefill_replica(tiny_model, store)
        dw = decode_replica(pw, store)
        full_ids = direct(probe, "full")[1]
        ids, cold = await ask(dw)
        assert cold.store_status == "compressing" and cold.realised_kept == 1.0 and ids == full_ids
        await pw.drain()
        outcome = pw.stats()["deferred"][-1]["outcome"]
        ids, fig = await ask(dw)
        await pw.drain()
        if fits == "neither":
            assert outcome == "refused" and fig.store_status == "compressing" and ids == full_ids
            assert gate.passes == 2 and [c[2] for c in metrics.calls if c[0] == "deferred_compression"] == ["refused"] * 2
        else:
            assert outcome == "stored" and fig.store_status == "reused" and ids == direct(probe, "kvzip")[1]
            assert gate.passes == 1
    finally:
        await store.close()


async def test_a_session_started_exact_continues_over_the_compressed_context(tiny_model, store):
    pw, gate, _ = prefill_replica(tiny_model, store)
    dw = decode_replica(pw, store)
    _, first = await ask(dw, session_id="s1")
    await pw.drain()
    _, second = await ask(dw, session_id="s1", context="", prompt="and then?")
    assert first.store_status == "compressing" and gate.passes == 1
    assert second.store_status == "partial" and 0 < second.reused_tokens < first.prompt_tokens
    assert second.realised_kept < 0.5  # the earlier turn is recomputed over the compressed context


async def test_exact_rows_nobody_fetched_are_swept_after_a_lease_period(tiny_model, store):
    pw, _, _ = prefill_replica(tiny_model, store, fill_lease_s=0.5)
    handle = await pw.prefill(preq())  # no decode fetches (and deletes) the exact segments: it died
    reader = store.client()
    assert handle.store_status == "compressing" and handle.ephemeral == handle.keys[1:]  # the document's: swept
    assert await reader.lookup(handle.keys) == len(handle.keys)  # held while a decode may still fetch them
    await pw.drain()
    for _ in range(50):
        if await reader.lookup(handle.keys[:1]) == 0:
            break
        await asyncio.sleep(0.05)
    assert await reader.lookup(handle.keys[:1]) == 0 and (await reader.stats())["segments"] == 1  # the compressed one


async def test_the_compression_waits_until_decode_has_fetched_the_exact_rows(tiny_model, store, monkeypatch):
    monkeypatch.setattr(worker_module, "HANDOFF_WAIT_S", 30.0)
    pw, gate, _ = prefill_replica(tiny_model, store)
    handle = await pw.prefill(preq())
    await asyncio.sleep(0.3)
    assert not gate.started.is_set()  # the first answer's fetch is not competing with the pass
    reader = store.client()
    for key in handle.ephemeral:  # what decode does once it has fetched them
        await reader.delete(key)
    assert await asyncio.to_thread(gate.started.wait, 10)
    await pw.drain()
    assert pw.stats()["deferred"][-1]["outcome"] == "stored"


async def test_int8_rows_first_exact_then_compressed(tiny_model, store):
    pw, gate, _ = prefill_replica(tiny_model, store)
    dw = decode_replica(pw, store)
    full_ids, full = await ask(dw, policy="full", kv_precision="int8")
    cold_ids, cold = await ask(dw, kv_precision="int8")
    assert cold.store_status == "compressing" and cold.kv_precision == "int8" and cold_ids == full_ids
    assert cold.stored_kv_bytes == full.stored_kv_bytes  # the exact rows, stored as int8 like full's
    await pw.drain()
    pw._recent.clear()
    warm_ids, warm = await ask(dw, kv_precision="int8")
    again_ids, again = await ask(dw, kv_precision="int8")
    assert warm.store_status == again.store_status == "reused" and warm_ids == again_ids and gate.passes == 1
    assert warm.stored_kv_bytes < cold.stored_kv_bytes / 2


async def test_a_recompute_answers_exact_and_leaves_no_exact_rows_behind(tiny_model, store):
    pw, gate, _ = prefill_replica(tiny_model, store, fill_lease_s=0.5)
    handle = await pw.prefill(preq(recompute=True))  # decode could not load the chain: no single flight held
    assert handle.realised_kept == 1.0 and handle.ephemeral == handle.keys  # nobody holds them: decode deletes all
    assert not pw._background and not pw._inflight and gate.passes == 0
    await segments_become(store, 0)  # and the sweep, for a decode that died first
