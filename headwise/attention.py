"""Ragged attention over a CompactCache layer.

Each KV head attends over its own rows: the ragged kept rows (with their log-weights:
a merged row standing for m tokens adds log m to its logit, RazorAttention Eq. 5), the
dense decode tail, and, during prefill, the new segment's rows under a causal mask.
Query head h uses KV head h // G (the repeat_kv convention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.cache.compact import LayerCache


@dataclass
class MergedShare:
    """A merged row that took more than the threshold of a head's attention in one step."""

    head: int  # KV head
    row: int  # row index within the head's ragged rows
    share: float  # max over the head's query heads of its softmax probability


def _has_weights(layer: LayerCache) -> bool:
    flag = getattr(layer, "_has_weights", None)
    if flag is None or flag[0] is not layer.log_weights:
        flag = (layer.log_weights, bool((layer.log_weights != 0).any()))
        layer._has_weights = flag  # cached: the check is a device sync
    return flag[1]


def ragged_prefill_attention(
    q: Tensor, layer: LayerCache | None, new_keys: Tensor, new_values: Tensor, scaling: float
) -> Tensor:
    """Attention of a new segment over the cached rows and, causally, over itself.

    q: [Hq, S, d]; new_keys/new_values: [Hkv, S, d]; returns [Hq, S, d].
    """
    Hq, S, d = q.shape
    Hkv = new_keys.shape[0]
    G = Hq // Hkv
    if layer is None or layer.num_rows == 0:
        # The plain causal path: bit-compatible with transformers' sdpa attention.
        k = new_keys.repeat_interleave(G, 0)
        v = new_values.repeat_interleave(G, 0)
        return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scaling)[0]
    causal = torch.full((S, S), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)  # [S, S]
    tail = layer.tail()
    out = q.new_empty(Hq, S, d)
    for h in range(Hkv):
        k_h, v_h, lw_h = layer.head(h)
        ks, vs, bias = [k_h], [v_h], [lw_h.to(q.dtype)[None].expand(S, -1)]
        if tail is not None:
            ks.append(tail[0][h]); vs.append(tail[1][h])
            bias.append(q.new_zeros(S, tail[0].shape[1]))
        ks.append(new_keys[h]); vs.append(new_values[h]); bias.append(causal)
        K, V, B = torch.cat(ks), torch.cat(vs), torch.cat(bias, dim=1)  # [n, d], [n, d], [S, n]
        qh = q[h * G : (h + 1) * G]  # [G, S, d]
        out[h * G : (h + 1) * G] = F.scaled_dot_product_attention(
            qh[None], K[None, None].expand(1, G, -1, -1), V[None, None].expand(1, G, -1, -1),
            attn_mask=B[None, None], scale=scaling,
        )[0]
    return out


def ragged_decode_attention(
    q: Tensor, layer: LayerCache, scaling: float, recall_threshold: float | None = None
) -> tuple[Tensor, list[MergedShare]]:
    """One decode step: q [Hq, 1, d] over every row of the layer (new token already appended).

    Returns the output [Hq, 1, d] and the merged rows whose attention share in their head
    exceeded `recall_threshold` (empty when the threshold is None or no row is merged).
    Logits of the ragged part and the tail are computed separately and joined, so no
    per-step copy of the cache is made.
    """
    Hq, _, d = q.shape
    Hkv = layer.num_heads
    G = Hq // Hkv
    tail = layer.tail()
    weighted = _has_weights(layer)
    watch = recall_threshold is not None and layer.recall is not None and layer.recall.num_groups > 0
    if not watch and _uniform(layer):
        return _uniform_decode(q, layer, scaling, weighted, tail), []
    out = q.new_empty(Hq, 1, d)
    hits: list[MergedShare] = []
    for h in range(Hkv):
        k_h, v_h, lw_h = layer.head(h)
        qh = q[h * G : (h + 1) * G, 0]  # [G, d]
        logits = (qh @ k_h.T) * scaling  # [G, n_h]
        if weighted:
            logits = logits + lw_h.to(q.dtype)
        if tail is not None:
            logits = torch.cat([logits, (qh @ tail[0][h].T) * scaling], dim=1)  # [G, n_h + T]
        p = torch.softmax(logits, dim=-1)
        n_h = k_h.shape[0]
        o = p[:, :n_h] @ v_h
        if tail is not None:
            o = o + p[:, n_h:] @ tail[1][h]
        out[h * G : (h + 1) * G, 0] = o
        if watch:
            a = int(layer.head_offsets[h])
            merged = (layer.recall_ids[a : a + n_h] >= 0).nonzero().flatten()
            if merged.numel():
                share = p[:, merged].amax(0)
                for i in (share > recall_threshold).nonzero().flatten().tolist():
                    hits.append(MergedShare(h, int(merged[i]), float(share[i])))
    return out, hits


def _uniform(layer: LayerCache) -> bool:
    """Every head holds the same number of rows: the flat rows are then a [Hkv, n, d] view."""
    flag = getattr(layer, "_uniform", None)
    if flag is None or flag[0] is not layer.head_offsets:
        lens = layer.head_lengths()
        flag = (layer.head_offsets, bool((lens == lens[0]).all()))
        layer._uniform = flag
    return flag[1]


