"""The decode loop: streams stepped together (joining, leaving, failing, recalling) give the tokens they give alone."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref

import pytest
import torch

from headwise.cache.compact import CompactCache
from headwise.errors import InvalidInput
from headwise.models.runner import DecodeStats
from headwise.models.sampling import SamplingParams
from headwise.policies import get_policy
from services.decode.batcher import DecodeBatcher
from services.decode.recall import Recall
from services.decode.worker import DecodeWorker
from services.prefill.worker import PrefillWorker
from services.protos.headwise.v1 import generate_pb2 as pb
from services.settings import Settings
from services.tenancy import TenantRegistry
from tests.serving.test_workers import DOC, ByteTokenizer, ask

QUESTIONS = ["what jumps?", "over what?", "which fox?", "how quick?", "lazy who?"]
ANSWER_TOKENS = 40  # long enough that each stream is still decoding when the next one's cold prefill is done


def worker(runner, max_batch: int, store) -> DecodeWorker:
    settings = Settings(tenants="globex:kb:16", default_policy="streaming", max_prompt_tokens=900,
                        decode_max_batch=max_batch)
    pw = PrefillWorker(runner, store.clients(), settings)
    return DecodeWorker(runner, store.clients(), pw.prefill, TenantRegistry.from_settings(settings), settings)


async def answers(dw: DecodeWorker, policies=("streaming", "full", "snapkv", "streaming", "full")):
    return await asyncio.gather(*(ask(dw, key="kb", prompt=q, policy=p, max_new_tokens=ANSWER_TOKENS, kept=0.5)
                                  for q, p in zip(QUESTIONS, policies, strict=True)))


async def test_batched_streams_equal_one_at_a_time(tiny_model, store):
    from headwise.models import ModelRunner

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    alone = await answers(worker(runner, 1, store))
    (await store.settled()).clear()  # the batched run computes every document again, as the first one did
    dw = worker(runner, 32, store)
    together = await answers(dw)
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    assert all(len(ids) == ANSWER_TOKENS for ids, _ in together)
    fig = dw.stats()["batching"]
    assert fig["batched_steps"] > 0 and fig["mean_batch"] > 1.5  # the five streams really shared steps
    assert dw.batcher.live == 0


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference(runner, ids: list[int], params: SamplingParams) -> list[int]:
    """`ModelRunner.generate`, one sequence alone: what every batched stream must give."""
    res = runner.prefill_segment(ids)
    return list(runner.generate(res.cache, res.logits, params))


async def drain(stream) -> list[int]:
    return [tok async for tok in stream]


async def until(cond, timeout_s: float = 30.0) -> None:
    """Wait for the model thread to get to `cond` (the timeout only stops a hung test)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


async def test_streams_opened_together_give_the_reference_tokens(tiny_runner):
    params = [SamplingParams(max_new_tokens=9), SamplingParams(max_new_tokens=5, temperature=0.8, seed=3),
              SamplingParams(max_new_tokens=14, temperature=1.2, top_p=0.9, seed=7)]
    prompts = [prompt(30 + 10 * i, i) for i in range(3)]
    b = DecodeBatcher(tiny_runner)
    prefilled = [tiny_runner.prefill_segment(ids) for ids in prompts]
    streams = [b.open(res.cache, res.logits, p) for res, p in zip(prefilled, params, strict=True)]
    got = await asyncio.gather(*(drain(s) for s in streams))
    assert got == [reference(tiny_runner, ids, p) for ids, p in zip(prompts, params, strict=True)]
    assert b.rows == 8 + 4 + 13 and b.steps < b.rows and b.live == 0  # the streams shared steps, and all left


async def test_a_step_past_the_context_fails_alone(tiny_runner):
    b = DecodeBatcher(tiny_runner)
    full = tiny_runner.prefill_segment([5] * 10).cache
    full.seq_len = tiny_runner.max_positions  # as if it were full
    ok = tiny_runner.prefill_segment([5] * 10)
    logits = tiny_runner.prefill_segment([5] * 10).logits
    bad = b.open(full, logits, SamplingParams(max_new_tokens=4))
    good = b.open(ok.cache, ok.logits, SamplingParams(max_new_tokens=4))
    assert await bad.__anext__() == int(logits.argmax())  # the first token needs no step
    with pytest.raises(InvalidInput, match="exceeds the model's context"):
        await bad.__anext__()
    assert await drain(good) == reference(tiny_runner, [5] * 10, SamplingParams(max_new_tokens=4))
    assert b.steps == 3


