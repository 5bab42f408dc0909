"""Row precision of a stored cache: fp32 / bf16 / fp16 rows, or int8 rows with scales.

int8 (absmax, symmetric, round to nearest, q in [-127, 127]): keys and values alike, one fp32
scale per (KV head, channel) over that head's rows: scales [Hkv, d] per layer for K and for V,
scale = absmax / 127 (0 for an all-zero head channel, whose q are 0). Per channel for keys is
KIVI's choice (arXiv 2402.02750: key outliers sit in fixed channels); for values KIVI takes
one scale per token. bench.kvquant measured all four combinations on the default model's kvzip
caches: every one kept every answer of bench.quality's default suite and the next-token KL
stayed within 2e-4..4e-4 nats; per-channel values had the lower value error (0.73% vs 0.76%)
and are the only choice that costs no bytes per row, which brings int8 within 2% of 4x fp32.
Error bound per element: |x - dequantise(quantise(x))| <= 0.5 * s * (1 + 2^-9), s the
element's (head, channel) scale (the 2^-9 covers fp32 arithmetic), plus the rounding of the
result to the engine's dtype (bf16: 2^-8 relative).

Only K and V rows (and, in a store put's recall blobs, the originals of merged rows) are ever
quantised; positions, log-weights, PoD distant masks and recall handles stay exact. `as_stored` gives a cache with the rows decode will get back from the
store, so prefill can run later segments over exactly those rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache

PRECISIONS = ("fp32", "bf16", "int8", "int4")  # what a request may ask for (Generate.kv_precision)
ROW_FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8", "int4": "int4"}
FLOAT_ROWS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTISED = ("int8", "int4")  # row formats with scales
QMAX = 127
SCALE_DTYPE = torch.float32
QMAX4 = 7
SCALE4_DTYPE = torch.bfloat16  # int4 scales: bf16, rounded up (so |x / s| <= 7 still holds)
GROUP4 = 32  # int4: rows of one head per scale (per channel); the last group of a head may be shorter


def row_format(precision: str | None, dtype: torch.dtype) -> str:
    """The codec's row format name for a precision (None: the cache's own dtype, lossless)."""
    if precision is None:
        return {v: k for k, v in FLOAT_ROWS.items()}[dtype]
    if precision not in ROW_FORMATS:
        raise ValueError(f"kv precision {precision!r} is not one of {', '.join(ROW_FORMATS)}")
    return ROW_FORMATS[precision]


def lossless(precision: str | None, dtype: torch.dtype) -> bool:
    """Whether rows of `dtype` stored at `precision` come back bit for bit."""
    fmt = row_format(precision, dtype)
    return fmt == "float32" or fmt == row_format(None, dtype)


def head_index(offsets: Tensor, rows: int) -> Tensor:
    """[rows] int64: the head each row belongs to, from offsets [H + 1]."""
    lens = (offsets[1:] - offsets[:-1]).to(torch.long)
    return torch.repeat_interleave(torch.arange(lens.numel(), device=offsets.device), lens, output_size=rows)


def quantise(x: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """Rows x [R, d] (any float dtype) of the heads at offsets [H + 1] -> (q [R, d] int8, scales [H, d] fp32).

    Computed with numpy on the CPU: single-threaded by design. torch's intra-op threads on these
    many small ops made an int8 put 25x slower on a loaded 2-core machine (bench.kvstore), and the
    codec runs beside the model's own threads."""
    H, d = offsets.numel() - 1, x.shape[1]
    rows_all = x.detach().to("cpu", torch.float32).numpy()
    bounds = offsets.tolist()
    scales = np.zeros((H, d), dtype=np.float32)
    q = np.empty(rows_all.shape, dtype=np.int8)
    # one float buffer for every head (no temporaries per step): max and min instead of abs, then
    # scale, round and clamp in place
    buf = np.empty((max([b - a for a, b in zip(bounds, bounds[1:], strict=False)], default=0), d), dtype=np.float32)
    for h in range(H):
        a, b = bounds[h], bounds[h + 1]
        if b > a:
            rows, t = rows_all[a:b], buf[: b - a]
            s = np.maximum(rows.max(axis=0), -rows.min(axis=0)) / np.float32(QMAX)
            if not bool(np.isfinite(s).all()):
                raise ValueError("rows hold non-finite entries; they cannot be stored as int8")
            scales[h] = s
            inv = np.divide(np.float32(1), s, out=np.zeros(d, dtype=np.float32), where=s > 0)
            np.multiply(rows, inv, out=t)
            np.rint(t, out=t)  # round half to even
            np.clip(t, -QMAX, QMAX, out=t)
            q[a:b] = t
    return torch.from_numpy(q).to(x.device), torch.from_numpy(scales).to(x.device)


