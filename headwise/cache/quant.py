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

PRECISIONS = ("fp32", "bf16", "int8")  # what a request may ask for (Generate.kv_precision)
ROW_FORMATS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "int8": "int8"}
FLOAT_ROWS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QMAX = 127
SCALE_DTYPE = torch.float32


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


def error_bound(scale: Tensor) -> Tensor:
    """The largest |x - x_hat| an element with stored scale `scale` can have (before the engine dtype's rounding)."""
    return 0.5 * scale.float() * (1 + 2.0**-9)


def _layer_as_stored(layer: LayerCache, fmt: str) -> LayerCache:
    dtype = layer.keys.dtype
    if fmt == "int8":
        ko, vo = layer.key_offsets(), layer.head_offsets
        keys, values = dequantise(*quantise(layer.keys, ko), ko, dtype), dequantise(*quantise(layer.values, vo), vo, dtype)
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
