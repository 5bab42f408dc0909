"""What both ragged attentions share: the recall watch's record, PoD's base-layer queries, and the
plan that finds a PoD head's distant rows' keys in its base layer (built once per cache change)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from headwise.cache.compact import LayerCache


@dataclass
class MergedShare:
    """A merged row that took more than the threshold of a head's attention in one step."""

    head: int  # KV head
    row: int  # row index within the head's ragged rows
    share: float  # max over the head's query heads of its softmax probability


@dataclass
class BaseQueries:
    """What PoD layers of one forward step take from their base layers.

    layers:  the cache's layers; a distant row's key is its token's row in the base layer
    queries: base layer index -> that layer's post-RoPE queries of this step, [Hq, S, d]
    """

    layers: Sequence[LayerCache]
    queries: dict[int, Tensor] = field(default_factory=dict)
    last_use: dict[int, int] = field(default_factory=dict)  # base layer -> last layer that needs it

    @classmethod
    def for_cache(cls, cache) -> "BaseQueries":
        """For a forward step over `cache` (a CompactCache or None); holds nothing without PoD rows."""
        if cache is None:
            return cls([])
        return cls(cache.layers, {}, cache.shared_bases())

    def hold(self, layer: int, q: Tensor) -> None:
        """Keep layer's queries [Hq, S, d] if a later layer needs them."""
        if layer in self.last_use:
            self.queries[layer] = q

    def release(self, layer: int) -> None:
        """Forget the queries that no layer after `layer` needs."""
        for b, last in self.last_use.items():
            if last == layer:
                self.queries.pop(b, None)


def distant_heads(layers, base_layers, num_heads: int):
    """PoD over B streams' layers: for every (stream b, head h) with distant rows, (b, h, the base
    layer's index, the base LayerCache, the distant rows within the head, where their tokens' keys
    are in the base's keys: `_distant_plan`'s)."""
    for b, lc in enumerate(layers):
        for h in range(num_heads):
            if lc.head_distant(h) is None:
                continue
            if base_layers is None:
                raise ValueError(f"head {h} scores its distant rows with layer {lc.distant_from[h]}; "
                                 "pass the caches' layers (BaseQueries or base_layers)")
            bl = lc.distant_from[h]
            base = base_layers[b][bl]
            _, distant, rows = _distant_plan(lc, h, base, bl)
            yield b, h, bl, base, distant, rows


def distant_plans(layers, base_layers, num_heads: int, offset: int = 0) -> list[tuple[int, Tensor, Tensor, int]]:
    """PoD over B streams' layers: for every (stream b, head h) with distant rows, (b * H + h, the
    rows' slots within the head plus `offset`, the base layer's keys of their tokens, the base layer)."""
    return [(b * num_heads + h, distant + offset, base.keys[rows], bl)
            for b, h, bl, base, distant, rows in distant_heads(layers, base_layers, num_heads)]


def _distant_plan(layer: LayerCache, h: int, base: LayerCache, b: int) -> tuple[Tensor, Tensor, Tensor | slice]:
    """Head h of a PoD layer: its keyed rows [n_k], its distant rows [n_d] (indices within the
    head), and where their tokens' keys are in base.keys (a slice when contiguous, else [n_d])."""
    cache = layer.__dict__.setdefault("_distant_plans", {})
    ident = (layer.distant, layer.head_offsets, base.positions, base.keys)
    hit = cache.get(h)
    if hit is not None and all(x is y for x, y in zip(hit[0], ident, strict=True)):
        return hit[1]
    dist = layer.head_distant(h)
    if base.head_distant(h) is not None and bool(base.head_distant(h).any()):
        raise ValueError(f"layer {b} is the base of head {h} but has distant rows itself")
    a, e = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
    pos = layer.positions[a:e][dist]  # [n_d] tokens whose logits come from the base
    ba, be = int(base.head_offsets[h]), int(base.head_offsets[h + 1])
    order = base.positions[ba:be].argsort(stable=True)
    held = base.positions[ba:be][order]
    j = torch.searchsorted(held, pos).clamp_max(max(0, held.numel() - 1))
    if held.numel() == 0 or not bool((held[j] == pos).all()):
        missing = pos[held[j] != pos][:1].tolist() if held.numel() else pos[:1].tolist()
        raise ValueError(f"head {h}: base layer {b} holds no row for distant token at position {missing}")
    rows = order[j] + int(base.key_offsets()[h])
    n = rows.numel()
    if n and int(rows[-1]) - int(rows[0]) == n - 1 and bool((rows.diff() == 1).all()):
        rows = slice(int(rows[0]), int(rows[0]) + n)  # the usual PoD segment: a view, no gather
    plan = ((~dist).nonzero().flatten(), dist.nonzero().flatten(), rows)
    cache[h] = (ident, plan)
    return plan
