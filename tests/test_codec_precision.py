"""Codec row precisions: int8 rows (one scale per head and channel), int4 rows (one per head,
channel and group of 32 rows) and float casts round-trip within the stated bound; every other
field, and every ragged layout, exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from headwise.cache import quant
from headwise.cache.codec import (
    CodecError,
    decode,
    decode_recall,
    encode,
    encode_recall,
    encode_recall_rows,
    encode_streaming,
    encoded_nbytes,
    parse_header,
    prepare,
    stored_nbytes,
)
from headwise.cache.compact import CompactCache, LayerCache
from tests.test_codec import DTYPES, SETTINGS, caches, make_layer, make_pod_cache

PRECISIONS = ["int8", "int4", "bf16", "fp16", "fp32"]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_exact_but_rows(a: CompactCache, b: CompactCache, recall_data: bool = True) -> None:
    """Every field but the K and V rows identical (dtype too); the rows of the same shape and dtype."""
    assert (a.seq_len, a.start, a.meta, a.num_layers) == (b.seq_len, b.start, b.meta, b.num_layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("head_offsets", "positions", "log_weights", "recall_ids"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name
        for name in ("keys", "values"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and tx.shape == ty.shape, name
        assert (x.distant is None) == (y.distant is None) and x.distant_from == y.distant_from
        if x.distant is not None:
            assert torch.equal(x.distant, y.distant)
        assert (x.recall is None) == (y.recall is None)
        if x.recall is not None:
            names = ("offsets", "positions", "heads") + (("keys", "values") if recall_data else ())
            for name in names:  # recall originals stay exact (the cache's own dtype)
                tx, ty = getattr(x.recall, name), getattr(y.recall, name)
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), f"recall.{name}"


def assert_rows_within_bound(orig: LayerCache, back: LayerCache, precision: str) -> None:
    dt = orig.keys.dtype
    if precision not in quant.QUANTISED:
        fmt = quant.FLOAT_ROWS[quant.ROW_FORMATS[precision]]
        assert torch.equal(back.keys, orig.keys.to(fmt).to(dt)) and torch.equal(back.values, orig.values.to(fmt).to(dt))
        return
    _, ks = quant.quantise_rows(orig.keys, orig.key_offsets(), precision)
    _, vs = quant.quantise_rows(orig.values, orig.head_offsets, precision)
    kb = quant.error_bound(quant.element_scales(ks, orig.key_offsets(), orig.keys.shape[0], precision))  # [Rk, d]
    vb = quant.error_bound(quant.element_scales(vs, orig.head_offsets, orig.values.shape[0], precision))  # [R, d]
    for x, y, bound in ((orig.keys, back.keys, kb), (orig.values, back.values, vb)):
        err = (x.float() - y.float()).abs()
        assert bool((err <= bound + EPS[dt] * x.float().abs() + 1e-30).all()), float((err - bound).max())


@SETTINGS
@given(cache=caches(), chunk=st.integers(1, 300), precision=st.sampled_from(PRECISIONS))
def test_round_trip_within_the_bound(cache: CompactCache, chunk: int, precision: str) -> None:
    enc = encode(cache, chunk_size=chunk, precision=precision)
    back = decode(enc.header, enc.chunks)
    assert_exact_but_rows(cache, back)
    for x, y in zip(cache.layers, back.layers, strict=True):
        assert_rows_within_bound(x, y, precision)
    assert enc.nbytes == encoded_nbytes(cache, precision, include_recall=True, chunk_size=chunk)
    # what prefill computes later segments over is exactly what decode gets back
    stored = quant.as_stored(cache, precision)
    for x, y in zip(stored.layers, back.layers, strict=True):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


def assert_recall_within_bound(orig: CompactCache, back: CompactCache, precision: str) -> None:
    """Recall originals of every merged row as the blobs give them back: exact when lossless, else
    cast (bf16, fp16) or within the int8 bound of the row's own per-channel scales (int4 puts
    write int8 blobs)."""
    for x, y in zip(orig.layers, back.layers, strict=True):
        if x.recall is None or x.recall.num_groups == 0 or x.recall.keys.shape[0] == 0:
            continue
        dt = x.keys.dtype
        for g in range(x.recall.num_groups):
            _, kx, vx = x.recall.group(g)
            _, ky, vy = y.recall.group(g)
            for a, b in ((kx, ky), (vx, vy)):
                assert a.dtype == b.dtype == dt and a.shape == b.shape
                if quant.lossless(precision, dt):
                    assert torch.equal(a, b)
                elif precision not in quant.QUANTISED:
                    assert torch.equal(b, a.to(quant.FLOAT_ROWS[quant.ROW_FORMATS[precision]]).to(dt))
                else:
                    _, s = quant.quantise(a, torch.tensor([0, a.shape[0]]))
                    err = (a.float() - b.float()).abs()
                    assert bool((err <= quant.error_bound(s) + EPS[dt] * a.float().abs() + 1e-30).all())


@SETTINGS
@given(cache=caches(), precision=st.sampled_from(PRECISIONS))
def test_recall_split_off_and_stored_bytes(cache: CompactCache, precision: str) -> None:
    enc = encode(cache, include_recall=False, precision=precision)
    entries = encode_recall(cache, precision)
    back = decode(enc.header, enc.chunks, recall=entries)
    assert_exact_but_rows(cache, back, recall_data=False)
    assert_recall_within_bound(cache, back, precision)
    assert encoded_nbytes(cache, precision) == enc.nbytes
    assert stored_nbytes(cache, precision) == enc.nbytes + sum(len(e.data) for e in entries)
    lazy = encode_streaming(cache, include_recall=False, precision=precision)
    assert lazy.header != enc.header and list(lazy.frames())[0][40:] == enc.chunks[0][40:]  # same payload, new id


@SETTINGS
@given(cache=caches(), precision=st.sampled_from(PRECISIONS))
def test_a_prepared_cache_sends_the_same_bytes_and_knows_its_stored_rows(cache: CompactCache, precision: str) -> None:
    """prepare() quantises once (the prefill's model thread): the segment it streams has the payload
    of a plain encode, its recall blobs are encode_recall's, and stored() is bit for bit what
    decoding the segment gives (and what quant.as_stored computes)."""
    prep = prepare(cache, precision)
    seg, plain = encode_streaming(prep), encode(cache, include_recall=False, precision=precision)
    assert [f[40:] for f in seg.frames()] == [c[40:] for c in plain.chunks]
    assert [(e.layer, e.head, e.row, e.data) for e in prep.recall] == \
        [(e.layer, e.head, e.row, e.data) for e in encode_recall(cache, precision)]
    assert prep.stored_nbytes == stored_nbytes(cache, precision)
    back, stored, by_quant = decode(seg.header, list(seg.frames())), prep.stored(), quant.as_stored(cache, precision)
    for x, y, z in zip(stored.layers, back.layers, by_quant.layers, strict=True):
        for name in ("keys", "values"):
            assert torch.equal(getattr(x, name), getattr(y, name)) and torch.equal(getattr(x, name), getattr(z, name))
    with pytest.raises(CodecError, match="prepared at precision"):
        encode_streaming(prep, precision="bf16" if precision != "bf16" else "int8")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_recall_blob_rows_at_the_precision(dtype: torch.dtype, precision: str) -> None:
    gen = torch.Generator().manual_seed(11)
    k, v = torch.randn(7, 16, generator=gen).to(dtype) * 3, torch.randn(7, 16, generator=gen).to(dtype)
    pos = torch.arange(100, 107)
    blob = encode_recall_rows(pos, k, v, precision)
    k2, v2, p2 = decode_recall(blob)
    assert torch.equal(p2, pos) and k2.dtype == v2.dtype == dtype
    lossless = quant.lossless(precision, dtype)
    item = {"int8": 1, "int4": 1, "bf16": 2, "fp16": 2}.get(precision, k.element_size())
    scales = 2 * 16 * 4 if precision in quant.QUANTISED else 0  # int4: the blob's rows are int8
    assert len(blob) == 16 + 8 * 7 + scales + 2 * 7 * 16 * (k.element_size() if lossless else item) + 4
    if lossless:
        assert torch.equal(k2, k) and torch.equal(v2, v)
        assert blob == encode_recall_rows(pos, k, v)  # the dtype's own rows: the blob of before
    elif precision in quant.QUANTISED:
        assert blob == encode_recall_rows(pos, k, v, "int8")
        for a, b in ((k, k2), (v, v2)):
            _, s = quant.quantise(a, torch.tensor([0, 7]))
            assert bool(((a.float() - b.float()).abs() <= quant.error_bound(s) + EPS[dtype] * a.float().abs() + 1e-30).all())
    empty = decode_recall(encode_recall_rows(pos[:0], k[:0], v[:0], precision))
    assert empty[0].shape == (0, 16) and empty[2].numel() == 0


_BLOB8 = encode_recall_rows(torch.arange(5), torch.randn(5, 8), torch.randn(5, 8), "int8")


@SETTINGS
@given(data=st.data())
def test_damaged_int8_recall_blobs_are_rejected(data) -> None:
    b = bytearray(_BLOB8)
    kind = data.draw(st.sampled_from(["flip", "cut", "pad"]))
    if kind == "flip":
        b[data.draw(st.integers(0, len(b) - 1))] ^= data.draw(st.integers(1, 255))
    elif kind == "cut":
        del b[data.draw(st.integers(0, len(b) - 1)):]
    else:
        b += bytes(data.draw(st.integers(1, 64)))
    with pytest.raises(CodecError):
        decode_recall(bytes(b))


def test_recall_blobs_of_an_unknown_format_or_version_are_rejected() -> None:
    import struct
    import zlib

    def recode(blob: bytes, **change) -> bytes:
        magic, version, code, m, d = struct.unpack_from("<4sHHII", blob)
        fields = {"version": version, "code": code, **change}
        body = struct.pack("<4sHHII", magic, fields["version"], fields["code"], m, d) + blob[16:-4]
        return body + zlib.crc32(body).to_bytes(4, "little")

    code = struct.unpack_from("<H", _BLOB8, 6)[0]
    assert code >> 8 == 4 and code & 0xFF == 1  # int8 rows of an fp32 cache
    with pytest.raises(CodecError, match="unknown dtype / row format code 0x901"):
        decode_recall(recode(_BLOB8, code=0x901))
    with pytest.raises(CodecError, match="codec version 2"):
        decode_recall(recode(_BLOB8, version=2))
    with pytest.raises(CodecError, match="header says"):  # int8 rows announced as the dtype's own
        decode_recall(recode(_BLOB8, code=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_pod_rows_empty_heads_and_the_tail(dtype: torch.dtype, precision: str) -> None:
    cache = make_pod_cache(torch.Generator().manual_seed(3), dtype)
    gen = torch.Generator().manual_seed(9)
    cache.layers.append(make_layer(gen, [0, 5, 0], 4, dtype, 0))  # empty heads
    cache.layers[1].append(torch.ones(3, 2, 4, dtype=dtype), torch.ones(3, 2, 4, dtype=dtype), torch.tensor([20, 21]))
    for chunk in (7, 64, 1 << 20):
        enc = encode(cache, chunk_size=chunk, precision=precision)
        back, want = decode(enc.header, enc.chunks), cache.compacted()
        assert_exact_but_rows(want, back)
        for x, y in zip(want.layers, back.layers, strict=True):
            assert_rows_within_bound(x, y, precision)
        assert back.layers[1].keys.shape[0] < back.layers[1].values.shape[0]
        assert parse_header(enc.header).rows == quant.ROW_FORMATS[precision]


def test_int8_rows_and_scales_take_a_quarter_of_fp32() -> None:
    """Per layer: K and V rows 1 byte per element, plus [H, d] fp32 scales for each; the default
    model's shape (3 heads, d 64) at 500 rows a head: within 2% of 4x."""
    H, n, d = 3, 500, 64
    layer = LayerCache.from_dense(torch.randn(H, n, d), torch.randn(H, n, d), torch.arange(n))
    cache = CompactCache([layer] * 4, n)
    fields = {}
    for p in ("fp32", "int8"):
        from headwise.cache.codec import _layer_shape, _layout

        fs, _ = _layout([_layer_shape(layer, False)], d, torch.float32, quant.ROW_FORMATS[p])
        fields[p] = {f.name: f.nbytes for f in fs}
    rows32 = fields["fp32"]["keys"] + fields["fp32"]["values"]
    rows8 = sum(fields["int8"][k] for k in ("keys", "values", "key_scales", "value_scales"))
    assert rows8 == 2 * H * n * d + 2 * 4 * H * d
    assert 3.92 < rows32 / rows8 < 4
    assert 3.92 < encoded_nbytes(cache, "fp32") / encoded_nbytes(cache, "int8") < 4  # a plain layer: positions only


def test_quantised_rows_are_per_head_and_channel() -> None:
    rows = torch.tensor([[1.0, -200.0], [0.5, 100.0], [3.0, 0.0]])  # head 0: rows 0-1, head 1: row 2
    offs = torch.tensor([0, 2, 3])
    q, s = quant.quantise(rows, offs)
    assert torch.allclose(s, torch.tensor([[1 / 127, 200 / 127], [3 / 127, 0.0]]))
    assert q.tolist() == [[127, -127], [64, 64], [127, 0]]
    assert torch.allclose(quant.dequantise(q, s, offs, torch.float32), rows, atol=0.8)
    q, s = quant.quantise(torch.zeros(0, 2), torch.tensor([0, 0, 0]))  # empty heads
    assert q.shape == (0, 2) and not bool(s.any())


def test_bad_precision_and_non_finite_rows_are_rejected() -> None:
    gen = torch.Generator().manual_seed(1)
    cache = CompactCache([make_layer(gen, [3, 2], 4, torch.float32, 0)], 5)
    with pytest.raises(CodecError, match="not one of fp32, bf16, fp16, int8, int4"):
        encode(cache, precision="int2")
    cache.layers[0].values[1, 2] = float("nan")
    with pytest.raises(CodecError, match="cannot be stored as int8"):
        encode(cache, precision="int8")
    encode(cache, precision="fp32")  # a float format carries it as it is
    cache.layers[0].positions[0] = 2**40
    with pytest.raises(CodecError, match="int32 range"):
        encode(cache)


def _small(precision: str):
    gen = torch.Generator().manual_seed(2)
    return encode(make_pod_cache(gen, torch.float32), chunk_size=48, precision=precision)


_SMALL8 = _small("int8")
_SMALL = {"int8": _SMALL8, "int4": _small("int4")}


@SETTINGS
@given(data=st.data(), precision=st.sampled_from(["int8", "int4"]))
def test_damaged_quantised_segments_are_rejected(data, precision: str) -> None:
    enc = _SMALL[precision]
    parts = [enc.header, *enc.chunks]
    kind = data.draw(st.sampled_from(["flip", "swap", "dup", "drop", "cut"]))
    i = data.draw(st.integers(1 if kind != "flip" else 0, len(parts) - 1))
    if kind == "flip":
        j = data.draw(st.integers(0, len(parts[i]) - 1))
        b = bytearray(parts[i])
        b[j] ^= data.draw(st.integers(1, 255))
        parts[i] = bytes(b)
    elif kind == "swap":
        j = data.draw(st.integers(1, len(parts) - 1).filter(lambda j: parts[j] != parts[i]))
        parts[i], parts[j] = parts[j], parts[i]
    elif kind == "dup":
        parts.insert(i, parts[i])
    elif kind == "drop":
        del parts[i]
    else:
        parts[i] = parts[i][: data.draw(st.integers(0, len(parts[i]) - 1))]
    with pytest.raises(CodecError):
        decode(parts[0], parts[1:])


def test_a_header_with_an_unknown_row_format_is_rejected() -> None:
    import dataclasses

    h = parse_header(_SMALL8.header)
    with pytest.raises(CodecError, match="unknown row format 'int2'"):
        parse_header(dataclasses.replace(h, rows="int2").to_bytes())
    with pytest.raises(CodecError, match="inconsistent"):  # int8 layout announced as fp32 rows
        parse_header(dataclasses.replace(h, rows="float32").to_bytes())


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_stored_bytes_of_a_cache_read_back_count_its_recall_blobs(precision: str) -> None:
    gen = torch.Generator().manual_seed(6)
    cache = CompactCache([make_layer(gen, [6, 3], 8, torch.bfloat16, 3) for _ in range(2)], 9)
    enc = encode(cache, include_recall=False, precision=precision)
    back = decode(enc.header, enc.chunks)  # handles only
    assert back.layers[0].recall.keys.shape[0] == 0
    assert stored_nbytes(back, precision) == stored_nbytes(cache, precision)
    assert encoded_nbytes(back, precision) == enc.nbytes


@pytest.mark.parametrize("precision", [None, "int8"])
def test_plain_layers_and_wide_positions(precision) -> None:
    """A layer of ordinary rows only (log-weights 0, no recall ids) carries neither field; positions
    travel as int16 up to 32767 and as int32 beyond; all come back exactly."""
    gen = torch.Generator().manual_seed(8)
    plain = LayerCache.from_dense(torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen),
                                  torch.arange(40_000, 40_005))
    mixed = make_layer(gen, [4, 3], 8, torch.float32, 2)
    cache = CompactCache([plain, mixed], 40_005, 39_000)
    enc = encode(cache, precision=precision)
    h = parse_header(enc.header)
    assert [(s.plain, s.pos16) for s in h.layers] == [(True, False), (False, True)]
    back = decode(enc.header, enc.chunks)
    assert_exact_but_rows(cache, back)
    assert back.layers[0].recall_ids.dtype == torch.int64 and int(back.layers[0].recall_ids.max()) == -1
    assert enc.nbytes == encoded_nbytes(cache, precision, include_recall=True)


