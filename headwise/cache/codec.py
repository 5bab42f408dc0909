"""Codec: CompactCache <-> a versioned header blob plus chunks of at most 1 MiB.

The bytes here are the only serialisation of a cache: what the prefill worker sends, what
the KV store keeps unchanged and what decode reads back. Layout (all integers little-endian):

header blob   = "HWKH" | version u16 | flags u16 | body_len u32 | body (JSON) | blake2b-128(all before)
chunk frame   = "HWKC" | version u16 | 0 u16 | segment_id 16B | index u32 | count u32 | len u32
                | crc32 u32 | payload[len]
recall blob   = "HWKR" | version u16 | code u16 | m u32 | d u32 | positions i64[m] | keys[m, d]
                | values[m, d] | crc32 u32         (crc32 over everything before it)
                code: low byte the cache's dtype (1 fp32, 2 fp16, 3 bf16), high byte the rows'
                format (0: that dtype; 1 fp32, 2 fp16, 3 bf16; 4 int8: then key_scales f32[d] and
                value_scales f32[d], one per channel over the m rows, come before the int8 keys;
                a put at int4 writes its recall blobs as int8: a merged row's few originals)

Checksums (version 2). Per chunk: the frame's CRC-32 over its 36 header bytes and its payload,
*seeded with the previous frame's CRC* (chunk 0: with the CRC-32 of the header's BLAKE2b digest).
Per segment: that chain, so the last frame's CRC is a CRC-32 of the header digest and every
frame in order; it is checked when the last chunk is. Each chunk is still checkable on its own
(given the previous frame's CRC field), and no checksum has to be known before the first frame
goes out: an encoder computes each CRC as its frame leaves (version 1 listed every chunk's CRC
in the header, a full pass over the payload before anything could be sent).

The body names the segment (random 16-byte id), the cache's dtype, the row format ("rows":
float32, bfloat16, float16, int8 or int4), seq_len/start/meta, every layer's shape, the payload size
and the chunk size (hence the number and length of the chunks); int4 rows also the rows per scale
group and every layer's number of key and value scale groups ("int4": {"group", "scales"}). The payload is every layer's
tensors in the order of `_layout()` (one function for both directions, so fields cannot be read
back in another order), each aligned to 64 bytes:
  keys [R_k, d], values [R, d]     in the row format
  key_scales [Hkv, d], value_scales [Hkv, d] fp32     int8 rows only (headwise.cache.quant)
  (int4: keys [R_k, ceil(d/2)], values [R, ceil(d/2)] uint8, two values a byte, then
  key_scales [G_k, d], value_scales [G, d] bf16: one per group of up to 32 rows of a head, per channel)
  head_offsets [Hkv + 1] int64, positions [R] int16 or int32 (int16 when all fit), then
  log_weights [R] fp32 and recall_ids [R] int32, both left out for a "plain" layer (all 0 / -1)
Decoding gives the cache back in its own dtype: int8 and int4 rows dequantised (once, at load), float
rows cast; every other field exact. Recall originals in the payload travel in the cache's dtype;
recall blobs (`encode_recall`, a store put's) at the put's precision.

PoD layers (some rows without keys, `LayerCache.distant`) carry `keys` for their keyed rows
only, a "distant" bool[rows] field after the layer's other fields, and, in the body's
"distant" entry, {layer: [key rows, distant_from per head]}; the entry is absent when no
layer has distant rows.

Decoding rejects truncated, reordered, duplicated, foreign or corrupted input, and any other
codec version (1 and 2 included: keys name the version, so such segments are misses anyway), with a CodecError that says what was wrong, before any tensor is built from it.

The tail of a cache is folded in first (`compacted()`): what comes back is the compacted cache.
With `include_recall=False` the recall handles (offsets, positions, heads) travel but not the
original keys/values; `encode_recall()` gives those as one blob per merged row, and
`decode(..., recall=entries)` puts them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

try:  # ISA-L's CRC-32: the same polynomial and values as zlib's, ~10x faster (carry-less multiply)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without isal wheels
    from zlib import crc32

from headwise.cache import quant
from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from headwise.errors import HeadwiseError

# 3: a row format per segment (float rows or int8 rows with scales), int32 positions and recall ids
# 2: chained per-chunk CRCs, none listed in the header (1: every CRC in the header)
CODEC_VERSION = 3
MAX_CHUNK_BYTES = 1 << 20  # payload of one chunk; gRPC's default message cap is 4 MiB
ALIGN = 64

_HEADER_PREFIX = struct.Struct("<4sHHI")
_DIGEST = 16
_FRAME = struct.Struct("<4sH2x16sIIII")  # magic, version, segment id, index, count, len, crc
_FRAME_CRC_AT = _FRAME.size - 4
_RECALL = struct.Struct("<4sHHII")  # magic, version, dtype code, m, d
FRAME_OVERHEAD = _FRAME.size

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ROW_FORMATS = ("float32", "bfloat16", "float16", "int8", "int4")
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# a recall blob's rows, in the high byte of its dtype field (0: the dtype's own rows)
_RECALL_ROW_CODES = {"float32": 1, "float16": 2, "bfloat16": 3, "int8": 4}
_RECALL_CODE_ROWS = {v: k for k, v in _RECALL_ROW_CODES.items()}


class CodecError(HeadwiseError, ValueError):
    """Bytes that are not a complete, intact segment of this codec version."""


# ---- layout -----------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    num_heads: int
    rows: int  # R: ragged rows over all heads
    groups: int  # G: merged rows with a recall handle (0 when the layer has no RecallTable)
    recall_rows: int  # sum m_i: original rows behind the merged rows
    has_recall: bool  # the layer carries a RecallTable (possibly with 0 groups)
    recall_data: bool  # its original keys/values travel in the payload
    plain: bool = False  # every log-weight 0 and recall id NO_RECALL: neither field travels
    pos16: bool = False  # every position in [-1, 32767]: positions travel as int16 (else int32)
    key_rows: int | None = None  # PoD: rows that hold a key (the others are distant); None: all
    distant_from: tuple[int, ...] | None = None  # PoD: base layer per head (-1: none)
    scale_groups: tuple[int, int] | None = None  # int4 rows: scale rows of keys and of values


@dataclass(frozen=True)
class Field:
    layer: int
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _layout(shapes: Sequence[LayerShape], head_dim: int, dtype: torch.dtype, rows: str,
            fields_too: bool = True) -> tuple[list[Field], int]:
    """Every tensor of the payload in order, with its byte offset; and the payload size.

    `dtype` is the cache's (recall originals travel in it); `rows` the format of K and V rows.
    `fields_too=False`: the size alone, no Field built (a header check: 4x faster)."""
    fields: list[Field] = []
    offset = 0

    def add(layer: int, name: str, dt: torch.dtype, shape: tuple[int, ...]) -> None:
        nonlocal offset
        n = dt.itemsize
        for d in shape:
            n *= d
        if fields_too:
            fields.append(Field(layer, name, dt, shape, offset))
        offset = -(-(offset + n) // ALIGN) * ALIGN

    row_dtype = {"int8": torch.int8, "int4": torch.uint8}.get(rows) or quant.FLOAT_ROWS[rows]
    width = (head_dim + 1) // 2 if rows == "int4" else head_dim
    for i, s in enumerate(shapes):
        add(i, "keys", row_dtype, (s.rows if s.key_rows is None else s.key_rows, width))
        add(i, "values", row_dtype, (s.rows, width))
        if rows == "int8":
            add(i, "key_scales", quant.SCALE_DTYPE, (s.num_heads, head_dim))
            add(i, "value_scales", quant.SCALE_DTYPE, (s.num_heads, head_dim))
        elif rows == "int4":
            kg, vg = s.scale_groups if s.scale_groups is not None else (0, 0)
            add(i, "key_scales", quant.SCALE4_DTYPE, (kg, head_dim))
            add(i, "value_scales", quant.SCALE4_DTYPE, (vg, head_dim))
        add(i, "head_offsets", torch.int64, (s.num_heads + 1,))
        add(i, "positions", torch.int16 if s.pos16 else torch.int32, (s.rows,))
        if not s.plain:
            add(i, "log_weights", torch.float32, (s.rows,))
            add(i, "recall_ids", torch.int32, (s.rows,))
        if s.has_recall:
            add(i, "recall.offsets", torch.int64, (s.groups + 1,))
            add(i, "recall.positions", torch.int64, (s.recall_rows,))
            add(i, "recall.heads", torch.int64, (s.groups,))
            m = s.recall_rows if s.recall_data else 0
            add(i, "recall.keys", dtype, (m, head_dim))
            add(i, "recall.values", dtype, (m, head_dim))
        if s.key_rows is not None:
            add(i, "distant", torch.bool, (s.rows,))
    return fields, offset


def _layer_tensors(layer: LayerCache, include_recall: bool, rows: str, shape: LayerShape) -> dict[str, Tensor]:
    pos = layer.positions.to(torch.int16) if shape.pos16 else _int32(layer.positions, "positions")
    t = {"head_offsets": layer.head_offsets, "positions": pos}
    if not shape.plain:
        t["log_weights"], t["recall_ids"] = layer.log_weights, _int32(layer.recall_ids, "recall ids")
    if rows in quant.QUANTISED:
        try:
            t["keys"], t["key_scales"] = quant.quantise_rows(layer.keys, layer.key_offsets(), rows)
            t["values"], t["value_scales"] = quant.quantise_rows(layer.values, layer.head_offsets, rows)
        except ValueError as e:
            raise CodecError(str(e)) from None
    else:
        t["keys"], t["values"] = (x.to(quant.FLOAT_ROWS[rows]) for x in (layer.keys, layer.values))
    r = layer.recall
    if r is not None:
        t.update({"recall.offsets": r.offsets, "recall.positions": r.positions, "recall.heads": r.heads})
        t["recall.keys"] = r.keys if include_recall else r.keys[:0]
        t["recall.values"] = r.values if include_recall else r.values[:0]
    if layer.distant is not None:
        t["distant"] = layer.distant
    return t


def _int32(t: Tensor, what: str) -> Tensor:
    """An int64 field as the int32 it travels as; CodecError when a value does not fit (never wraps)."""
    if t.numel() and (int(t.min()) < -(2**31) or int(t.max()) >= 2**31):
        raise CodecError(f"{what} outside the int32 range cannot be encoded")
    return t.to(torch.int32)


def _layer_shape(layer: LayerCache, include_recall: bool, rows: str = "float32") -> LayerShape:
    r = layer.recall
    has_data = r is not None and r.keys.shape[0] == r.positions.numel() and r.positions.numel() > 0
    pos = layer.positions
    return LayerShape(
        num_heads=layer.num_heads, rows=int(layer.values.shape[0]),
        groups=r.num_groups if r is not None else 0,
        recall_rows=int(r.positions.numel()) if r is not None else 0,
        has_recall=r is not None, recall_data=bool(include_recall and has_data),
        plain=not bool(layer.log_weights.any()) and bool((layer.recall_ids == NO_RECALL).all()),
        pos16=not pos.numel() or (int(pos.min()) >= -1 and int(pos.max()) < 2**15),
        key_rows=int(layer.keys.shape[0]) if layer.distant is not None else None,
        distant_from=layer.distant_from if layer.distant is not None else None,
        scale_groups=(quant.group_count(layer.key_offsets()), quant.group_count(layer.head_offsets))
        if rows == "int4" else None,
    )


# ---- header -----------------------------------------------------------------------
@dataclass(frozen=True)
class SegmentHeader:
    """The parsed header blob: everything needed to check and decode the chunks."""

    segment_id: bytes
    dtype: torch.dtype  # of the cache: what decode gives back
    head_dim: int
    seq_len: int
    start: int
    meta: dict
    layers: tuple[LayerShape, ...]
    total_bytes: int
    chunk_size: int
    rows: str = "float32"  # format of the K and V rows on the wire: float32, bfloat16, float16, int8 or int4
    seed: int = dataclasses.field(default=0, compare=False)  # chunk 0's CRC seed, set by parse_header

    @property
    def num_chunks(self) -> int:
        return max(1, -(-self.total_bytes // self.chunk_size))

    def chunk_len(self, index: int) -> int:
        """Payload bytes of chunk `index`: chunk_size, the last one the rest."""
        return min(self.chunk_size, self.total_bytes - index * self.chunk_size)

    def to_bytes(self) -> bytes:
        body = {
            "segment_id": self.segment_id.hex(), "dtype": _DTYPE_NAMES[self.dtype], "head_dim": self.head_dim,
            "seq_len": self.seq_len, "start": self.start, "meta": self.meta,
            "layers": [[s.num_heads, s.rows, s.groups, s.recall_rows, s.has_recall, s.recall_data, s.plain, s.pos16]
                       for s in self.layers],
            "total_bytes": self.total_bytes, "chunk_size": self.chunk_size, "rows": self.rows,
        }
        distant = {str(i): [s.key_rows, list(s.distant_from)] for i, s in enumerate(self.layers) if s.key_rows is not None}
        if distant:
            body["distant"] = distant
        if self.rows == "int4":
            body["int4"] = {"group": quant.GROUP4, "scales": [list(s.scale_groups or (0, 0)) for s in self.layers]}
        body = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        head = _HEADER_PREFIX.pack(b"HWKH", CODEC_VERSION, 0, len(body)) + body
        return head + hashlib.blake2b(head, digest_size=_DIGEST).digest()


def parse_header(blob: bytes) -> SegmentHeader:
    """Check and parse a header blob; CodecError when it is not an intact header of this version."""
    blob = bytes(blob)
    if len(blob) < _HEADER_PREFIX.size + _DIGEST:
        raise CodecError(f"header of {len(blob)} bytes is truncated (at least {_HEADER_PREFIX.size + _DIGEST} expected)")
    magic, version, _flags, body_len = _HEADER_PREFIX.unpack_from(blob)
    if magic != b"HWKH":
        raise CodecError(f"not a headwise segment header (magic {magic!r}, expected b'HWKH')")
    if version != CODEC_VERSION:
        raise CodecError(f"codec version {version} is not supported; this build reads version {CODEC_VERSION} "
                         f"(re-encode the cache with this build; stored segments of another version are misses)")
    end = _HEADER_PREFIX.size + body_len
    if len(blob) != end + _DIGEST:
        raise CodecError(f"header is {len(blob)} bytes, its prefix says {end + _DIGEST}: truncated or padded")
    if hashlib.blake2b(blob[:end], digest_size=_DIGEST).digest() != blob[end:]:
        raise CodecError("header checksum mismatch: the header is corrupted")
    try:
        return _header_from_body(json.loads(blob[_HEADER_PREFIX.size : end]), blob[end:])
    except (KeyError, TypeError, ValueError) as e:  # a checksummed body from a buggy encoder
        raise CodecError(f"header body is malformed: {e}") from None


def _header_from_body(b: dict, digest: bytes) -> SegmentHeader:
    if b["dtype"] not in _DTYPES:
        raise CodecError(f"unknown dtype {b['dtype']!r}; allowed: {', '.join(_DTYPES)}")
    if b["rows"] not in ROW_FORMATS:
        raise CodecError(f"unknown row format {b['rows']!r}; allowed: {', '.join(ROW_FORMATS)}")
    layers = tuple(LayerShape(int(h), int(r), int(g), int(m), bool(hr), bool(rd), bool(pl), bool(p16))
                   for h, r, g, m, hr, rd, pl, p16 in b["layers"])
    for i, (k, df) in b.get("distant", {}).items():
        i = int(i)
        if not 0 <= i < len(layers) or not 0 <= int(k) <= layers[i].rows or len(df) != layers[i].num_heads:
            raise CodecError(f"header names distant rows for layer {i} that do not fit its shape")
        if any(not -1 <= int(x) < i for x in df):
            raise CodecError(f"layer {i}: distant rows {list(df)} must come from earlier layers")
        layers = layers[:i] + (dataclasses.replace(layers[i], key_rows=int(k), distant_from=tuple(int(x) for x in df)),) + layers[i + 1 :]
    if b["rows"] == "int4":
        q = b["int4"]
        if int(q["group"]) != quant.GROUP4:
            raise CodecError(f"int4 rows in groups of {q['group']} rows per scale; this build reads groups of {quant.GROUP4}")
        if len(q["scales"]) != len(layers):
            raise CodecError(f"int4 scale groups for {len(q['scales'])} layers, the segment has {len(layers)}")
        layers = tuple(dataclasses.replace(s, scale_groups=(int(kg), int(vg))) for s, (kg, vg) in zip(layers, q["scales"], strict=True))
    h = SegmentHeader(
        segment_id=bytes.fromhex(b["segment_id"]), dtype=_DTYPES[b["dtype"]], head_dim=int(b["head_dim"]),
        seq_len=int(b["seq_len"]), start=int(b["start"]), meta=b["meta"], layers=layers,
        total_bytes=int(b["total_bytes"]), chunk_size=int(b["chunk_size"]), rows=b["rows"],
    )
    _, total = _layout(h.layers, h.head_dim, h.dtype, h.rows, fields_too=False)
    if total != h.total_bytes or len(h.segment_id) != 16:
        raise CodecError(f"header is inconsistent: layout needs {total} bytes, header says {h.total_bytes}")
    if not 0 < h.chunk_size <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk size {h.chunk_size} is outside (0, {MAX_CHUNK_BYTES}]")
    return dataclasses.replace(h, seed=chain_seed(digest))


def chain_seed(header_digest: bytes) -> int:
    """The CRC chunk 0 is seeded with: the CRC-32 of the header's BLAKE2b digest (binds the chunks to it)."""
    return crc32(header_digest)