async def test_a_failing_batch_reports_to_every_stream_and_the_thread_goes_on(tiny_runner):
    b = DecodeBatcher(tiny_runner)
    out_of_vocab = torch.zeros(10_001)
    out_of_vocab[10_000] = 1.0  # the first token is 10000: the model raises inside the batch
    failing = [b.open(tiny_runner.prefill_segment([5] * 10).cache, out_of_vocab, SamplingParams(max_new_tokens=4))
               for _ in range(2)]
    for s in failing:
        assert await s.__anext__() == 10_000
        with pytest.raises(IndexError):
            await s.__anext__()
    fresh = tiny_runner.prefill_segment([5] * 10)
    assert await drain(b.open(fresh.cache, fresh.logits, SamplingParams(max_new_tokens=4))) == \
        reference(tiny_runner, [5] * 10, SamplingParams(max_new_tokens=4))


async def test_a_stream_closed_mid_way_frees_its_row(tiny_runner):
    """A client gone after two tokens: its row leaves the batch, nothing holds its cache, and the
    stream still running gives the reference tokens."""
    b = DecodeBatcher(tiny_runner)
    params = SamplingParams(max_new_tokens=40)
    gone, stays = tiny_runner.prefill_segment(prompt(40, 1)), tiny_runner.prefill_segment(prompt(40, 2))
    s_gone = b.open(gone.cache, gone.logits, params)
    s_stays = b.open(stays.cache, stays.logits, params)
    first = [await s_gone.__anext__(), await s_gone.__anext__()]
    s_gone.close()
    ref = weakref.ref(gone.cache)
    del gone
    got = await drain(s_stays)
    assert got == reference(tiny_runner, prompt(40, 2), params)
    assert first == reference(tiny_runner, prompt(40, 1), params)[:2]
    assert b.live == 0
    del s_gone
    gc.collect()
    assert ref() is None  # no row, queue or view keeps the gone stream's cache


async def test_a_reader_that_stops_reading_holds_its_stream_only(tiny_runner):
    """Back pressure per stream: an unread stream runs `ahead` tokens ahead and waits there, while
    another stream goes on to its end; once read again it gives the reference tokens."""
    b = DecodeBatcher(tiny_runner, ahead=3)
    params = SamplingParams(max_new_tokens=12)
    slow, fast = tiny_runner.prefill_segment(prompt(20, 3)), tiny_runner.prefill_segment(prompt(20, 4))
    s_slow = b.open(slow.cache, slow.logits, params)
    s_fast = b.open(fast.cache, fast.logits, params)
    assert await drain(s_fast) == reference(tiny_runner, prompt(20, 4), params)
    assert slow.cache.seq_len == 20 + 2  # 3 tokens handed over, the last not yet stepped
    assert await drain(s_slow) == reference(tiny_runner, prompt(20, 3), params)


class OriginalsStore:
    """A store's `recall` answered from the prefilled segment's own recall table (the originals
    the real store keeps under the segment's key)."""

    def __init__(self, segment):
        self.segment, self.calls = segment, []

    async def recall(self, key, layer, head, row):
        await asyncio.sleep(0)  # a real hop through the event loop, as the gRPC client's
        self.calls.append((layer, head, row))
        lc = self.segment.layers[layer]
        rid = int(lc.recall_ids[int(lc.head_offsets[head]) + row])
        positions, keys, values = lc.recall.group(rid)
        return keys, values, positions


def recalled_reference(runner, ids, params, threshold) -> tuple[list[int], Recall, CompactCache]:
    """One sequence through `ModelRunner.generate`, its recalls swapped in between tokens."""
    res = runner.prefill_segment(ids, policy=get_policy("ems", kept=0.25))
    recall, stats = Recall("ctx", res.cache, OriginalsStore(res.segment)), DecodeStats()
    toks = []
    for tok in runner.generate(res.cache, res.logits, params, threshold, stats):
        toks.append(tok)
        recall.apply(res.cache, asyncio.run(recall.fetch(recall.wanted(res.cache, stats))))
    return toks, recall, res.cache


