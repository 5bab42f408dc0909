"""CompactCache: a KV cache that is ragged per attention head, for real.

Every (layer, KV head) holds its own number of rows. Rows of all heads of one layer are
flattened into `keys`/`values` of shape [R, d] with `head_offsets` [Hkv + 1] (the
`cu_seqlens` layout of varlen attention), so nothing evicted occupies memory, the wire
or the store. Decode tokens are the same for every head, so they live in a dense
tail [Hkv, T, d] that grows by doubling; `compacted()` folds the tail into the ragged rows.

PoD (ALGORITHMS.md 4) heads hold values for all their rows but keys for some only: a
`distant` row has no key of its own and takes its logit from the same token's row of the
same KV head in an earlier layer `distant_from[h]` (the block's base layer), scored with
that layer's query. Such a layer stores keys only for its other rows, so `keys` is
[R_k, d] with R_k < R, and the missing rows cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

NO_RECALL = -1  # recall id of a row that stands only for itself


@dataclass
class RecallTable:
    """Originals behind merged rows of one layer, so the store can keep them for recall.

    Merged row with recall id `i` stands for `positions[offsets[i]:offsets[i+1]]`, whose
    original keys/values are `keys`/`values` at the same slice (may be empty tensors when
    only the handle, not the data, is carried).
    """

    offsets: Tensor  # [G + 1] int64
    positions: Tensor  # [sum m_i] int64, original token positions
    heads: Tensor  # [G] int64, KV head of each merged row
    keys: Tensor  # [sum m_i, d] or [0, d]
    values: Tensor  # [sum m_i, d] or [0, d]

    @property
    def num_groups(self) -> int:
        return self.offsets.numel() - 1

    def group(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.positions[a:b], self.keys[a:b], self.values[a:b]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.positions, self.heads, self.keys, self.values))

    def to(self, device) -> "RecallTable":
        return RecallTable(*(t.to(device) for t in (self.offsets, self.positions, self.heads, self.keys, self.values)))


@dataclass
class LayerCache:
    """The kept rows of every KV head of one layer.

    keys, values: [R, d] post-RoPE rows, head h at rows head_offsets[h]:head_offsets[h+1].
    positions:    [R] int64 original token position; -1 for synthetic rows (merged/compensation).
    log_weights:  [R] float32 additive logit bias: 0 for a real token, log(count) for a row
                  standing for `count` tokens (RazorAttention Eq. 5 in log space).
    recall_ids:   [R] int64 index into `recall`, NO_RECALL for ordinary rows.
    tail_*:       dense decode rows shared by all heads: [Hkv, cap, d], first tail_len valid.
    distant:      [R] bool, or None when every row holds its key. True marks a row without
                  a key (PoD): `keys` then holds only the other rows, [R_k, d], head h at
                  key_offsets()[h]:key_offsets()[h+1], in row order.
    distant_from: per KV head, the earlier layer whose same head scores this head's distant
                  rows (its row of the same position, its query); -1 for heads without any.
    Rows of a head are in segment order; tail rows and later segments' rows have keys.
    """

    keys: Tensor
    values: Tensor
    head_offsets: Tensor
    positions: Tensor
    log_weights: Tensor
    recall_ids: Tensor
    recall: RecallTable | None = None
    tail_keys: Tensor | None = None
    tail_values: Tensor | None = None
    tail_positions: Tensor | None = None
    tail_len: int = 0
    distant: Tensor | None = None
    distant_from: tuple[int, ...] | None = None

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_heads(
        cls,
        keys: list[Tensor],
        values: list[Tensor],
        positions: list[Tensor],
        log_weights: list[Tensor] | None = None,
        recall_ids: list[Tensor] | None = None,
        recall: RecallTable | None = None,
        distant: list[Tensor] | None = None,
        distant_from: Sequence[int] | None = None,
    ) -> "LayerCache":
        """Build from per-head lists: values[h] is [n_h, d]; keys[h] is [n_h, d], or, with
        `distant` ([n_h] bool per head), the keys of the rows not marked distant only."""
        lens = torch.tensor([v.shape[0] for v in values], dtype=torch.long)
        offsets = torch.zeros(len(keys) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        device = keys[0].device
        R = int(offsets[-1])
        lw = torch.cat(log_weights) if log_weights is not None else torch.zeros(R, dtype=torch.float32, device=device)
        rid = torch.cat(recall_ids) if recall_ids is not None else torch.full((R,), NO_RECALL, dtype=torch.long, device=device)
        return cls(
            keys=torch.cat(keys).contiguous(),
            values=torch.cat(values).contiguous(),
            head_offsets=offsets.to(device),
            positions=torch.cat(positions).to(torch.long),
            log_weights=lw.to(torch.float32),
            recall_ids=rid.to(torch.long),
            recall=recall,
        )._with_distant(torch.cat(distant) if distant is not None else None, distant_from)

    def _with_distant(self, distant: Tensor | None, distant_from: Sequence[int] | None) -> "LayerCache":
        """Attach (checked) PoD rows; a layer with no distant row is an ordinary one."""
        if distant is None or not bool(distant.any()):
            if self.keys.shape[0] != self.values.shape[0]:
                raise ValueError(f"{self.keys.shape[0]} key rows for {self.values.shape[0]} rows and no distant rows")
            self.distant, self.distant_from = None, None
            return self
        H = self.num_heads
        if distant.shape != (self.values.shape[0],) or distant.dtype != torch.bool:
            raise ValueError(f"distant must be [{self.values.shape[0]}] bool, got {tuple(distant.shape)} {distant.dtype}")
        if distant_from is None or len(distant_from) != H:
            raise ValueError(f"distant_from must name a layer (or -1) for each of the {H} heads")
        self.distant, self.distant_from = distant, tuple(int(b) for b in distant_from)
        if self.keys.shape[0] != self.values.shape[0] - int(distant.sum()):
            raise ValueError(f"{self.keys.shape[0]} key rows, expected {self.values.shape[0] - int(distant.sum())} "
                             "(one per row that is not distant)")
        counts = self.head_lengths() - self.key_lengths()
        if any(int(c) and b < 0 for c, b in zip(counts, self.distant_from, strict=True)):
            raise ValueError(f"a head with distant rows has no base layer: distant_from={self.distant_from}")
        return self

    @classmethod
    def from_dense(cls, keys: Tensor, values: Tensor, positions: Tensor) -> "LayerCache":
        """keys/values: [Hkv, S, d]; positions: [S]. Every head keeps every row."""
        H = keys.shape[0]
        return cls.from_heads(list(keys), list(values), [positions] * H)

    # ---- shape facts --------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.head_offsets.numel() - 1

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    def head_lengths(self) -> Tensor:
        """[Hkv] rows held per head (ragged part only)."""
        return (self.head_offsets[1:] - self.head_offsets[:-1]).cpu()

    def key_offsets(self) -> Tensor:
        """[Hkv + 1] where each head's own keys start in `keys` (head_offsets without distant rows)."""
        if self.distant is None:
            return self.head_offsets
        cached = getattr(self, "_key_offsets", None)
        if cached is None or cached[0] is not self.distant or cached[1] is not self.head_offsets:
            before = torch.zeros(self.distant.numel() + 1, dtype=torch.long, device=self.distant.device)
            before[1:] = torch.cumsum(self.distant.long(), 0)  # distant rows before each row
            cached = (self.distant, self.head_offsets, self.head_offsets - before[self.head_offsets])
            self._key_offsets = cached  # cached: a device sync
        return cached[2]

    def key_lengths(self) -> Tensor:
        """[Hkv] key rows held per head (ragged part only)."""
        k = self.key_offsets()
        return (k[1:] - k[:-1]).cpu()

    def head_distant(self, h: int) -> Tensor | None:
        """[n_h] bool distant rows of head h, or None when the head has none."""
        if self.distant is None or self.distant_from[h] < 0:
            return None
        a, b = int(self.head_offsets[h]), int(self.head_offsets[h + 1])
        return self.distant[a:b]

    def head(self, h: int) -> tuple[Tensor, Tensor, Tensor]:
        """Own keys [n_k, d], values [n_h, d], log-weights [n_h] of head h (views, no copy).

        n_k == n_h unless the head has distant rows (see `head_distant`)."""
        a, b = int(self.head_offsets[h]), int(self.head_offsets[h + 1])
        ka, kb = (a, b) if self.distant is None else (int(x) for x in self.key_offsets()[h : h + 2])
        return self.keys[ka:kb], self.values[a:b], self.log_weights[a:b]

    def tail(self) -> tuple[Tensor, Tensor] | None:
        if self.tail_len == 0:
            return None
        return self.tail_keys[:, : self.tail_len], self.tail_values[:, : self.tail_len]

    @property
    def num_rows(self) -> int:
        """Rows held over all heads, tail included."""
        return int(self.head_offsets[-1]) + self.num_heads * self.tail_len

    @property
    def num_key_rows(self) -> int:
        """Key rows held over all heads, tail included (== num_rows unless rows are distant)."""
        return int(self.keys.shape[0]) + self.num_heads * self.tail_len

    @property
    def nbytes(self) -> int:
        """Bytes of the key and value rows actually held (tail capacity not counted)."""
        return (self.num_key_rows + self.num_rows) * self.head_dim * self.keys.element_size()

    # ---- mutation -----------------------------------------------------------------
    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Append rows to every head. keys/values: [Hkv, t, d]; positions: [t]."""
        t = keys.shape[1]
        if self.tail_keys is None or self.tail_len + t > self.tail_keys.shape[1]:
            cap = max(64, 2 * (self.tail_len + t))
            H, d = self.num_heads, self.head_dim
            nk = self.keys.new_empty(H, cap, d)
            nv = self.values.new_empty(H, cap, d)
            npos = torch.empty(cap, dtype=torch.long, device=self.keys.device)
            if self.tail_len:
                nk[:, : self.tail_len] = self.tail_keys[:, : self.tail_len]
                nv[:, : self.tail_len] = self.tail_values[:, : self.tail_len]
                npos[: self.tail_len] = self.tail_positions[: self.tail_len]
            self.tail_keys, self.tail_values, self.tail_positions = nk, nv, npos
        n = self.tail_len
        self.tail_keys[:, n : n + t] = keys
        self.tail_values[:, n : n + t] = values
        self.tail_positions[n : n + t] = positions
        self.tail_len = n + t

    def _head_rows(self, h: int, recall_shift: int = 0) -> tuple[Tensor, ...]:
        """Head h's ragged rows: own keys, values, positions, log-weights, recall ids, distant mask."""
        a, b = int(self.head_offsets[h]), int(self.head_offsets[h + 1])
        k, v, lw = self.head(h)
        rid = self.recall_ids[a:b]
        if recall_shift:
            rid = torch.where(rid >= 0, rid + recall_shift, rid)
        dist = self.distant[a:b] if self.distant is not None else torch.zeros(b - a, dtype=torch.bool, device=v.device)
        return k, v, self.positions[a:b], lw, rid, dist

    def _tail_rows(self, h: int) -> tuple[Tensor, ...]:
        """Head h's decode-tail rows in the order of `_head_rows` (all keyed, weight 0, no recall)."""
        T, dev = self.tail_len, self.tail_keys.device
        return (self.tail_keys[h, :T], self.tail_values[h, :T], self.tail_positions[:T],
                torch.zeros(T, dtype=torch.float32, device=dev), torch.full((T,), NO_RECALL, dtype=torch.long, device=dev),
                torch.zeros(T, dtype=torch.bool, device=dev))

    @staticmethod
    def _from_rows(heads: list[list[tuple[Tensor, ...]]], recall, distant_from) -> "LayerCache":
        """A layer whose head h is the concatenation of the row groups heads[h]."""
        cols = [[torch.cat([g[i] for g in groups]) for groups in heads] for i in range(6)]
        return LayerCache.from_heads(*cols[:5], recall=recall, distant=cols[5], distant_from=distant_from)

    def compacted(self) -> "LayerCache":
        """A copy whose tail rows are folded into the ragged rows (for storage/extension)."""
        if self.tail_len == 0:
            return self
        heads = [[self._head_rows(h), self._tail_rows(h)] for h in range(self.num_heads)]
        return self._from_rows(heads, self.recall, self.distant_from)

    def extended(self, other: "LayerCache") -> "LayerCache":
        """Rows of `self` then rows of `other`, per head (both compacted first)."""
        return LayerCache.joined([self, other])

    @staticmethod
    def joined(parts: Sequence["LayerCache"]) -> "LayerCache":
        """Rows of every part in order, per head (each compacted first), copied once whatever the
        number of parts: a chain of n segments is joined in one pass, not folded pairwise."""
        ps = [p.compacted() for p in parts]
        a = ps[0]
        for b in ps[1:]:
            if a.num_heads != b.num_heads or a.head_dim != b.head_dim:
                raise ValueError(f"cannot extend a cache of {a.num_heads} heads x {a.head_dim} with {b.num_heads} x {b.head_dim}")
        if len(ps) == 1:
            return a
        recall, shifts = _concat_recalls([p.recall for p in ps])
        if all(p.distant is None for p in ps):  # the common case, kept free of per-row masks
            return LayerCache._joined_plain(ps, recall, shifts)
        distant_from = ps[0].distant_from
        for p in ps[1:]:
            distant_from = _merge_distant_from(distant_from, p.distant_from, a.num_heads)
        heads = [[p._head_rows(h, sh) for p, sh in zip(ps, shifts, strict=True)] for h in range(a.num_heads)]
        return LayerCache._from_rows(heads, recall, distant_from)

    @staticmethod
    def _joined_plain(ps: list["LayerCache"], recall: "RecallTable | None", shifts: list[int]) -> "LayerCache":
        H = ps[0].num_heads
        rids = [torch.where(p.recall_ids >= 0, p.recall_ids + sh, p.recall_ids) if sh else p.recall_ids
                for p, sh in zip(ps, shifts, strict=True)]
        offs = [p.head_offsets.tolist() for p in ps]  # host, once per part
        cols: list[list[Tensor]] = [[], [], [], [], []]
        for h in range(H):
            for p, r, o in zip(ps, rids, offs, strict=True):
                a, b = o[h], o[h + 1]
                for c, t in zip(cols, (p.keys, p.values, p.positions, p.log_weights, r), strict=True):
                    c.append(t[a:b])
        lens = sum((p.head_lengths() for p in ps), torch.zeros(H, dtype=torch.long))
        offsets = torch.zeros(H + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(lens, 0)
        k, v, pos, lw, rid = (torch.cat(c) for c in cols)
        return LayerCache(k, v, offsets.to(ps[0].keys.device), pos, lw, rid, recall)

    def with_row_replaced(self, head: int, row: int, keys: Tensor, values: Tensor, positions: Tensor) -> "LayerCache":
        """A copy in which ragged row `row` of `head` (a merged row) is replaced by its originals.

        keys/values: [m, d], positions: [m]. The originals are ordinary rows (log-weight 0,
        no recall id). The decode tail is kept as is, so this works mid-generation (recall).
        """
        a = int(self.head_offsets[head]) + row
        ka = int(self.key_offsets()[head]) + row
        dist = self.head_distant(head)
        if dist is not None:
            if bool(dist[row]):
                raise ValueError(f"row {row} of head {head} is a distant (key-less) row, not a merged row")
            ka -= int(dist[:row].sum())
        dev, dt = self.keys.device, self.keys.dtype
        m = keys.shape[0]
        cut = lambda t, new, at=a: torch.cat([t[:at], new, t[at + 1 :]])  # noqa: E731
        offsets = self.head_offsets.clone()
        offsets[head + 1 :] += m - 1
        return LayerCache(
            cut(self.keys, keys.to(dev, dt), ka), cut(self.values, values.to(dev, dt)), offsets,
            cut(self.positions, positions.to(dev, torch.long)),
            cut(self.log_weights, torch.zeros(m, dtype=torch.float32, device=dev)),
            cut(self.recall_ids, torch.full((m,), NO_RECALL, dtype=torch.long, device=dev)),
            self.recall, self.tail_keys, self.tail_values, self.tail_positions, self.tail_len,
            None if self.distant is None else cut(self.distant, torch.zeros(m, dtype=torch.bool, device=dev)),
            self.distant_from,
        )

    def to(self, device: torch.device | str) -> "LayerCache":
        c = self.compacted()
        return LayerCache(
            c.keys.to(device), c.values.to(device), c.head_offsets.to(device), c.positions.to(device),
            c.log_weights.to(device), c.recall_ids.to(device), c.recall.to(device) if c.recall is not None else None,
            distant=c.distant.to(device) if c.distant is not None else None, distant_from=c.distant_from,
        )

    def clone(self) -> "LayerCache":
        c = self.compacted()
        return LayerCache(
            c.keys.clone(), c.values.clone(), c.head_offsets.clone(), c.positions.clone(),
            c.log_weights.clone(), c.recall_ids.clone(), c.recall,
            distant=c.distant.clone() if c.distant is not None else None, distant_from=c.distant_from,
        )


def _merge_distant_from(a: tuple[int, ...] | None, b: tuple[int, ...] | None, H: int) -> tuple[int, ...]:
    """Per head, the base layer of either part; two different bases for one head cannot be joined."""
    a, b = a or (-1,) * H, b or (-1,) * H
    out = []
    for h, (x, y) in enumerate(zip(a, b, strict=True)):
        if x >= 0 and y >= 0 and x != y:
            raise ValueError(f"head {h} takes distant logits from layer {x} in one part and {y} in the other")
        out.append(max(x, y))
    return tuple(out)


def _concat_recalls(tables: Sequence[RecallTable | None]) -> tuple[RecallTable | None, list[int]]:
    """One recall table for joined parts, and the shift of each part's recall ids in it."""
    held = [t for t in tables if t is not None and t.num_groups > 0]
    shifts, n = [], 0
    for t in tables:
        shifts.append(n if t is not None and t.num_groups > 0 else 0)
        n += t.num_groups if t is not None and t.num_groups > 0 else 0
    if len(held) <= 1:
        return (held[0] if held else next((t for t in tables if t is not None), None)), [0] * len(tables)
    ends = [0]
    for t in held:
        ends.append(ends[-1] + int(t.offsets[-1]))
    offsets = torch.cat([held[0].offsets[:1]] + [t.offsets[1:] + e for t, e in zip(held, ends, strict=False)])
    return RecallTable(offsets, *(torch.cat([getattr(t, f) for t in held]) for f in ("positions", "heads", "keys", "values"))), shifts


@dataclass
class CompactCache:
    """Per-layer ragged caches plus the count of original tokens they cover.

    seq_len is the number of original tokens seen so far: the RoPE position of the next
    token, whatever the number of rows kept (positions continue from the original prompt).
    start is the first original position covered (0 unless this is one segment of a chain).
    """

    layers: list[LayerCache]
    seq_len: int
    start: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_tokens(self) -> int:
        """Original tokens covered by this cache."""
        return self.seq_len - self.start

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def num_rows(self) -> int:
        return sum(layer.num_rows for layer in self.layers)

    @property
    def num_key_rows(self) -> int:
        return sum(layer.num_key_rows for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache of the same tokens would hold."""
        l0 = self.layers[0]
        return self.num_layers * l0.num_heads * self.num_tokens * l0.head_dim * l0.keys.element_size() * 2

    def kept_fraction(self) -> float:
        """Key and value rows held / those of a full cache: the realised kept fraction
        (ALGORITHMS.md 0.3, K and V counted separately), equal to nbytes / full_nbytes()."""
        l0 = self.layers[0]
        full = self.num_layers * l0.num_heads * self.num_tokens
        return (self.num_key_rows + self.num_rows) / (2 * full) if full else 1.0

    def shared_bases(self) -> dict[int, int]:
        """PoD: each layer whose queries later layers need for their distant rows -> the last such layer."""
        last: dict[int, int] = {}
        for i, layer in enumerate(self.layers):
            for b in layer.distant_from or ():
                if b >= i:
                    raise ValueError(f"layer {i} takes distant logits from layer {b}, which is not an earlier layer")
                if b >= 0:
                    last[b] = i
        return last

    def advance(self, n: int) -> None:
        self.seq_len += n

    def compacted(self) -> "CompactCache":
        return CompactCache([layer.compacted() for layer in self.layers], self.seq_len, self.start, dict(self.meta))

    def extended(self, segment: "CompactCache") -> "CompactCache":
        """This cache followed by a segment that starts where this one ends."""
        if segment.start != self.seq_len:
            raise ValueError(f"segment starts at position {segment.start}, cache ends at {self.seq_len}")
        if segment.num_layers != self.num_layers:
            raise ValueError(f"segment has {segment.num_layers} layers, cache has {self.num_layers}")
        return CompactCache.concat([self, segment])

    @classmethod
    def concat(cls, segments: list["CompactCache"]) -> "CompactCache":
        """Segments of a chain, each starting where the previous ends, joined layer by layer in
        one pass (each row copied once)."""
        if not segments:
            raise ValueError("no segments to concatenate")
        if len(segments) == 1:
            return segments[0]
        for prev, seg in zip(segments, segments[1:], strict=False):
            if seg.start != prev.seq_len:
                raise ValueError(f"segment starts at position {seg.start}, cache ends at {prev.seq_len}")
            if seg.num_layers != prev.num_layers:
                raise ValueError(f"segment has {seg.num_layers} layers, cache has {prev.num_layers}")
        first = segments[0]
        layers = [LayerCache.joined(parts) for parts in zip(*(s.layers for s in segments), strict=True)]
        return CompactCache(layers, segments[-1].seq_len, first.start, dict(first.meta))

    def to(self, device: torch.device | str) -> "CompactCache":
        return CompactCache([layer.to(device) for layer in self.layers], self.seq_len, self.start, dict(self.meta))

    def clone(self) -> "CompactCache":
        return CompactCache([layer.clone() for layer in self.layers], self.seq_len, self.start, dict(self.meta))