def frame_crc(frame: bytes | memoryview) -> int:
    """The CRC field of a chunk frame (the next frame's seed), read without checking anything."""
    return int.from_bytes(memoryview(frame)[_FRAME_CRC_AT : _FRAME.size], "little") if len(frame) >= _FRAME.size else 0


# ---- encode -----------------------------------------------------------------------
@dataclass(frozen=True)
class EncodedSegment:
    header: bytes  # header blob
    chunks: list[bytes]  # chunk frames, in order

    @property
    def nbytes(self) -> int:
        return len(self.header) + sum(len(c) for c in self.chunks)


class StreamingSegment:
    """A segment whose frames are built on demand, straight from the tensors' memory.

    The header is complete up front (it holds no checksum of the payload), so a sender sends it
    at once; each frame's CRC (chained to the previous one) is computed when the frame is first
    asked for, in order, and its bytes copied out of the tensors only then: encoding overlaps
    sending and no second full-size buffer exists. The tensors must not change until the
    frames are sent. `frame_parts` / `frame` may run in a worker thread (one at a time).
    """

    def __init__(self, header: bytes, frame_bytes: int, prefixes: list[bytes], payloads: list[list[memoryview]], seed: int):
        self.header = header
        self.frame_bytes = frame_bytes  # sum of the frames' lengths
        self._prefixes = prefixes  # per frame: the 36 header bytes before its CRC
        self._payloads = payloads  # per frame: views of the tensors (and padding) it carries
        self._crcs: list[int] = []
        self._seed = seed

    @property
    def num_chunks(self) -> int:
        return len(self._prefixes)

    @property
    def nbytes(self) -> int:
        return len(self.header) + self.frame_bytes

    def crc(self, index: int) -> int:
        """Frame `index`'s CRC (computing those before it first: each is seeded with the previous)."""
        while len(self._crcs) <= index:
            i = len(self._crcs)
            c = crc32(self._prefixes[i], self._crcs[-1] if i else self._seed)
            for p in self._payloads[i]:
                c = crc32(p, c)
            self._crcs.append(c)
        return self._crcs[index]

    def frame_parts(self, index: int) -> list[bytes | memoryview]:
        """Frame `index` as pieces whose concatenation is the frame (join them into one buffer)."""
        return [self._prefixes[index] + self.crc(index).to_bytes(4, "little"), *self._payloads[index]]

    def frame(self, index: int) -> bytes:
        return b"".join(self.frame_parts(index))

    def frames(self) -> Iterator[bytes]:
        for i in range(self.num_chunks):
            yield self.frame(i)

    def materialize(self) -> EncodedSegment:
        return EncodedSegment(self.header, list(self.frames()))