def test_recalls_between_steps_give_the_one_sequence_tokens(tiny_runner):
    """EMS merges rows; attention asks for some of them at each step, whose originals the batcher
    fetches on the event loop and swaps in before the stream's next step, while another stream
    goes on: the tokens, the rows swapped and the caches equal the one-sequence reference's."""
    ids, threshold = prompt(200, 0), 0.02  # 0.02: a few merged rows per step on the tiny model
    params = SamplingParams(max_new_tokens=10)
    ref_toks, ref_recall, ref_cache = recalled_reference(tiny_runner, ids, params, threshold)
    assert ref_recall.count >= 5  # recall really happened, in several heads and steps

    async def batched():
        b = DecodeBatcher(tiny_runner)
        res = tiny_runner.prefill_segment(ids, policy=get_policy("ems", kept=0.25))
        other = tiny_runner.prefill_segment(prompt(30, 5))
        store = OriginalsStore(res.segment)
        recall = Recall("ctx", res.cache, store)
        s = b.open(res.cache, res.logits, params, threshold, recall)
        o = b.open(other.cache, other.logits, SamplingParams(max_new_tokens=16))
        toks, other_toks = await asyncio.gather(drain(s), drain(o))
        return toks, other_toks, recall, res.cache

    toks, other_toks, recall, cache = asyncio.run(batched())
    assert toks == ref_toks and recall.count == ref_recall.count and recall.done == ref_recall.done
    assert other_toks == reference(tiny_runner, prompt(30, 5), SamplingParams(max_new_tokens=16))
    for a, r in zip(cache.layers, ref_cache.layers, strict=True):
        assert a.head_lengths().tolist() == r.head_lengths().tolist()
        assert torch.equal(a.keys, r.keys) and torch.equal(a.positions, r.positions)