def _uniform_decode(q: Tensor, layer: LayerCache, scaling: float, weighted: bool, tail) -> Tensor:
    """Batched over heads when the ragged rows happen to be rectangular (full, streaming, ...)."""
    Hq, _, d = q.shape
    Hkv = layer.num_heads
    n = layer.keys.shape[0] // Hkv
    qg = q.view(Hkv, Hq // Hkv, d)  # [Hkv, G, d]
    k, v = layer.keys.view(Hkv, n, d), layer.values.view(Hkv, n, d)
    logits = torch.bmm(qg, k.transpose(1, 2)) * scaling  # [Hkv, G, n]
    if weighted:
        logits = logits + layer.log_weights.view(Hkv, 1, n).to(q.dtype)
    if tail is not None:
        logits = torch.cat([logits, torch.bmm(qg, tail[0].transpose(1, 2)) * scaling], dim=2)
    p = torch.softmax(logits, dim=-1)
    o = torch.bmm(p[..., :n], v)
    if tail is not None:
        o = o + torch.bmm(p[..., n:], tail[1])
    return o.reshape(Hq, 1, d)


def column_sums(q: Tensor, k: Tensor, scaling: float, chunk: int = 512) -> Tensor:
    """Sum over the segment's queries of the causal attention each key receives (H2O score).

    q: [Hq, S, d]; k: [Hkv, S, d]; returns [Hq, S] fp32. Chunked over query rows so the
    full S x S matrix never exists at once.
    """
    Hq, S, _ = q.shape
    G = Hq // k.shape[0]
    kr = k.repeat_interleave(G, 0).float()  # [Hq, S, d]
    acc = torch.zeros(Hq, S, dtype=torch.float32, device=q.device)
    cols = torch.arange(S, device=q.device)
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        logits = (q[:, a:b].float() @ kr.transpose(1, 2)) * scaling  # [Hq, b-a, S]
        rows = torch.arange(a, b, device=q.device)
        logits.masked_fill_(cols[None, :] > rows[:, None], float("-inf"))
        acc += torch.softmax(logits, -1).sum(1)
    return acc


def window_probs(window_queries: Tensor, keys: Tensor, scaling: float, gain: Tensor | None = None) -> Tensor:
    """Causal attention of the last W queries over the segment's keys (ALGORITHMS.md 0.2).

    window_queries: [Hq, W, d]; keys: [Hkv, N, d]; gain: optional [W] per-row temperature.
    Returns P [Hq, W, N] fp32; the query at position N-W+i sees keys 0..N-W+i.
    """
    Hq, W, _ = window_queries.shape
    N = keys.shape[1]
    G = Hq // keys.shape[0]
    kr = keys.repeat_interleave(G, 0).float()
    logits = (window_queries.float() @ kr.transpose(1, 2)) * scaling  # [Hq, W, N]
    if gain is not None:
        logits = logits * gain.float()[None, :, None]
    rows = torch.arange(N - W, N, device=keys.device)
    cols = torch.arange(N, device=keys.device)
    logits.masked_fill_(cols[None, None, :] > rows[None, :, None], float("-inf"))
    return torch.softmax(logits, -1)


def prefill_attention_scores(
    q: Tensor, layer: LayerCache, new_keys: Tensor, new_values: Tensor, scaling: float, scored: int, query_from: int = 0
) -> tuple[Tensor, Tensor]:
    """ragged_prefill_attention, plus what each of the last `scored` rows of every head received.

    q: [Hq, C, d]; new_keys/new_values: [Hkv, C, d]; the layer must have no decode tail.
    Returns the output [Hq, C, d] and scores [Hkv, scored] fp32: for each of the last `scored`
    ragged rows of a head, the largest softmax probability any query row >= query_from of the
    head's group gave it (KVzip's reconstruction score).
    """
    Hq, C, d = q.shape
    Hkv = new_keys.shape[0]
    G = Hq // Hkv
    if layer.tail_len:
        raise ValueError("prefill_attention_scores needs a compacted layer (no decode tail)")
    causal = torch.full((C, C), float("-inf"), dtype=torch.float32, device=q.device).triu_(1)
    out = q.new_empty(Hq, C, d)
    scores = torch.zeros(Hkv, scored, dtype=torch.float32, device=q.device)
    for h in range(Hkv):
        k_h, v_h, lw_h = layer.head(h)
        n_h = k_h.shape[0]
        K, V = torch.cat([k_h, new_keys[h]]), torch.cat([v_h, new_values[h]])  # [n_h + C, d]
        bias = torch.cat([lw_h.float()[None].expand(C, -1), causal], dim=1)  # [C, n_h + C]
        p = torch.softmax((q[h * G : (h + 1) * G].float() @ K.float().T) * scaling + bias, dim=-1)  # [G, C, n_h + C]
        out[h * G : (h + 1) * G] = (p @ V.float()).to(q.dtype)
        scores[h] = p[:, query_from:, n_h - scored : n_h].amax(dim=(0, 1))
    return out, scores