def test_the_precision_is_part_of_every_segment_key() -> None:
    from headwise.cache.keys import chain_keys, segment_key

    keys = {p: segment_key(None, [1, 2, 3], "m", {"policy": "kvzip", "kept": 0.25}, 3, "salt", p) for p in quant.PRECISIONS}
    assert len(set(keys.values())) == len(quant.PRECISIONS)
    assert keys["fp32"] == segment_key(None, [1, 2, 3], "m", {"policy": "kvzip", "kept": 0.25}, 3, "salt")
    chains = {p: chain_keys([[1, 2, 3], [4]], "m", [{"policy": "full"}] * 2, 3, "salt", p) for p in ("fp32", "int8")}
    assert not set(chains["fp32"]) & set(chains["int8"])


def test_int4_rows_and_scales_take_about_a_seventh_of_fp32() -> None:
    """Per layer: K and V rows half a byte per element, plus a bf16 [groups, d] scale table each
    (one group per 32 rows of a head); the default model's shape (3 heads, d 64) at 500 rows a head."""
    from headwise.cache.codec import _layer_shape, _layout

    H, n, d = 3, 500, 64
    layer = LayerCache.from_dense(torch.randn(H, n, d), torch.randn(H, n, d), torch.arange(n))
    cache = CompactCache([layer] * 4, n)
    fields = {}
    for p in ("fp32", "int4"):
        fs, _ = _layout([_layer_shape(layer, False, quant.ROW_FORMATS[p])], d, torch.float32, quant.ROW_FORMATS[p])
        fields[p] = {f.name: f.nbytes for f in fs}
    groups = H * -(-n // quant.GROUP4)
    rows4 = sum(fields["int4"][k] for k in ("keys", "values", "key_scales", "value_scales"))
    assert rows4 == 2 * H * n * d // 2 + 2 * 2 * groups * d
    ratio = (fields["fp32"]["keys"] + fields["fp32"]["values"]) / rows4
    assert 7.0 < ratio < 7.2  # 8x for the rows, less the scales (2 bytes per 32 values)
    assert 6.8 < encoded_nbytes(cache, "fp32") / encoded_nbytes(cache, "int4") < 7.2


def test_int4_packing_two_values_a_byte_per_head_group_and_channel() -> None:
    # head 0: 33 rows (groups of 32 and 1), head 1: empty, head 2: 2 rows; d = 3 (odd: a pad nibble)
    x = torch.zeros(35, 3)
    x[:32, 0], x[32, 0] = 7.0, -0.5  # group 0 channel 0: scale 1; group 1: its own, 0.5 / 7
    x[5, 1], x[33, 2], x[34, 2] = -3.5, 14.0, -7.0  # group 0 channel 1: 0.5; group 2 channel 2: 2
    offs = torch.tensor([0, 33, 33, 35])
    assert quant.group_count(offs) == 3
    assert quant.group_index(offs, 35).tolist() == [0] * 32 + [1, 2, 2]
    packed, s = quant.quantise4(x, offs)
    assert packed.dtype == torch.uint8 and packed.shape == (35, 2) and s.dtype == torch.bfloat16 and s.shape == (3, 3)
    assert s.float()[0].tolist() == [1.0, 0.5, 0.0] and s.float()[2, 2] == 2.0
    assert float(s.float()[1, 0]) >= 0.5 / 7  # rounded up to a bf16
    assert packed[0].tolist() == [0x07, 0x00] and packed[5].tolist() == [(0x07 | (0x9 << 4)), 0x00]  # -7 = 0x9
    assert packed[33].tolist() == [0x00, 0x07] and packed[34].tolist() == [0x00, 0x0C]  # 7 and -4 (-7 / 2 -> -4)
    back = quant.dequantise4(packed, s, offs, torch.float32)
    assert back[0, 0] == 7.0 and back[5, 1] == -3.5 and back[33, 2] == 14.0 and back[34, 2] == -8.0
    assert abs(float(back[32, 0]) + 0.5) <= 0.5 * float(s.float()[1, 0])
    assert quant.unpack4(torch.tensor([[0x8F]], dtype=torch.uint8), 2).tolist() == [[-1, -8]]
    q, s = quant.quantise4(torch.zeros(0, 2), torch.tensor([0, 0, 0]))  # empty heads
    assert q.shape == (0, 1) and s.shape == (0, 2)


def test_int4_rejects_rows_it_cannot_scale() -> None:
    gen = torch.Generator().manual_seed(1)
    cache = CompactCache([make_layer(gen, [3, 2], 4, torch.float32, 0)], 5)
    cache.layers[0].keys[0, 0] = float("inf")
    with pytest.raises(CodecError, match="cannot be stored as int4"):
        encode(cache, precision="int4")
    cache.layers[0].keys[0, 0] = 3e38
    back = decode(*(lambda e: (e.header, e.chunks))(encode(cache, precision="int4")))
    assert float(back.layers[0].keys[0, 0]) == pytest.approx(3e38, rel=2**-7)
    cache.layers[0].keys[0, 0] = float(torch.finfo(torch.float32).max)  # 7 x its rounded-up scale is no fp32
    with pytest.raises(CodecError, match="too large for int4"):
        encode(cache, precision="int4")
    encode(cache, precision="int8")


def test_an_int4_header_must_agree_with_its_scale_groups() -> None:
    import dataclasses
    import json

    from headwise.cache.codec import SegmentHeader

    enc = _SMALL["int4"]
    h = parse_header(enc.header)
    assert h.rows == "int4" and all(s.scale_groups is not None for s in h.layers)
    body = json.loads(enc.header[12:-16])
    assert body["int4"]["group"] == quant.GROUP4 and len(body["int4"]["scales"]) == len(h.layers)
    wrong = dataclasses.replace(h, layers=(dataclasses.replace(h.layers[0], scale_groups=(0, 0)), *h.layers[1:]))
    with pytest.raises(CodecError, match="inconsistent"):  # fewer scales: the layout is shorter than the payload
        parse_header(wrong.to_bytes())
    # the same payload size, one scale row moved from the keys to the values: a header that parses (a
    # buggy encoder's, checksummed), whose groups do not fit the heads: rejected before any row is built
    from headwise.cache.codec import _build

    kg, vg = h.layers[0].scale_groups
    moved = (dataclasses.replace(h.layers[0], scale_groups=(kg - 1, vg + 1)), *h.layers[1:])
    forged = parse_header(SegmentHeader(h.segment_id, h.dtype, h.head_dim, h.seq_len, h.start, h.meta, moved,
                                        h.total_bytes, h.chunk_size, "int4").to_bytes())
    payload = memoryview(bytearray(b"".join(c[40:] for c in enc.chunks)))
    assert _build(h, payload, [], "cpu").num_layers == len(h.layers)
    with pytest.raises(CodecError, match="scale groups"):
        _build(forged, payload, [], "cpu")
    with pytest.raises(CodecError, match="groups of 16 rows"):
        body["int4"]["group"] = 16
        import hashlib
        import struct

        raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        head = struct.pack("<4sHHI", b"HWKH", 3, 0, len(raw)) + raw
        parse_header(head + hashlib.blake2b(head, digest_size=16).digest())