async def test_a_client_gone_mid_stream_frees_its_row(tiny_model, store):
    """A client cancelled while its answer streams (a gRPC cancel or deadline cancels the task):
    the worker closes its stream, its row leaves the batch and the tenant's slot is free."""
    from headwise.models import ModelRunner

    dw = worker(ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama"), 32, store)
    task = asyncio.ensure_future(ask(dw, key="kb", prompt="what jumps?", max_new_tokens=200, kept=0.5))
    await until(lambda: dw.recent and dw.recent[-1].tokens >= 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: dw.batcher.live == 0)
    rec = dw.recent[-1]
    assert rec.cancelled and rec.tokens < 200 and dw.tenants.open_streams("globex") == 0
    steps = dw.batcher.steps
    await asyncio.sleep(0.2)
    assert dw.batcher.steps == steps  # nothing is stepped for it any more


async def test_sixteen_streams_run_without_a_thread_each(tiny_model, store):
    """The streams are queues on the event loop: while 16 decode at once, the process has the
    threads it has while one does (the model thread among them), and no stream thread."""
    from headwise.models import ModelRunner

    dw = worker(ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama"), 32, store)
    await ask(dw, key="kb", prompt="warm up", max_new_tokens=2)  # the prefill thread, the store

    async def threads_while(n: int) -> set[str]:
        """Thread names while n streams are open at once: each read up to its first token and
        then held (its row waits for its reader), so none ends before the last one opens."""
        streams = [dw.generate(pb.GenerateRequest(context=DOC, prompt=f"question {i}?", max_new_tokens=200,
                                                  policy="streaming", kept=0.5), {"authorization": "Bearer kb"})
                   for i in range(n)]
        for s in streams:
            await s.__anext__()
        await until(lambda: dw.batcher.live == n and dw.batcher.steps > 0)
        names = {f"{t.name}#{t.ident}" for t in threading.enumerate()}
        for s in streams:
            await s.aclose()
        await until(lambda: dw.batcher.live == 0)
        return names

    one, sixteen = await threads_while(1), await threads_while(16)
    assert len(sixteen) <= len(one), sixteen - one
    assert any(n.startswith("decode-batch#") for n in sixteen)
    assert not any(n.startswith("decode-stream") for n in sixteen)


async def test_the_event_loop_runs_no_torch_work_of_a_stream(tiny_runner, monkeypatch):
    """Every token is picked on the model thread, the first (from the prefill's logits) too, and
    `run` puts other work there: a thread that runs parallel torch ops keeps an OpenMP team for
    life, and one team too many makes every worker sleep between parallel regions."""
    from headwise.models.sampling import TokenPicker

    where: list[str] = []
    pick = TokenPicker.pick

    def recorded(self, logits):
        where.append(threading.current_thread().name)
        return pick(self, logits)

    monkeypatch.setattr(TokenPicker, "pick", recorded)
    b = DecodeBatcher(tiny_runner)
    ids = prompt(30, 4)
    res = tiny_runner.prefill_segment(ids)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=2)
    got = await drain(b.open(res.cache, res.logits, params))
    assert where == ["decode-batch"] * 6
    monkeypatch.setattr(TokenPicker, "pick", pick)
    assert got == reference(tiny_runner, ids, params)
    assert await b.run(lambda x: (threading.current_thread().name, x + 1), 41) == ("decode-batch", 42)
    with pytest.raises(ValueError, match="no segments"):
        await b.run(CompactCache.concat, [])
    one = await drain(b.open(res.cache, res.logits, SamplingParams(max_new_tokens=1)))  # done at its first token
    assert len(one) == 1 and b.live == 0


async def test_a_stream_alone_builds_its_decode_views_once_and_the_idle_thread_blocks(tiny_runner, monkeypatch):
    """No view rebuild per step while the batch does not change; with nothing to step the model
    thread waits on its inbox (no polling)."""
    import headwise.models.runner as runner_mod

    built = []
    views = runner_mod.DecodeViews

    def counted(*a, **k):
        built.append(len(a[0]))
        return views(*a, **k)

    monkeypatch.setattr(runner_mod, "DecodeViews", counted)
    b = DecodeBatcher(tiny_runner)
    takes = []
    take = b._take
    monkeypatch.setattr(b, "_take", lambda block: (takes.append(block), take(block))[1])
    res = tiny_runner.prefill_segment(prompt(30, 5))
    got = await drain(b.open(res.cache, res.logits, SamplingParams(max_new_tokens=20)))
    assert len(got) == 20 and b.steps == 19
    assert built == [1]  # one stream, 19 steps, the views built once
    await until(lambda: takes and takes[-1] is True)  # the thread went back to a blocking wait
    idle = len(takes)
    await asyncio.sleep(0.2)
    assert len(takes) == idle  # and stayed in it


def test_the_thread_guard_falls_back_to_one_thread_while_starved_and_tries_again(monkeypatch):
    """Steps that got under `floor` cores on average over a window run at one torch thread for
    `hold` steps, then at the configured count again; healthy steps and one thread stay put."""
    from services.decode import batcher as mod

    calls: list[int] = []
    monkeypatch.setattr(mod.torch, "set_num_threads", calls.append)

    def run(threads: int, cores: float, steps: int, hold: int = 5) -> mod.ThreadGuard:
        monkeypatch.setattr(mod.torch, "get_num_threads", lambda: threads)
        t = [0.0, 0.0]

        def clock():  # each step: 1 s of wall, `cores` s of CPU
            t[0] += cores / 2
            t[1] += 0.5
            return t[0], t[1]

        g = mod.ThreadGuard(window=4, floor=0.75, hold=hold, clock=clock)
        for _ in range(steps):
            g.before()
            g.after()
        return g

    assert run(2, 1.8, 40).fallbacks == 0 and calls == []
    assert run(1, 0.1, 40).fallbacks == 0 and calls == []
    g = run(2, 0.2, 4 + 5)  # a starved window, then the hold
    assert g.fallbacks == 1 and calls == [1, 2] and g.left == 0
    calls.clear()
    g = run(2, 0.2, 4 + 5 + 4)  # starved again after trying 2 threads once more
    assert g.fallbacks == 2 and calls == [1, 2, 1]