def encode(cache: "CompactCache | Prepared", *, include_recall: bool = True, chunk_size: int = MAX_CHUNK_BYTES,
           precision: str | None = None) -> EncodedSegment:
    """Serialise a cache (its tail folded in) into a header blob and chunk frames.

    `precision` ("fp32", "bf16", "fp16", "int8"): the format of the K and V rows on the wire;
    None: the cache's own dtype (lossless). Decoding gives back the cache's own dtype either way."""
    return encode_streaming(cache, include_recall=include_recall, chunk_size=chunk_size, precision=precision).materialize()


@dataclass(frozen=True, eq=False)
class Prepared:
    """A cache made ready to be sent at one precision: its K and V rows in the wire format (int8
    rows quantised, once), its layout, and (for a store put) the recall blobs of its merged rows.

    The prefill worker builds it in its model thread, where it needs the rows as stored anyway
    (`stored()`, bit-identical to what decoding the segment gives), so a put on the event loop only
    checksums and sends: quantising is neither repeated nor run on the loop."""

    cache: CompactCache = dataclasses.field(repr=False)  # compacted
    precision: str | None
    rows: str  # row format of K and V on the wire
    include_recall: bool  # recall originals travel in the segment (else as `recall` blobs)
    shapes: tuple[LayerShape, ...] = dataclasses.field(repr=False)
    tensors: list[dict[str, Tensor]] = dataclasses.field(repr=False)  # per layer: every payload field, as it travels
    recall: list["RecallEntry"] = dataclasses.field(repr=False)  # one blob per merged row (include_recall=False only)
    total: int  # payload bytes
    pieces: list[memoryview] = dataclasses.field(repr=False)  # the payload: views of `tensors` and padding, in order

    @property
    def stored_nbytes(self) -> int:
        """Bytes a store put of it sends and keeps: the segment and its recall blobs."""
        return encoded_nbytes(self.cache, self.precision, include_recall=self.include_recall) + sum(
            len(r.data) for r in self.recall)

    def stored(self) -> CompactCache:
        """The cache with its rows as a reader gets them back (decode of the segment): same shapes,
        dtype, positions, log-weights and recall handles. The cache itself when the rows are lossless."""
        dtype = self.cache.layers[0].keys.dtype
        if self.rows == _DTYPE_NAMES[dtype] or self.rows == "float32":
            return self.cache
        layers = []
        for layer, t in zip(self.cache.layers, self.tensors, strict=True):
            if self.rows in quant.QUANTISED:
                keys = quant.dequantise_rows(t["keys"], t["key_scales"], layer.key_offsets(), self.rows, dtype)
                values = quant.dequantise_rows(t["values"], t["value_scales"], layer.head_offsets, self.rows, dtype)
            else:
                keys, values = t["keys"].to(dtype), t["values"].to(dtype)
            layers.append(dataclasses.replace(layer, keys=keys, values=values))
        c = self.cache
        return CompactCache(layers, c.seq_len, c.start, dict(c.meta))


