"""int8 and bf16 rows through the real store (gRPC on loopback, a real Redis): the store keeps
and sends the quantised bytes, the client gives back the rows as_stored predicts."""

from __future__ import annotations

import pytest
import torch

from headwise.cache import quant
from headwise.cache.codec import encode, encoded_nbytes, parse_header, stored_nbytes
from tests.kvstore.conftest import small_cache
from tests.test_codec_precision import assert_exact_but_rows


@pytest.mark.parametrize("precision", ["int8", "bf16"])
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
    k, v, _ = await c.recall("seg-q", layer=1, head=0, row=1)  # recall originals stay exact
    assert torch.equal(k, cache.layers[1].recall.keys[2:4]) and torch.equal(v, cache.layers[1].recall.values[2:4])


async def test_int8_segment_is_a_quarter_of_fp32_on_the_wire(service) -> None:
    c = service.client()
    cache = small_cache(4, layers=3, lens=(300, 200), d=64, merged=0)
    fp32, int8 = [await c.put(f"seg-{p}", cache, p) for p in ("fp32", "int8")]
    assert fp32 == encode(cache, include_recall=False).nbytes
    assert 3.5 < fp32 / int8 < 4  # rows 4x; scales, positions, log-weights and ids are the rest
