"""The per-head ragged attention: the test oracle of `headwise.attention` (not on any hot path).

One Python iteration per KV head, each over views of the head's flat rows; kept because it
reads like the definition and the vectorised paths must equal it (tests/test_attention.py).

Each KV head attends over its own rows: the ragged kept rows (with their log-weights:
a merged row standing for m tokens adds log m to its logit, RazorAttention Eq. 5), the
dense decode tail, and, during prefill, the new segment's rows under a causal mask.
Query head h uses KV head h // G (the repeat_kv convention).

PoD heads (`LayerCache.distant`) score their distant rows with the same head of their base
layer: q_base . K_base[same token] (training-free score sharing, ALGORITHMS.md 4.2 [P]),
in one softmax with their own keyed rows, over their own values. The base layer's
queries of the current step come in a `BaseQueries`, which the runner fills layer by layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from headwise.attention_common import BaseQueries, MergedShare, _distant_plan  # noqa: F401 - re-exported
from headwise.cache.compact import LayerCache


def _pod_logits(qh: Tensor, k_h: Tensor, layer: LayerCache, h: int, scaling: float, base: BaseQueries | None,
                q_rows: slice = slice(None)) -> Tensor:
    """Logits [G, S, n_h] of head h's query rows qh [G, S, d] over its ragged rows (no log-weights):
    its own keys k_h (`layer.head(h)[0]`) for keyed rows, the base layer's query and keys for distant rows.
    `q_rows`: which of the step's query rows qh holds (the base layer's queries are taken alike)."""
    b = layer.distant_from[h]
    if base is None or b not in base.queries:
        raise ValueError(f"head {h} scores its distant rows with layer {b}; pass that layer's queries (BaseQueries)")
    keyed, distant, rows = _distant_plan(layer, h, base.layers[b], b)
    G = qh.shape[0]
    qb = base.queries[b][h * G : (h + 1) * G, q_rows]  # [G, S, d] the base layer's queries, same step and rows
    out = qh.new_empty(G, qh.shape[1], keyed.numel() + distant.numel())
    out[..., keyed] = (qh @ k_h.to(qh.dtype).T) * scaling
    out[..., distant] = (qb.to(qh.dtype) @ base.layers[b].keys[rows].to(qh.dtype).T) * scaling
    return out


def _has_weights(layer: LayerCache) -> bool:
    flag = getattr(layer, "_has_weights", None)
    if flag is None or flag[0] is not layer.log_weights:
        flag = (layer.log_weights, bool((layer.log_weights != 0).any()))
        layer._has_weights = flag  # cached: the check is a device sync
    return flag[1]


def ragged_prefill_attention(
    q: Tensor, layer: LayerCache | None, new_keys: Tensor, new_values: Tensor, scaling: float,
    base: BaseQueries | None = None,
) -> Tensor:
    """Attention of a new segment over the cached rows and, causally, over itself.

    q: [Hq, S, d]; new_keys/new_values: [Hkv, S, d]; returns [Hq, S, d]. `base` is needed
    when the layer has PoD (distant) rows.
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
        if layer.head_distant(h) is not None:
            out[h * G : (h + 1) * G] = _pod_prefill_head(q[h * G : (h + 1) * G], layer, h, new_keys[h], new_values[h],
                                                         causal, scaling, base)
            continue
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


def _pod_prefill_head(qh: Tensor, layer: LayerCache, h: int, new_k: Tensor, new_v: Tensor, causal: Tensor,
                     scaling: float, base: BaseQueries | None) -> Tensor:
    """One PoD head: qh [G, S, d] over its ragged rows, the tail and, causally, new_k/new_v [S, d]."""
    k_h, v_h, lw_h = layer.head(h)
    logits = [_pod_logits(qh, k_h, layer, h, scaling, base) + lw_h.to(qh.dtype)]  # [G, S, n_h]
    vs = [v_h]
    tail = layer.tail()
    if tail is not None:
        logits.append((qh @ tail[0][h].T) * scaling); vs.append(tail[1][h])
    logits.append((qh @ new_k.T) * scaling + causal); vs.append(new_v)
    return torch.softmax(torch.cat(logits, -1), -1) @ torch.cat(vs)