def prepare(cache: CompactCache, precision: str | None = None, *, include_recall: bool = False,
            recall_blobs: bool = True) -> Prepared:
    """`cache` (its tail folded in) ready for `encode_streaming` at `precision`, with the recall
    blobs a store put sends beside it (`recall_blobs`, include_recall=False only), their rows at
    the same precision. CodecError when the cache cannot be encoded."""
    if not cache.layers:
        raise CodecError("a cache with no layers cannot be encoded")
    cache = cache.compacted()
    dtype, head_dim, rows = _formats(cache, precision)
    shapes = tuple(_layer_shape(layer, include_recall, rows) for layer in cache.layers)
    tensors = [_layer_tensors(layer, include_recall, rows, s) for layer, s in zip(cache.layers, shapes, strict=True)]
    recall = encode_recall(cache, precision) if recall_blobs and not include_recall else []
    fields, total = _layout(shapes, head_dim, dtype, rows)
    return Prepared(cache, precision, rows, include_recall, shapes, tensors, recall, total, _pieces(fields, total, tensors))


def encode_streaming(cache: "CompactCache | Prepared", *, include_recall: bool = True, chunk_size: int = MAX_CHUNK_BYTES,
                     precision: str | None = None) -> StreamingSegment:
    """Like `encode`, but each frame is checksummed and copied out of the tensors only when asked for
    (int8 rows are quantised up front: the frames are views of the quantised tensors). Given a
    `Prepared`, its own precision and recall choice are used (`precision` must be None or the same)."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise CodecError(f"chunk_size={chunk_size} is outside (0, {MAX_CHUNK_BYTES}]")
    if isinstance(cache, Prepared):
        if precision is not None and precision != cache.precision:
            raise CodecError(f"the cache was prepared at precision {cache.precision!r}, not {precision!r}")
        p = cache
    else:
        p = prepare(cache, precision, include_recall=include_recall, recall_blobs=False)
    cache, total = p.cache, p.total
    dtype, head_dim, rows = cache.layers[0].keys.dtype, cache.layers[0].head_dim, p.rows
    segment_id = os.urandom(16)
    payloads = _split(p.pieces, total, chunk_size)
    try:
        meta = json.loads(json.dumps(cache.meta))
    except (TypeError, ValueError) as e:
        raise CodecError(f"cache.meta must be JSON-serialisable: {e}") from None
    header = SegmentHeader(segment_id, dtype, head_dim, cache.seq_len, cache.start, meta, p.shapes,
                           total, chunk_size, rows).to_bytes()
    n = len(payloads)
    prefixes = [_FRAME.pack(b"HWKC", CODEC_VERSION, segment_id, i, n, sum(map(len, parts)), 0)[:_FRAME_CRC_AT]
                for i, parts in enumerate(payloads)]
    return StreamingSegment(header, total + FRAME_OVERHEAD * n, prefixes, payloads, chain_seed(header[-_DIGEST:]))


def _formats(cache: CompactCache, precision: str | None) -> tuple[torch.dtype, int, str]:
    """(the cache's dtype, head_dim, the row format `precision` names); CodecError when unsupported."""
    dtype, head_dim = cache.layers[0].keys.dtype, cache.layers[0].head_dim
    if dtype not in _DTYPE_NAMES:
        raise CodecError(f"dtype {dtype} is not supported; allowed: {', '.join(_DTYPES)}")
    try:
        return dtype, head_dim, quant.row_format(precision, dtype)
    except ValueError as e:
        raise CodecError(str(e)) from None


def encoded_nbytes(cache: CompactCache, precision: str | None = None, *, include_recall: bool = False,
                   chunk_size: int = MAX_CHUNK_BYTES) -> int:
    """Bytes of `encode(cache, ...)` (header blob + chunk frames), computed from the shapes alone."""
    cache = cache.compacted()
    dtype, head_dim, rows = _formats(cache, precision)
    shapes = tuple(_layer_shape(layer, include_recall, rows) for layer in cache.layers)
    _, total = _layout(shapes, head_dim, dtype, rows, fields_too=False)
    meta = json.loads(json.dumps(cache.meta))
    header = SegmentHeader(bytes(16), dtype, head_dim, cache.seq_len, cache.start, meta, shapes, total, chunk_size, rows)
    return len(header.to_bytes()) + total + FRAME_OVERHEAD * header.num_chunks


def stored_nbytes(cache: CompactCache, precision: str | None = None, *, chunk_size: int = MAX_CHUNK_BYTES) -> int:
    """Bytes a store put of `cache` sends and keeps: the segment without recall data, plus one
    recall blob per merged row (`encode_recall`, rows at `precision`). A cache read back from the
    store holds the handles but not the originals; they are counted from the handles, as stored beside it."""
    recall = 0
    for layer in cache.layers:
        r = layer.recall
        if r is not None and r.num_groups:
            g, m, d = r.num_groups, r.positions.numel(), r.keys.shape[1]
            fmt = _recall_rows(precision, r.keys.dtype)
            rows = 2 * g * d * 4 + 2 * m * d if fmt == "int8" else 2 * m * d * _itemsize(quant.FLOAT_ROWS[fmt])
            recall += g * (_RECALL.size + 4) + m * 8 + rows
    return encoded_nbytes(cache, precision, chunk_size=chunk_size) + recall


def _pieces(fields: list[Field], total: int, tensors: list[dict[str, Tensor]]) -> list[memoryview]:
    """The payload as views of the tensors' own memory plus zero padding: no staging copy."""
    out: list[memoryview] = []
    pos = 0
    for f in fields:
        t = tensors[f.layer][f.name]
        if tuple(t.shape) != f.shape or t.dtype != f.dtype:
            raise CodecError(f"layer {f.layer} {f.name}: {tuple(t.shape)} {t.dtype}, expected {f.shape} {f.dtype}")
        if f.offset > pos:
            out.append(memoryview(bytes(f.offset - pos)))
        if f.nbytes:
            out.append(memoryview(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
        pos = f.offset + f.nbytes
    if total > pos:
        out.append(memoryview(bytes(total - pos)))
    return out


def _split(pieces: list[memoryview], total: int, chunk_size: int) -> list[list[memoryview]]:
    """Cut the payload into per-chunk lists of views (no bytes are copied)."""
    n = max(1, -(-total // chunk_size))
    out: list[list[memoryview]] = []
    queue = iter(pieces)
    cur, at = memoryview(b""), 0
    for i in range(n):
        need = min(chunk_size, total - i * chunk_size)
        parts: list[memoryview] = []
        while need > 0:
            if at == len(cur):
                cur, at = next(queue), 0
                continue
            take = min(need, len(cur) - at)
            parts.append(cur[at : at + take])
            at += take
            need -= take
        out.append(parts)
    return out


# ---- decode -----------------------------------------------------------------------
def check_chunk(header: SegmentHeader, index: int, frame: bytes | memoryview, prev_crc: int | None = None) -> memoryview:
    """Verify that `frame` is chunk `index` of this segment, intact; return its payload.

    `prev_crc` is the CRC field of chunk index-1 (None for chunk 0: the header's seed). Checking
    every chunk with the CRC field of the one before it checks the whole chain, so chunks can be
    checked in any order or in parallel once their predecessor's 40-byte frame header is known."""
    view = memoryview(frame)
    if len(view) < _FRAME.size:
        raise CodecError(f"chunk {index} is truncated: {len(view)} bytes, the frame header alone is {_FRAME.size}")
    magic, version, seg, idx, count, length, crc = _FRAME.unpack_from(view)
    if magic != b"HWKC":
        raise CodecError(f"chunk {index} is not a headwise chunk frame (magic {bytes(magic)!r})")
    if version != CODEC_VERSION:
        raise CodecError(f"chunk {index} has codec version {version}; this build reads version {CODEC_VERSION}")
    if seg != header.segment_id:
        raise CodecError(f"chunk {index} belongs to another segment ({seg.hex()} != {header.segment_id.hex()})")
    if idx != index:
        raise CodecError(f"chunk {idx} arrived where chunk {index} was expected: chunks must come once each, in order")
    if count != header.num_chunks or index >= header.num_chunks:
        raise CodecError(f"chunk {index} says the segment has {count} chunks, the header says {header.num_chunks}")
    want_len = header.chunk_len(index)
    if length != want_len or len(view) != _FRAME.size + length:
        raise CodecError(f"chunk {index} holds {len(view) - _FRAME.size} payload bytes, the header says {want_len}")
    if index == 0:
        prev_crc = header.seed
    elif prev_crc is None:
        raise CodecError(f"chunk {index} cannot be checked without chunk {index - 1}'s CRC")
    payload = view[_FRAME.size :]
    if crc32(payload, crc32(view[:_FRAME_CRC_AT], prev_crc)) != crc:
        raise CodecError(f"chunk {index} checksum mismatch: the chunk is corrupted")
    return payload


class Decoder:
    """Streaming decode: feed chunk frames in order as they arrive, then `finish()`."""

    def __init__(self, header: bytes | SegmentHeader):
        self.header = header if isinstance(header, SegmentHeader) else parse_header(header)
        # torch.empty, not bytearray(n): every byte is written by feed(), so skip a zero-fill pass
        self._payload = memoryview(torch.empty(self.header.total_bytes, dtype=torch.uint8).numpy())
        self._filled = 0
        self._next = 0
        self._prev_crc: int | None = None

    def feed(self, frame: bytes | memoryview) -> None:
        if self._next >= self.header.num_chunks:
            raise CodecError(f"more chunks than the {self.header.num_chunks} the header announces (duplicate or foreign chunk)")
        part = check_chunk(self.header, self._next, frame, self._prev_crc)
        self._payload[self._filled : self._filled + len(part)] = part
        self._filled += len(part)
        self._next += 1
        self._prev_crc = frame_crc(frame)

    def finish(self, recall: Iterable["RecallEntry"] = (), device: torch.device | str = "cpu") -> CompactCache:
        if self._next != self.header.num_chunks:
            raise CodecError(f"segment is truncated: {self._next} of {self.header.num_chunks} chunks arrived")
        return _build(self.header, self._payload, list(recall), device)


def decode(header: bytes, chunks: Iterable[bytes], recall: Iterable["RecallEntry"] = (),
           device: torch.device | str = "cpu") -> CompactCache:
    """Rebuild the (compacted) cache from its header blob and chunk frames, plus recall entries if split off."""
    dec = Decoder(header)
    for frame in chunks:
        dec.feed(frame)
    return dec.finish(recall, device)


def _build(h: SegmentHeader, payload: memoryview, recall: list["RecallEntry"], device) -> CompactCache:
    fields, _ = _layout(h.layers, h.head_dim, h.dtype, h.rows)
    per_layer: list[dict[str, Tensor]] = [{} for _ in h.layers]
    for f in fields:
        n = f.nbytes // _itemsize(f.dtype)
        t = torch.frombuffer(payload, dtype=f.dtype, count=n, offset=f.offset) if n else torch.empty(0, dtype=f.dtype)
        per_layer[f.layer][f.name] = t.reshape(f.shape)
    for t, s in zip(per_layer, h.layers, strict=True):  # on the CPU, then to the device
        _restore_rows(t, h, s)
        t.update({k: v.to(device) for k, v in t.items()})
    layers = [_layer_from(i, s, t, h.head_dim) for i, (s, t) in enumerate(zip(h.layers, per_layer, strict=True))]
    if recall:
        _attach_recall(layers, recall, h)
    return CompactCache(layers, h.seq_len, h.start, dict(h.meta))


def _restore_rows(t: dict[str, Tensor], h: SegmentHeader, s: LayerShape) -> None:
    """Fields as the cache holds them: K and V rows in the cache's dtype (int8 dequantised here,
    once, when the cache is loaded: bench.kvquant measured that faster than per decode step on
    CPU), int64 positions and recall ids (those of a plain layer: NO_RECALL, log-weights 0).
    fp32 rows of an fp32 cache stay views of the payload."""
    t["positions"] = t["positions"].to(torch.int64)
    if s.plain:
        dev = t["positions"].device
        t["log_weights"] = torch.zeros(s.rows, dtype=torch.float32, device=dev)
        t["recall_ids"] = torch.full((s.rows,), NO_RECALL, dtype=torch.int64, device=dev)
    t["recall_ids"] = t["recall_ids"].to(torch.int64)
    if h.rows in quant.QUANTISED:
        offs = t["head_offsets"]
        if int(offs[0]) != 0 or int(offs[-1]) != t["values"].shape[0] or bool((offs[1:] < offs[:-1]).any()):
            return  # left as is: _layer_from rejects the layer and says why
        key_offs = offs
        if "distant" in t:
            before = torch.zeros(t["distant"].numel() + 1, dtype=torch.long, device=offs.device)
            before[1:] = torch.cumsum(t["distant"].long(), 0)
            key_offs = offs - before[offs]
        if int(key_offs[-1]) != t["keys"].shape[0]:
            return
        if h.rows == "int4" and (quant.group_count(key_offs), quant.group_count(offs)) != s.scale_groups:
            raise CodecError(f"int4 scale groups {s.scale_groups} do not fit the layer's heads "
                             f"({quant.group_count(key_offs)}, {quant.group_count(offs)} expected)")
        t["keys"] = quant.dequantise_rows(t.pop("keys"), t.pop("key_scales"), key_offs, h.rows, h.dtype)
        t["values"] = quant.dequantise_rows(t.pop("values"), t.pop("value_scales"), offs, h.rows, h.dtype)
    elif t["keys"].dtype != h.dtype:
        t["keys"], t["values"] = t["keys"].to(h.dtype), t["values"].to(h.dtype)


def _layer_from(i: int, s: LayerShape, t: dict[str, Tensor], head_dim: int) -> LayerCache:
    offs = t["head_offsets"]
    if int(offs[0]) != 0 or int(offs[-1]) != s.rows or bool((offs[1:] < offs[:-1]).any()):
        raise CodecError(f"layer {i}: head_offsets {offs.tolist()} do not partition its {s.rows} rows")
    rid = t["recall_ids"]
    if rid.numel() and (int(rid.min()) < NO_RECALL or int(rid.max()) >= s.groups):
        raise CodecError(f"layer {i}: recall ids outside [{NO_RECALL}, {s.groups})")
    rec = None
    if s.has_recall:
        rec = RecallTable(t["recall.offsets"], t["recall.positions"], t["recall.heads"], t["recall.keys"], t["recall.values"])
    layer = LayerCache(t["keys"], t["values"], offs, t["positions"], t["log_weights"], t["recall_ids"], rec)
    if s.key_rows is None:
        return layer
    if any(not -1 <= b < i for b in s.distant_from) or not bool(t["distant"].any()):
        raise CodecError(f"layer {i}: distant rows {s.distant_from} must come from earlier layers (and exist)")
    try:
        return layer._with_distant(t["distant"], s.distant_from)
    except ValueError as e:
        raise CodecError(f"layer {i}: {e}") from None


# ---- recall blobs -----------------------------------------------------------------
@dataclass(frozen=True)
class RecallEntry:
    """The originals behind one merged row: row `row` of head `head` in layer `layer`."""

    layer: int
    head: int
    row: int
    data: bytes  # recall blob


def _recall_rows(precision: str | None, dtype: torch.dtype) -> str:
    """Row format of a recall blob at `precision`: the cache's dtype when that loses nothing
    (fp32 never widens a narrower cache's originals), else the precision's format (int8 for int4:
    one merged row's originals are too few rows for int4's per-group scales to pay)."""
    if quant.lossless(precision, dtype):
        return _DTYPE_NAMES[dtype]
    fmt = quant.row_format(precision, dtype)
    return "int8" if fmt == "int4" else fmt


def encode_recall_rows(positions: Tensor, keys: Tensor, values: Tensor, precision: str | None = None) -> bytes:
    """positions [m] int64, keys/values [m, d] -> recall blob, rows at `precision` (None: their dtype).
    int8 rows carry one fp32 scale per channel for keys and for values ([d] each, over the m rows)."""
    m, d = keys.shape
    if keys.dtype not in _DTYPE_CODES or values.shape != keys.shape or positions.shape != (m,):
        raise CodecError(f"recall rows: positions {tuple(positions.shape)}, keys {tuple(keys.shape)} {keys.dtype}, "
                         f"values {tuple(values.shape)} do not form m positions and [m, d] rows of a float dtype")
    try:
        fmt = _recall_rows(precision, keys.dtype)
    except ValueError as e:
        raise CodecError(str(e)) from None
    code = _DTYPE_CODES[keys.dtype] | (0 if fmt == _DTYPE_NAMES[keys.dtype] else _RECALL_ROW_CODES[fmt] << 8)
    if fmt == "int8":
        offs = torch.tensor([0, m])
        try:
            (qk, sk), (qv, sv) = quant.quantise(keys, offs), quant.quantise(values, offs)
        except ValueError as e:
            raise CodecError(str(e)) from None
        tensors = (positions.to(torch.int64), sk, sv, qk, qv)
    else:
        tensors = (positions.to(torch.int64), keys.to(quant.FLOAT_ROWS[fmt]), values.to(quant.FLOAT_ROWS[fmt]))
    parts = [_RECALL.pack(b"HWKR", CODEC_VERSION, code, m, d)]
    for t in tensors:
        parts.append(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    body = b"".join(parts)
    return body + crc32(body).to_bytes(4, "little")


def decode_recall(blob: bytes) -> tuple[Tensor, Tensor, Tensor]:
    """recall blob -> (keys [m, d], values [m, d], positions [m]) in the blob's dtype (int8 rows
    dequantised); CodecError when damaged."""
    blob = bytes(blob)
    if len(blob) < _RECALL.size + 4:
        raise CodecError(f"recall blob of {len(blob)} bytes is truncated")
    magic, version, code, m, d = _RECALL.unpack_from(blob)
    if magic != b"HWKR":
        raise CodecError(f"not a headwise recall blob (magic {magic!r})")
    if version != CODEC_VERSION:
        raise CodecError(f"recall blob has codec version {version}; this build reads version {CODEC_VERSION}")
    if code & 0xFF not in _CODE_DTYPES or (code >> 8 and code >> 8 not in _RECALL_CODE_ROWS):
        raise CodecError(f"recall blob has unknown dtype / row format code {code:#x}")
    dtype = _CODE_DTYPES[code & 0xFF]
    fmt = _RECALL_CODE_ROWS[code >> 8] if code >> 8 else _DTYPE_NAMES[dtype]
    row_dtype = torch.int8 if fmt == "int8" else quant.FLOAT_ROWS[fmt]
    scales = 2 * d * 4 if fmt == "int8" else 0
    rows = m * d * _itemsize(row_dtype)
    want = _RECALL.size + 8 * m + scales + 2 * rows + 4
    if len(blob) != want:
        raise CodecError(f"recall blob is {len(blob)} bytes, its header says {want}")
    if crc32(blob[:-4]) != int.from_bytes(blob[-4:], "little"):
        raise CodecError("recall blob checksum mismatch: the blob is corrupted")
    buf = bytearray(blob[_RECALL.size : -4])

    def field(dt: torch.dtype, count: int, offset: int) -> Tensor:
        return torch.frombuffer(buf, dtype=dt, count=count, offset=offset) if count else torch.empty(0, dtype=dt)

    pos = field(torch.int64, m, 0)
    kv = [field(row_dtype, m * d, 8 * m + scales + j * rows).reshape(m, d) for j in range(2)]
    if fmt == "int8":
        offs = torch.tensor([0, m])
        kv = [quant.dequantise(q, field(torch.float32, d, 8 * m + j * 4 * d).reshape(1, d), offs, dtype)
              for j, q in enumerate(kv)]
    elif row_dtype != dtype:
        kv = [t.to(dtype) for t in kv]
    return kv[0], kv[1], pos


def encode_recall(cache: CompactCache, precision: str | None = None) -> list[RecallEntry]:
    """One recall blob per merged row that has original keys/values, addressed by (layer, head, row),
    rows at `precision` (None: the cache's dtype)."""
    out: list[RecallEntry] = []
    for li, layer in enumerate(cache.compacted().layers):
        r = layer.recall
        if r is None or r.num_groups == 0 or r.keys.shape[0] != r.positions.numel():
            continue
        for idx in torch.nonzero(layer.recall_ids >= 0).flatten().tolist():
            head = int(torch.searchsorted(layer.head_offsets, idx, right=True)) - 1
            pos, k, v = r.group(int(layer.recall_ids[idx]))
            out.append(RecallEntry(li, head, idx - int(layer.head_offsets[head]), encode_recall_rows(pos, k, v, precision)))
    return out


def _attach_recall(layers: list[LayerCache], entries: list[RecallEntry], h: SegmentHeader) -> None:
    """Fill the RecallTables' original keys/values from per-row recall entries."""
    by_layer: dict[int, list[RecallEntry]] = {}
    for e in entries:
        by_layer.setdefault(e.layer, []).append(e)
    for li, es in sorted(by_layer.items()):
        if not 0 <= li < len(layers) or layers[li].recall is None:
            raise CodecError(f"recall entry for layer {li}, which has no merged rows")
        layer, r = layers[li], layers[li].recall
        keys = r.keys.new_zeros(r.positions.numel(), h.head_dim)
        values = keys.clone()
        seen = 0
        for e in es:
            k, v, pos = decode_recall(e.data)
            g = _group_of(layer, li, e.head, e.row)
            a, b = int(r.offsets[g]), int(r.offsets[g + 1])
            if k.shape[0] != b - a or not torch.equal(pos, r.positions[a:b]):
                raise CodecError(f"recall entry (layer {li}, head {e.head}, row {e.row}) does not match the segment's handles")
            keys[a:b], values[a:b] = k, v
            seen += 1
        if seen != r.num_groups:
            raise CodecError(f"layer {li}: {seen} recall entries for {r.num_groups} merged rows")
        layer.recall = RecallTable(r.offsets, r.positions, r.heads, keys, values)


def _group_of(layer: LayerCache, li: int, head: int, row: int) -> int:
    if not 0 <= head < layer.num_heads:
        raise CodecError(f"recall entry names head {head} of layer {li}, which has {layer.num_heads} heads")
    a, b = int(layer.head_offsets[head]), int(layer.head_offsets[head + 1])
    if not 0 <= row < b - a or int(layer.recall_ids[a + row]) < 0:
        raise CodecError(f"recall entry names row {row} of head {head} in layer {li}, which is not a merged row")
    return int(layer.recall_ids[a + row])
