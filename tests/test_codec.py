"""Codec: exact round trip of every field and dtype; damaged input is a CodecError, never a tensor."""

from __future__ import annotations

import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from headwise.cache.codec import (
    CODEC_VERSION,
    MAX_CHUNK_BYTES,
    CodecError,
    Decoder,
    EncodedSegment,
    check_chunk,
    decode,
    decode_recall,
    encode,
    encode_recall,
    encode_recall_rows,
    encode_streaming,
    frame_crc,
    parse_header,
)
from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from headwise.errors import HeadwiseError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_layer(gen: torch.Generator, lens: list[int], d: int, dtype: torch.dtype, merged: int) -> LayerCache:
    """A layer whose first `merged` rows of head 0 (if it has them) are merged rows with recall originals."""
    H = len(lens)
    keys = [torch.randn(n, d, generator=gen).to(dtype) for n in lens]
    values = [torch.randn(n, d, generator=gen).to(dtype) for n in lens]
    positions = [torch.randint(0, 10_000, (n,), generator=gen) for n in lens]
    lw = [torch.randn(n, generator=gen) for n in lens]
    rids = [torch.full((n,), NO_RECALL, dtype=torch.long) for n in lens]
    g = min(merged, lens[0]) if H else 0
    if g == 0:
        return LayerCache.from_heads(keys, values, positions, lw, rids)
    rids[0][:g] = torch.arange(g)
    sizes = torch.randint(1, 4, (g,), generator=gen)
    offsets = torch.zeros(g + 1, dtype=torch.long)
    offsets[1:] = sizes.cumsum(0)
    m = int(offsets[-1])
    table = RecallTable(offsets, torch.randint(0, 10_000, (m,), generator=gen), torch.zeros(g, dtype=torch.long),
                        torch.randn(m, d, generator=gen).to(dtype), torch.randn(m, d, generator=gen).to(dtype))
    return LayerCache.from_heads(keys, values, positions, lw, rids, table)


@st.composite
def caches(draw) -> CompactCache:
    dtype = draw(st.sampled_from(DTYPES))
    d = draw(st.sampled_from([1, 4, 8]))
    H = draw(st.integers(1, 3))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    layers = [make_layer(gen, draw(st.lists(st.integers(0, 12), min_size=H, max_size=H)), d, dtype, draw(st.integers(0, 3)))
              for _ in range(draw(st.integers(1, 3)))]
    start = draw(st.integers(0, 100))
    meta = draw(st.dictionaries(st.text(max_size=5), st.one_of(st.integers(-5, 5), st.text(max_size=5)), max_size=3))
    return CompactCache(layers, start + draw(st.integers(0, 50)), start, meta)


def assert_same(a: CompactCache, b: CompactCache, recall_data: bool = True) -> None:
    assert (a.seq_len, a.start, a.meta, a.num_layers) == (b.seq_len, b.start, b.meta, b.num_layers)
    for x, y in zip(a.layers, b.layers, strict=True):
        for name in ("keys", "values", "head_offsets", "positions", "log_weights", "recall_ids"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name
        assert (x.recall is None) == (y.recall is None)
        if x.recall is not None:
            names = ("offsets", "positions", "heads") + (("keys", "values") if recall_data else ())
            for name in names:
                tx, ty = getattr(x.recall, name), getattr(y.recall, name)
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), f"recall.{name}"


def same(a: CompactCache, b: CompactCache) -> bool:
    """assert_same as a predicate (for readers that may see one of two versions)."""
    try:
        assert_same(a, b)
        return True
    except AssertionError:
        return False


# ---- round trips ------------------------------------------------------------------
@SETTINGS
@given(cache=caches(), chunk=st.integers(1, 300))
def test_round_trip_is_exact(cache: CompactCache, chunk: int) -> None:
    enc = encode(cache, chunk_size=chunk)
    assert all(len(c) <= chunk + 40 for c in enc.chunks)
    assert_same(cache, decode(enc.header, enc.chunks))