def dequantise(q: Tensor, scales: Tensor, offsets: Tensor, dtype: torch.dtype) -> Tensor:
    """q [R, d] int8, scales [H, d], offsets [H + 1] -> rows [R, d] of `dtype` (numpy, as `quantise`)."""
    qn, sn = q.to("cpu").numpy(), scales.to("cpu", torch.float32).numpy()
    out = np.empty(qn.shape, dtype=np.float32)
    bounds = offsets.tolist()
    for h in range(offsets.numel() - 1):
        a, b = bounds[h], bounds[h + 1]
        np.multiply(qn[a:b], sn[h], out=out[a:b])
    t = torch.from_numpy(out).to(q.device)
    return t if dtype == torch.float32 else t.to(dtype)


def group_count(offsets: Tensor, group: int = GROUP4) -> int:
    """int4 scale rows for the heads at offsets [H + 1]: ceil(rows / group) per head (an empty head has none)."""
    lens = (offsets[1:] - offsets[:-1]).to(torch.long)
    return int(((lens + group - 1) // group).sum())


def group_index(offsets: Tensor, rows: int, group: int = GROUP4) -> Tensor:
    """[rows] int64: the int4 scale row (group) each row belongs to: groups of `group` rows within each head."""
    lens = (offsets[1:] - offsets[:-1]).to(torch.long)
    base = torch.zeros(lens.numel(), dtype=torch.long)
    base[1:] = torch.cumsum((lens + group - 1) // group, 0)[:-1]
    hid = head_index(offsets.cpu(), rows)
    local = torch.arange(rows, dtype=torch.long) - offsets.cpu().to(torch.long)[hid]
    return base[hid] + local // group


def _round_up_bf16(s: np.ndarray) -> np.ndarray:
    """Non-negative finite fp32 -> the smallest bf16 >= each (as uint16 bits)."""
    u = s.view(np.uint32)
    up = (u & np.uint32(0xFFFF0000)) + np.where(u & np.uint32(0xFFFF), np.uint32(0x10000), np.uint32(0))
    return (up >> np.uint32(16)).astype(np.uint16)


def quantise4(x: Tensor, offsets: Tensor, group: int = GROUP4) -> tuple[Tensor, Tensor]:
    """Rows x [R, d] of the heads at offsets [H + 1] -> (packed [R, ceil(d / 2)] uint8, scales [G, d] bf16).

    Symmetric absmax, q = round(x / s) in [-7, 7], one bf16 scale per (group of `group` rows of one
    head, channel), rounded up from absmax / 7; two q per byte, element 2j in the low nibble
    (two's complement), a zero nibble pads an odd d. numpy, single-threaded, as `quantise`."""
    R, d = x.shape
    rows = x.detach().to("cpu", torch.float32).numpy()
    gid = group_index(offsets, R, group).numpy()
    n = group_count(offsets, group)
    if R:
        starts = np.flatnonzero(np.diff(gid, prepend=-1))
        absmax = np.maximum(np.maximum.reduceat(rows, starts, axis=0), -np.minimum.reduceat(rows, starts, axis=0))
        exact = (np.abs(absmax) / np.float32(QMAX4)).astype(np.float32)  # abs: no -0.0 (sign bit set)
        if not bool(np.isfinite(exact).all()):
            raise ValueError("rows hold non-finite entries; they cannot be stored as int4")
        bits = _round_up_bf16(exact)
    else:
        bits = np.zeros((n, d), dtype=np.uint16)
    s = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    with np.errstate(over="ignore"):
        if not bool(np.isfinite(s * np.float32(QMAX4)).all()):  # the rounded-up scale times 7 past fp32's largest
            raise ValueError("rows hold entries too large for int4 (within 1% of fp32's largest)")
    inv = np.divide(np.float32(1), s, out=np.zeros_like(s), where=s > 0)
    t = rows * inv[gid] if R else np.zeros((0, d), dtype=np.float32)
    np.rint(t, out=t)
    np.clip(t, -QMAX4, QMAX4, out=t)
    q = t.astype(np.int8)
    if d % 2:
        q = np.concatenate([q, np.zeros((R, 1), dtype=np.int8)], axis=1)
    packed = (q[:, 0::2].view(np.uint8) & np.uint8(0xF)) | (q[:, 1::2].view(np.uint8) << np.uint8(4))
    scales = torch.from_numpy(np.ascontiguousarray(bits)).view(SCALE4_DTYPE)
    return torch.from_numpy(np.ascontiguousarray(packed)).to(x.device), scales.to(x.device)


def unpack4(packed: Tensor, d: int) -> Tensor:
    """[R, ceil(d / 2)] uint8 -> q [R, d] int8 in [-8, 7] (the inverse of quantise4's packing)."""
    p = packed.to("cpu").numpy()
    out = np.empty((p.shape[0], 2 * p.shape[1]), dtype=np.int8)
    out[:, 0::2] = ((p & np.uint8(0xF)) ^ np.uint8(8)).astype(np.int8) - np.int8(8)
    out[:, 1::2] = ((p >> np.uint8(4)) ^ np.uint8(8)).astype(np.int8) - np.int8(8)
    return torch.from_numpy(np.ascontiguousarray(out[:, :d]))


def dequantise4(packed: Tensor, scales: Tensor, offsets: Tensor, dtype: torch.dtype, group: int = GROUP4) -> Tensor:
    """packed [R, ceil(d / 2)] uint8, scales [G, d] bf16, offsets [H + 1] -> rows [R, d] of `dtype`."""
    d = scales.shape[1]
    q = unpack4(packed, d).numpy()
    s = scales.to("cpu", torch.float32).numpy()
    gid = group_index(offsets, q.shape[0], group).numpy()
    out = q.astype(np.float32)
    if out.size:
        np.multiply(out, s[gid], out=out)
    t = torch.from_numpy(out).to(packed.device)
    return t if dtype == torch.float32 else t.to(dtype)


def quantise_rows(x: Tensor, offsets: Tensor, fmt: str) -> tuple[Tensor, Tensor]:
    """(q, scales) of rows in a quantised row format ("int8" or "int4")."""
    return quantise(x, offsets) if fmt == "int8" else quantise4(x, offsets)


def dequantise_rows(q: Tensor, scales: Tensor, offsets: Tensor, fmt: str, dtype: torch.dtype) -> Tensor:
    return dequantise(q, scales, offsets, dtype) if fmt == "int8" else dequantise4(q, scales, offsets, dtype)


def element_scales(scales: Tensor, offsets: Tensor, rows: int, fmt: str) -> Tensor:
    """[rows, d]: the stored scale of each element (its head's for int8, its row group's for int4)."""
    idx = head_index(offsets, rows) if fmt == "int8" else group_index(offsets, rows)
    return scales.float()[idx.to(scales.device)]


def error_bound(scale: Tensor) -> Tensor:
    """The largest |x - x_hat| an element with stored scale `scale` can have (before the engine dtype's rounding)."""
    return 0.5 * scale.float() * (1 + 2.0**-9)


def _layer_as_stored(layer: LayerCache, fmt: str) -> LayerCache:
    dtype = layer.keys.dtype
    if fmt in QUANTISED:
        ko, vo = layer.key_offsets(), layer.head_offsets
        keys = dequantise_rows(*quantise_rows(layer.keys, ko, fmt), ko, fmt, dtype)
        values = dequantise_rows(*quantise_rows(layer.values, vo, fmt), vo, fmt, dtype)
    else:
        keys, values = (t.to(FLOAT_ROWS[fmt]).to(dtype) for t in (layer.keys, layer.values))
    return dataclasses.replace(layer, keys=keys, values=values)


def as_stored(cache: CompactCache, precision: str | None) -> CompactCache:
    """The (compacted) cache with its rows as the store gives them back at `precision`: what
    decode will hold. Same shapes, dtype, positions, log-weights and recall handles."""
    cache = cache.compacted()
    fmt = row_format(precision, cache.layers[0].keys.dtype) if cache.layers else "float32"
    if cache.layers and fmt == row_format(None, cache.layers[0].keys.dtype):
        return CompactCache([dataclasses.replace(lc) for lc in cache.layers], cache.seq_len, cache.start, dict(cache.meta))
    return CompactCache([_layer_as_stored(lc, fmt) for lc in cache.layers], cache.seq_len, cache.start, dict(cache.meta))
