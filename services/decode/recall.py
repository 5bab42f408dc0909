"""Recall during decode: a merged row that attention leans on is replaced by its originals from the store.

A policy that merges rows (EMS) stores the originals under the context segment's key; a merged
row carries a recall id. When a decode step finds a merged row taking more than the threshold
of a head's attention (`DecodeStats.recalls`), the stream fetches that row's originals once and
swaps them into its cache before its next step. The three parts run where their data lives:
`wanted` and `apply` in the batcher's model thread between steps (they read and replace cache
layers that only that thread steps), `fetch` on the event loop (the store client is asyncio).
"""

from __future__ import annotations

import logging

from torch import Tensor

from headwise.cache.compact import CompactCache
from headwise.models.runner import DecodeStats

log = logging.getLogger("headwise.decode")

Wanted = tuple[int, int]  # (layer, recall id)
Fetched = tuple[int, int, tuple[Tensor, Tensor, Tensor]]  # (layer, recall id, (keys, values, positions))


class Recall:
    """One stream's recalls: which merged rows to fetch (each once), and swapping them in."""

    def __init__(self, key: str, cache: CompactCache, store):
        self.key, self.store = key, store  # merged rows come from the compressed context segment only
        self.seen = 0  # DecodeStats.recalls already looked at
        self.count = 0  # rows swapped in
        self.done: set[Wanted] = set()
        # per layer: recall id -> (head, row in the stored segment) of the merged row
        self.origin: list[dict[int, tuple[int, int]]] = []
        for layer in cache.layers:
            m: dict[int, tuple[int, int]] = {}
            for h in range(layer.num_heads):
                a, b = int(layer.head_offsets[h]), int(layer.head_offsets[h + 1])
                for r in (layer.recall_ids[a:b] >= 0).nonzero().flatten().tolist():
                    m[int(layer.recall_ids[a + r])] = (h, r)
            self.origin.append(m)

    def wanted(self, cache: CompactCache, stats: DecodeStats) -> list[Wanted]:
        """The merged rows the last step asked for and not asked for before (model thread)."""
        new, self.seen = stats.recalls[self.seen:], len(stats.recalls)
        out = []
        for layer_idx, share in new:
            layer = cache.layers[layer_idx]
            rid = int(layer.recall_ids[int(layer.head_offsets[share.head]) + share.row])
            if rid < 0 or (layer_idx, rid) in self.done or rid not in self.origin[layer_idx]:
                continue
            self.done.add((layer_idx, rid))
            out.append((layer_idx, rid))
        return out

    async def fetch(self, wanted: list[Wanted]) -> list[Fetched]:
        """The originals of `wanted` from the store (event loop); a failed or missing one is skipped."""
        out = []
        for layer_idx, rid in wanted:
            head, row = self.origin[layer_idx][rid]
            try:
                got = await self.store.recall(self.key, layer_idx, head, row)
            except Exception as e:  # noqa: BLE001 - recall is an improvement; decoding goes on without it
                log.warning("recall of layer %d head %d row %d failed: %s", layer_idx, head, row, e)
                continue
            if got is not None:
                out.append((layer_idx, rid, got))
        return out

    def apply(self, cache: CompactCache, fetched: list[Fetched]) -> None:
        """Swap the fetched originals in for their merged rows (model thread, between steps).
        A row is found by its recall id: an earlier swap in the same head moves the rows after it."""
        for layer_idx, rid, (keys, values, positions) in fetched:
            layer = cache.layers[layer_idx]
            head = self.origin[layer_idx][rid][0]
            a, b = int(layer.head_offsets[head]), int(layer.head_offsets[head + 1])
            at = (layer.recall_ids[a:b] == rid).nonzero().flatten().tolist()
            if not at:
                continue
            cache.layers[layer_idx] = layer.with_row_replaced(head, at[0], keys, values, positions)
            self.count += 1
