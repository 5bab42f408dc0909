"""Continuous batching in the decode worker: streams stepped together give the tokens they give alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from headwise.errors import InvalidInput
from services.decode.batcher import DecodeBatcher
from services.decode.worker import DecodeWorker
from services.prefill.worker import PrefillWorker
from services.settings import Settings
from services.tenancy import TenantRegistry
from tests.serving.test_workers import ByteTokenizer, ask

QUESTIONS = ["what jumps?", "over what?", "which fox?", "how quick?", "lazy who?"]


def worker(runner, max_batch: int, store) -> DecodeWorker:
    settings = Settings(tenants="globex:kb", default_policy="streaming", max_prompt_tokens=900,
                        decode_max_batch=max_batch)
    pw = PrefillWorker(runner, store.clients(), settings)
    return DecodeWorker(runner, store.clients(), pw.prefill, TenantRegistry.from_settings(settings), settings)


async def answers(dw: DecodeWorker, policies=("streaming", "full", "snapkv", "streaming", "full")):
    return await asyncio.gather(*(ask(dw, key="kb", prompt=q, policy=p, max_new_tokens=12, kept=0.5)
                                  for q, p in zip(QUESTIONS, policies, strict=True)))


async def test_batched_streams_equal_one_at_a_time(tiny_model, store):
    from headwise.models import ModelRunner

    runner = ModelRunner(tiny_model, ByteTokenizer(), name="tiny-llama")
    alone = await answers(worker(runner, 1, store))
    (await store.settled()).clear()  # the batched run computes every document again, as the first one did
    dw = worker(runner, 32, store)
    together = await answers(dw)
    assert [ids for ids, _ in together] == [ids for ids, _ in alone]
    assert all(len(ids) == 12 for ids, _ in together)
    fig = dw.stats()["batching"]
    assert fig["batched_steps"] > 0 and fig["mean_batch"] > 1.5  # the five streams really shared steps
    assert dw.batcher.live == 0


def test_a_step_past_the_context_fails_alone(tiny_runner):
    b = DecodeBatcher(tiny_runner)  # its thread is a daemon: it ends with the process
    cache = tiny_runner.prefill_segment([5] * 10).cache
    cache.seq_len = tiny_runner.max_positions  # as if it were full
    with pytest.raises(InvalidInput, match="exceeds the model's context"):
        b.step(5, cache)
    ok = tiny_runner.prefill_segment([5] * 10).cache
    assert b.step(5, ok).shape == (tiny_runner.model.config.vocab_size,) and b.steps == 1


def test_a_failing_batch_reports_to_every_stream_and_the_thread_goes_on(tiny_runner):
    b = DecodeBatcher(tiny_runner)
    cache = tiny_runner.prefill_segment([5] * 10).cache
    with pytest.raises(IndexError):
        b.step(10_000, cache)  # out of the vocabulary: the model raises inside the batch
    fresh = tiny_runner.prefill_segment([5] * 10).cache
    assert torch.isfinite(b.step(5, fresh)).all()
