"""kv_precision through prefill and decode (tiny model, the kvstore over its MemoryBackend): part of the segment
key, answers equal between cold and reused requests, true byte figures, bad values rejected."""

from __future__ import annotations

import pytest

from headwise.cache.codec import encoded_nbytes, stored_nbytes
from services.errors import ServiceError
from tests.serving.test_workers import ask, stack  # noqa: F401 - the fixture


@pytest.mark.parametrize("precision", ["int8", "int4"])
async def test_quantised_cold_and_reused_give_the_same_answer(stack, precision):  # noqa: F811
    dw, store, calls = stack
    cold_ids, cold = await ask(dw, kv_precision=precision)
    warm_ids, warm = await ask(dw, kv_precision=precision)
    assert (cold.store_status, warm.store_status) == ("stored", "reused")
    assert warm_ids == cold_ids and cold.kv_precision == warm.kv_precision == precision
    assert calls[-1].kv_precision == precision
    await store.settled()
    (seg,) = store.segments()
    assert warm.stored_kv_bytes == cold.stored_kv_bytes
    # reused: the context fetched (its Get bytes) plus the question computed and put
    assert warm.wire_bytes > encoded_nbytes(seg, precision)


async def test_precisions_never_share_a_stored_cache(stack):  # noqa: F811
    dw, store, _ = stack
    _, a = await ask(dw, kv_precision="int8")
    _, b = await ask(dw, kv_precision="fp32")
    _, c = await ask(dw, kv_precision="bf16")
    _, d = await ask(dw)  # the server default: fp32
    _, e = await ask(dw, kv_precision="int4")
    assert [f.store_status for f in (a, b, c, d, e)] == ["stored", "stored", "stored", "reused", "stored"]
    assert d.kv_precision == "fp32" and e.kv_precision == "int4" and len(await store.settled()) == 4
    assert b.held_kv_bytes == a.held_kv_bytes == c.held_kv_bytes == e.held_kv_bytes  # decode holds fp32 rows in every case
    assert b.stored_kv_bytes > c.stored_kv_bytes > a.stored_kv_bytes > e.stored_kv_bytes


async def test_stored_bytes_are_those_of_the_chain(stack):  # noqa: F811
    dw, store, calls = stack
    _, f = await ask(dw, kv_precision="int8", session_id="s1")  # a session keeps the question too
    await store.settled()
    segs = store.segments()
    assert len(segs) == 2
    assert f.stored_kv_bytes == sum(stored_nbytes(s, "int8") for s in segs)
    assert f.wire_bytes == f.stored_kv_bytes + encoded_nbytes(segs[0], "int8") + encoded_nbytes(segs[1], "int8")


async def test_server_default_precision(stack):  # noqa: F811
    dw, store, _ = stack
    dw.settings.default_kv_precision = "int8"
    _, f = await ask(dw)
    assert f.kv_precision == "int8" and len(await store.settled()) == 1


async def test_unknown_precision_is_invalid_argument(stack):  # noqa: F811
    dw, _, _ = stack
    with pytest.raises(ServiceError) as e:
        await ask(dw, kv_precision="int2")
    assert e.value.code == "INVALID_ARGUMENT" and "allowed: fp32, bf16, int8, int4" in e.value.message