@SETTINGS
@given(cache=caches(), chunk=st.integers(16, 300))
def test_recall_split_off_and_back(cache: CompactCache, chunk: int) -> None:
    enc = encode(cache, include_recall=False, chunk_size=chunk)
    entries = encode_recall(cache)
    assert len(entries) == sum(layer.recall.num_groups for layer in cache.layers if layer.recall is not None)
    without = decode(enc.header, enc.chunks)
    assert_same(cache, without, recall_data=False)
    for layer in without.layers:
        if layer.recall is not None:
            assert layer.recall.keys.shape[0] == 0  # handles only
    assert_same(cache, decode(enc.header, enc.chunks, recall=entries))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_the_tail(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    cache = CompactCache([make_layer(gen, [5, 0, 3], 8, dtype, 2)], 20, 0, {"policy": "ems", "kept": 0.25})
    cache.layers[0].append(torch.randn(3, 2, 8).to(dtype), torch.randn(3, 2, 8).to(dtype), torch.tensor([20, 21]))
    cache.advance(2)
    out = decode(*_parts(encode(cache)))
    assert_same(cache.compacted(), out)
    assert out.layers[0].keys.dtype == dtype and out.nbytes == cache.nbytes


def test_recall_rows_round_trip() -> None:
    k, v, p = torch.randn(3, 4).to(torch.bfloat16), torch.randn(3, 4).to(torch.bfloat16), torch.tensor([7, 8, 9])
    k2, v2, p2 = decode_recall(encode_recall_rows(p, k, v))
    assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(p, p2)


def test_chunks_are_at_most_one_mib() -> None:
    layer = LayerCache.from_dense(torch.randn(2, 5000, 64), torch.randn(2, 5000, 64), torch.arange(5000))
    enc = encode(CompactCache([layer], 5000))
    assert len(enc.chunks) > 1 and max(len(c) for c in enc.chunks) <= MAX_CHUNK_BYTES + 40
    assert parse_header(enc.header).num_chunks == len(enc.chunks)
    with pytest.raises(CodecError, match="chunk_size"):
        encode(CompactCache([layer], 5000), chunk_size=MAX_CHUNK_BYTES + 1)


def _parts(enc: EncodedSegment) -> tuple[bytes, list[bytes]]:
    return enc.header, enc.chunks


# ---- damaged input ----------------------------------------------------------------
def _small(fresh: bool = False) -> EncodedSegment:
    """One fixed encoding (segment ids are random, so hypothesis needs the same bytes every run)."""
    global _SMALL
    if _SMALL is None or fresh:
        _SMALL = _encode_small()
    return _SMALL


_SMALL: EncodedSegment | None = None


def _encode_small() -> EncodedSegment:
    gen = torch.Generator().manual_seed(2)
    return encode(CompactCache([make_layer(gen, [6, 4], 4, torch.float16, 2)], 10), chunk_size=32)


@SETTINGS
@given(data=st.data())
def test_any_single_byte_change_is_rejected(data) -> None:
    enc = _small()
    parts = [enc.header, *enc.chunks]
    i = data.draw(st.integers(0, len(parts) - 1))
    j = data.draw(st.integers(0, len(parts[i]) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(parts[i])
    damaged[j] ^= flip
    parts[i] = bytes(damaged)
    with pytest.raises(CodecError):
        decode(parts[0], parts[1:])


@SETTINGS
@given(data=st.data())
def test_reordered_duplicated_truncated_are_rejected(data) -> None:
    enc = _small()
    chunks = list(enc.chunks)
    n = len(chunks)
    kind = data.draw(st.sampled_from(["swap", "dup", "drop", "cut"]))
    i = data.draw(st.integers(0, n - 1))
    if kind == "swap":
        j = data.draw(st.integers(0, n - 1).filter(lambda j: chunks[j] != chunks[i]))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif kind == "dup":
        chunks.insert(i, chunks[i])
    elif kind == "drop":
        del chunks[i]
    else:
        chunks[i] = chunks[i][: data.draw(st.integers(0, len(chunks[i]) - 1))]
    with pytest.raises(CodecError):
        decode(enc.header, chunks)


def test_errors_say_what_is_wrong() -> None:
    enc = _small()
    with pytest.raises(CodecError, match="truncated: 2 of"):
        decode(enc.header, enc.chunks[:2])
    with pytest.raises(CodecError, match="chunk 1 arrived where chunk 0 was expected"):
        decode(enc.header, enc.chunks[1:])
    with pytest.raises(CodecError, match="more chunks than"):
        decode(enc.header, [*enc.chunks, enc.chunks[-1]])
    with pytest.raises(CodecError, match="another segment"):
        decode(enc.header, _encode_small().chunks)
    with pytest.raises(CodecError, match="header checksum"):
        decode(enc.header[:-1] + bytes([enc.header[-1] ^ 1]), enc.chunks)
    future = bytearray(enc.header)
    future[4:6] = (CODEC_VERSION + 1).to_bytes(2, "little")
    with pytest.raises(CodecError, match=f"codec version {CODEC_VERSION + 1} is not supported"):
        decode(bytes(future), enc.chunks)
    with pytest.raises(CodecError, match="not a headwise segment header"):
        decode(enc.chunks[0], enc.chunks)
    assert issubclass(CodecError, HeadwiseError)


def _with_version(blob: bytes, version: int, header: bool) -> bytes:
    """`blob` relabelled as another codec version, its own checksum made valid again."""
    import hashlib

    b = bytearray(blob)
    b[4:6] = version.to_bytes(2, "little")
    if header:
        b[-16:] = hashlib.blake2b(bytes(b[:-16]), digest_size=16).digest()
    return bytes(b)


@pytest.mark.parametrize("old", [1, 2])
def test_older_versions_are_rejected_clearly(old: int) -> None:
    """Version 1 listed every chunk's CRC in the header, version 2 had no row format and int64
    positions; a stored segment of either must be refused, not misread (keys name the version,
    so such segments are misses to this build anyway)."""
    assert CODEC_VERSION == 3
    enc = _small()
    with pytest.raises(CodecError, match=f"codec version {old} is not supported; this build reads version 3"):
        parse_header(_with_version(enc.header, old, header=True))
    with pytest.raises(CodecError, match=f"chunk 0 has codec version {old}; this build reads version 3"):
        decode(enc.header, [_with_version(enc.chunks[0], old, header=False), *enc.chunks[1:]])


def test_chained_chunk_and_segment_checksums() -> None:
    """Per chunk: a CRC seeded with the previous frame's, so each chunk checks on its own given that
    CRC field (in any order, as the store does in worker threads). Per segment: the last CRC is a
    CRC-32 of every frame in order (CRC fields left out), seeded from the header's digest."""
    gen = torch.Generator().manual_seed(5)
    enc = encode(CompactCache([make_layer(gen, [40, 30], 8, torch.float32, 2)], 50), chunk_size=256)
    h, chunks = parse_header(enc.header), enc.chunks
    assert len(chunks) > 4
    prev = [None] + [frame_crc(c) for c in chunks[:-1]]
    for i in reversed(range(len(chunks))):  # out of order: only the predecessor's CRC field is needed
        assert bytes(check_chunk(h, i, chunks[i], prev[i])) == chunks[i][40:]
    with pytest.raises(CodecError, match="chunk 3 checksum mismatch"):
        check_chunk(h, 3, chunks[3], prev[2])  # the wrong predecessor
    with pytest.raises(CodecError, match="without chunk 2's CRC"):
        check_chunk(h, 3, chunks[3])
    stream = b"".join(c[:36] + c[40:] for c in chunks)
    assert frame_crc(chunks[-1]) == zlib.crc32(stream, h.seed)
    # a frame whose CRC field was rewritten to match its damage still breaks the next chunk's check
    bad = bytearray(chunks[1])
    bad[50] ^= 1
    bad[36:40] = zlib.crc32(bytes(bad[40:]), zlib.crc32(bytes(bad[:36]), frame_crc(chunks[0]))).to_bytes(4, "little")
    check_chunk(h, 1, bytes(bad), prev[1])
    with pytest.raises(CodecError, match="chunk 2 checksum mismatch"):
        decode(enc.header, [chunks[0], bytes(bad), *chunks[2:]])


def test_crc_is_isal_with_zlib_values() -> None:
    """The codec's CRC-32 is ISA-L's (a declared dependency, ~10x zlib's speed) and gives zlib's
    values, so segments written with either read back with the other."""
    from headwise.cache import codec

    assert codec.crc32.__module__.startswith("isal")
    data = memoryview(torch.arange(100_003, dtype=torch.float32).numpy()).cast("B")
    for seed in (0, 1, 0xDEADBEEF):
        assert codec.crc32(data, seed) == zlib.crc32(data, seed)
        assert codec.crc32(data[7:], seed) == zlib.crc32(data[7:], seed)


def test_streaming_decoder_matches_decode() -> None:
    gen = torch.Generator().manual_seed(3)
    cache = CompactCache([make_layer(gen, [9, 2], 8, torch.float32, 3) for _ in range(2)], 30, 5, {"k": 1})
    enc = encode(cache, chunk_size=100)
    dec = Decoder(enc.header)
    for c in enc.chunks:
        dec.feed(c)
    assert_same(cache, dec.finish())


def test_recall_entry_damage_and_mismatch_are_rejected() -> None:
    gen = torch.Generator().manual_seed(4)
    cache = CompactCache([make_layer(gen, [6, 4], 4, torch.float32, 2)], 10)
    enc = encode(cache, include_recall=False)
    entries = encode_recall(cache)
    blob = bytearray(entries[0].data)
    blob[-5] ^= 1
    with pytest.raises(CodecError, match="recall blob checksum"):
        decode_recall(bytes(blob))
    with pytest.raises(CodecError, match="1 recall entries for 2 merged rows"):
        decode(enc.header, enc.chunks, recall=entries[:1])
    wrong = type(entries[0])(0, 1, 0, entries[0].data)
    with pytest.raises(CodecError, match="not a merged row"):
        decode(enc.header, enc.chunks, recall=[wrong, entries[1]])


@SETTINGS
@given(cache=caches(), chunk=st.integers(1, 300))
def test_streaming_encode_gives_the_same_frames(cache: CompactCache, chunk: int) -> None:
    lazy = encode_streaming(cache, chunk_size=chunk)
    frames = list(lazy.frames())
    assert lazy.num_chunks == len(frames) and lazy.nbytes == len(lazy.header) + sum(map(len, frames))
    assert [b"".join(lazy.frame_parts(i)) for i in range(lazy.num_chunks)] == frames
    assert_same(cache, decode(lazy.header, frames))


# ---- PoD layers: keys of the keyed rows only --------------------------------------------
def make_pod_cache(gen: torch.Generator, dtype: torch.dtype, d: int = 4) -> CompactCache:
    """Layer 0 ordinary (with merged rows); layer 1 PoD: heads 0 and 2 score distant rows by layer 0."""
    base = make_layer(gen, [7, 5, 6], d, dtype, 2)
    lens = [7, 3, 6]
    masks = [torch.rand(n, generator=gen) < 0.5 for n in lens]
    masks[0][1] = True
    masks[1][:] = False
    pod = LayerCache.from_heads(
        [torch.randn(int((~m).sum()), d, generator=gen).to(dtype) for m in masks],
        [torch.randn(n, d, generator=gen).to(dtype) for n in lens], [torch.arange(n) for n in lens],
        [torch.randn(n, generator=gen) for n in lens], distant=masks, distant_from=[0, -1, 0],
    )
    return CompactCache([base, pod], 20, 3, {"policy": {"policy": "pod"}})


@pytest.mark.parametrize("dtype", DTYPES)
def test_pod_layout_round_trip_is_exact(dtype: torch.dtype) -> None:
    cache = make_pod_cache(torch.Generator().manual_seed(3), dtype)
    cache.layers[1].append(torch.ones(3, 2, 4, dtype=dtype), torch.ones(3, 2, 4, dtype=dtype), torch.tensor([20, 21]))
    for chunk in (7, 64, MAX_CHUNK_BYTES):
        enc = encode(cache, chunk_size=chunk)
        back = decode(enc.header, enc.chunks)
        want = cache.compacted()
        assert_same(back, want)
        assert back.layers[0].distant is None and back.layers[1].distant_from == (0, -1, 0)
        assert torch.equal(back.layers[1].distant, want.layers[1].distant)
        assert back.layers[1].keys.shape[0] < back.layers[1].values.shape[0]
        assert b"distant" in enc.header
        dec = Decoder(enc.header)
        for frame in enc.chunks:
            dec.feed(frame)
        assert_same(dec.finish(), want)


def test_ordinary_headers_carry_no_pod_entry() -> None:
    enc = _encode_small()
    assert b"distant" not in enc.header


def test_pod_damage_and_inconsistent_headers_are_rejected() -> None:
    import dataclasses

    enc = encode(make_pod_cache(torch.Generator().manual_seed(4), torch.float32), chunk_size=64)
    for i in (0, len(enc.chunks) // 2, len(enc.chunks) - 1):
        bad = bytearray(enc.chunks[i]); bad[-1] ^= 0x40
        with pytest.raises(CodecError, match="checksum"):
            decode(enc.header, enc.chunks[:i] + [bytes(bad)] + enc.chunks[i + 1 :])
    with pytest.raises(CodecError, match="truncated"):
        decode(enc.header, enc.chunks[:-1])
    # a correctly checksummed header whose PoD entry does not fit the layer (a buggy encoder)
    h = parse_header(enc.header)
    wrong = dataclasses.replace(h.layers[1], key_rows=h.layers[1].key_rows + 1)
    with pytest.raises(CodecError, match="inconsistent"):
        parse_header(dataclasses.replace(h, layers=(h.layers[0], wrong)).to_bytes())
    late = dataclasses.replace(h.layers[1], distant_from=(1, -1, 1))  # a layer cannot be its own base
    with pytest.raises(CodecError, match="earlier layers"):
        parse_header(dataclasses.replace(h, layers=(h.layers[0], late)).to_bytes())