def ragged_decode_attention(
    q: Tensor, layer: LayerCache, scaling: float, recall_threshold: float | None = None,
    base: BaseQueries | None = None,
) -> tuple[Tensor, list[MergedShare]]:
    """One decode step: q [Hq, 1, d] over every row of the layer (new token already appended).

    Returns the output [Hq, 1, d] and the merged rows whose attention share in their head
    exceeded `recall_threshold` (empty when the threshold is None or no row is merged).
    Logits of the ragged part and the tail are computed separately and joined, so no
    per-step copy of the cache is made. `base` is needed when the layer has PoD (distant) rows.
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
        if layer.head_distant(h) is None:
            logits = (qh @ k_h.T) * scaling  # [G, n_h]
        else:
            logits = _pod_logits(q[h * G : (h + 1) * G], k_h, layer, h, scaling, base)[:, 0]
        if weighted:
            logits = logits + lw_h.to(q.dtype)
        if tail is not None:
            logits = torch.cat([logits, (qh @ tail[0][h].T) * scaling], dim=1)  # [G, n_h + T]
        p = torch.softmax(logits, dim=-1)
        n_h = v_h.shape[0]
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
    """Every head holds the same number of rows, all keyed: the flat rows are then a [Hkv, n, d] view."""
    flag = getattr(layer, "_uniform", None)
    if flag is None or flag[0] is not layer.head_offsets:
        lens = layer.head_lengths()
        flag = (layer.head_offsets, bool((lens == lens[0]).all()) and layer.distant is None)
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


SCORE_BLOCK_FLOATS = 1 << 19  # logits per query block of prefill_attention_scores (2 MiB of fp32)


def prefill_attention_scores(
    q: Tensor, layer: LayerCache, new_keys: Tensor, new_values: Tensor, scaling: float, scored: int, query_from: int = 0,
    base: BaseQueries | None = None,
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
    weighted = _has_weights(layer)
    # One softmax over [cached rows ; new rows], computed in two blocks in place: no concatenated
    # keys, values or bias (at 2,000 cached rows those copies cost more than the products). Query
    # rows go in blocks whose logits stay cache-sized (SCORE_BLOCK_FLOATS): each block's logits are
    # written, exponentiated, normalised, multiplied and reduced while still in cache (~25% less
    # time per layer at 2,000 rows than one [G, C, n] pass per head), and a block sees only the new keys
    # its causal mask lets through.
    for h in range(Hkv):
        k_h, v_h, lw_h = layer.head(h)
        n_h = v_h.shape[0]
        k_f, v_f = k_h.float(), v_h.float()
        lw_f = lw_h.float() if weighted else None
        distant = layer.head_distant(h) is not None
        step = max(16, SCORE_BLOCK_FLOATS // (G * (n_h + C)))
        for a in range(0, C, step):
            b = min(C, a + step)
            qh = q[h * G : (h + 1) * G, a:b].float()  # [G, rows, d]
            if distant:
                pc = _pod_logits(qh, k_h, layer, h, scaling, base, slice(a, b))
            else:
                pc = (qh @ k_f.T).mul_(scaling)  # [G, rows, n_h]
            if lw_f is not None:
                pc += lw_f
            pn = (qh @ new_keys[h, :b].float().T).mul_(scaling).add_(causal[a:b, :b])  # [G, rows, b]
            m = torch.maximum(pc.amax(-1, keepdim=True), pn.amax(-1, keepdim=True))
            pc.sub_(m).exp_()
            pn.sub_(m).exp_()
            z = pc.sum(-1, keepdim=True).add_(pn.sum(-1, keepdim=True))
            pc.div_(z)
            pn.div_(z)
            out[h * G : (h + 1) * G, a:b] = (pc @ v_f).add_(pn @ new_values[h, :b].float()).to(q.dtype)
            if b > query_from:
                # one dim at a time: over (0, 1) at once torch takes a slow generic path (~40x here)
                got = pc[:, max(a, query_from) - a :, n_h - scored : n_h].amax(dim=1).amax(dim=0)
                torch.maximum(scores[h], got, out=scores[h])
    return out, scores
