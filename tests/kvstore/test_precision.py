"""int8, int4 and bf16 rows through the real store (gRPC on loopback, a real Redis): the store keeps
and sends the quantised bytes, the client gives back the rows as_stored predicts."""

from __future__ import annotations

import pytest
import torch

from headwise.cache import quant
from headwise.cache.codec import (
    decode_recall,
    encode,
    encode_recall_rows,
    encoded_nbytes,
    parse_header,
    prepare,
    stored_nbytes,
)
from tests.kvstore.conftest import small_cache
from tests.test_codec_precision import assert_exact_but_rows


@pytest.mark.parametrize("precision", ["int8", "int4", "bf16"])
async def test_quantised_rows_through_the_store(service, precision) -> None:
    c = service.client()
    cache = small_cache(3, lens=(40, 9), d=64)
    sent = await c.put("seg-q", cache, precision)
    assert sent == stored_nbytes(cache, precision) < stored_nbytes(cache, "fp32")
    header, frames = await c.get_encoded("seg-q")
    assert parse_header(header).rows == quant.ROW_FORMATS[precision]
    assert len(header) + sum(map(len, frames)) == encoded_nbytes(cache, precision)
    back = await c.get("seg-q")
    assert_exact_but_rows(cache, back, recall_data=False)
    want = quant.as_stored(cache, precision)
    for x, y in zip(want.layers, back.layers, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    k, v, _ = await c.recall("seg-q", layer=1, head=0, row=1)  # recall originals at the same precision
    want_k, want_v, _ = decode_recall(encode_recall_rows(*cache.layers[1].recall.group(1), precision))
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    exact = cache.layers[1].recall.keys[2:4]
    assert k.dtype == exact.dtype and not torch.equal(k, exact)


async def test_a_prepared_cache_is_put_as_prepared(service) -> None:
    c = service.client()
    cache = small_cache(5, lens=(40, 9), d=64)
    prep = prepare(cache, "int8")
    assert await c.put("seg-p", prep) == await c.put("seg-p", prep, "int8") == prep.stored_nbytes
    back = await c.get("seg-p")
    for x, y in zip(prep.stored().layers, back.layers, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)
    with pytest.raises(ValueError, match="prepared at precision 'int8'"):
        await c.put("seg-p", prep, "fp32")


async def test_int8_segment_is_a_quarter_of_fp32_on_the_wire_and_int4_a_seventh(service) -> None:
    c = service.client()
    cache = small_cache(4, layers=3, lens=(300, 200), d=64, merged=0)
    fp32, int8, int4 = [await c.put(f"seg-{p}", cache, p) for p in ("fp32", "int8", "int4")]
    assert fp32 == encode(cache, include_recall=False).nbytes
    assert 3.5 < fp32 / int8 < 4  # rows 4x; scales, positions, log-weights and ids are the rest
    assert 6 < fp32 / int4 < 7.2  # rows 8x, less a bf16 scale per 32 values
