from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from headwise.cache.compact import NO_RECALL, CompactCache, LayerCache, RecallTable
from headwise.errors import InvalidInput
from headwise.policies.base import (
    Capture,
    CompressContext,
    LayerState,
    ModelScopedPolicy,
    check_budget,
    check_ints,
    keep_all,
    keep_top,
    keep_top_global,
    optional,
)
from headwise.policies.scoring import group_reduce, window_scores

FILLS = ("recent", "snapkv", "kvzip")
COMPENSATIONS = ("weighted", "plain", "none")


@dataclass(frozen=True)
class RazorPolicy(ModelScopedPolicy):
    """RazorAttention (ALGORITHMS.md 1): retrieval heads whole, the rest sinks + 1 compensation row + their own rows.

    [F] retrieval heads = top `induction` (0.14) of (layer, KV head) pairs by induction score
    union top `echo` (0.01) by echo score, from the model's HeadProfile (GQA: max over the
    group); `sinks` = 4; the compensation row is the mean of the dropped keys and values
    with log_weight = log(dropped count) (Eq. 5) and a recall handle to the originals.
    Deviation (budget knob): the paper's recent window max(4000, N/5) assumes 10K+ token
    inputs. Here the kept fraction is global over the model: retrieval heads keep all N
    rows, and the rows of every other head are sized from what is left, so the realised
    fraction equals `kept` (to one row). When the retrieval heads alone exceed the budget
    (kept below ~0.15), the least important ones (tail of the echo-then-induction order)
    lose their protection until each other head can hold sinks + 1 + 1.
    Deviation (default fill): the other heads keep their top rows by KVzip's reconstruction
    score + the last `window` (`fill="kvzip"`), not the paper's most recent rows
    (`fill="recent"`): at 1-2K tokens the paper's split leaves each of them ~11% of the document
    at kept 0.25, and what is lost is their content, not the head profile or the compensation
    row (docs/policies.md, "RazorAttention examined"). The KVzip fill needs the reconstruction
    pass (`capture.reconstruction`), so the service defers it as it defers `kvzip`.
    `fill="snapkv"` (window-scored rows + the last `window`) is the fill with a query-aware form.
    """

    name = "razor"
    sinks: int = 4
    induction: float = 0.14
    echo: float = 0.01
    fill: str = "kvzip"  # rows of non-retrieval heads: "kvzip" or "snapkv" (scored + last `window`), "recent" (paper)
    window: int = 32
    compensation: str = "weighted"  # "weighted": log_weight log(N_d) (Eq. 5); "plain": 0 (golden-stick deploy code); "none": no row
    # [P] with fill "kvzip": "model" ranks the other heads' rows over the whole model by KVzip's score (KVzip's
    # global ranking; each head its own count, sinks + last `window` forced); "head": every other head the same count
    scope: str = optional("head")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ints(self, sinks=self.sinks)
        for attr in ("induction", "echo"):
            v = getattr(self, attr)
            if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                raise InvalidInput(f"policy 'razor': {attr}={v!r} must be a fraction of heads in [0, 1]")
        check_ints(self, window=self.window)
        if self.compensation not in COMPENSATIONS:
            raise InvalidInput(f"policy 'razor': compensation={self.compensation!r}; allowed: {', '.join(COMPENSATIONS)}")
        if self.fill not in FILLS:
            raise InvalidInput(f"policy 'razor': fill={self.fill!r}; allowed: {', '.join(FILLS)}")
        if self.scope not in ("head", "model") or (self.scope == "model" and self.fill != "kvzip"):
            raise InvalidInput(f"policy 'razor': scope={self.scope!r}; allowed: head, or model with fill='kvzip'")

    @property
    def capture(self) -> Capture:
        return Capture(window=self.window if self.fill == "snapkv" else 0, reconstruction=self.fill == "kvzip")

    needs_profile = True

    def head_rows(self, S: int, ctx: CompressContext, num_kv_heads: int) -> dict[tuple[int, int], int]:
        """Rows per (layer, KV head) for a segment of S tokens: S for retrieval heads."""
        L, n = ctx.num_layers, ctx.num_layers * num_kv_heads
        if ctx.profile is None:
            raise InvalidInput("policy 'razor' needs a head profile; run `headwise profile --model PATH` "
                               "or prefill through ModelRunner.prefill_segment, which loads it")
        order = ctx.profile.check(L, num_kv_heads).retrieval_order(self.induction, self.echo)
        total = round(self.kept * n * S)
        least = self.sinks + 2  # sinks + compensation row + one recent token
        check_budget(self, total // n, least, "sinks + compensation row + 1 recent")
        while order and len(order) * S + (n - len(order)) * least > total:
            order.pop()
        retrieval = set(order)
        others = [(li, h) for li in range(L) for h in range(num_kv_heads) if (li, h) not in retrieval]
        rows = {lh: S for lh in retrieval}
        if others:
            base, extra = divmod(total - len(retrieval) * S, len(others))
            rows.update({lh: min(S, base + (j < extra)) for j, lh in enumerate(others)})
        return rows

    def kept_rows(self, S: int, sinks: int, n: int, score) -> torch.Tensor:
        """Sorted row indices a non-retrieval head keeps besides its compensation row: sinks first."""
        if score is None or n <= self.window:
            return torch.cat([torch.arange(sinks), torch.arange(S - n, S)])
        return keep_top(score[None].float(), n - self.window, sinks, self.window)[0]

    def fill_scores(self, state: LayerState, Hkv: int):
        """[Hkv, S] scores of the rows a non-retrieval head may keep besides sinks and the last `window`,
        or None for the paper's most recent rows."""
        if self.fill == "snapkv":
            return group_reduce(window_scores(state, self.window), Hkv)
        if self.fill == "kvzip":
            if state.reconstruction is None:
                raise InvalidInput("policy 'razor' with fill='kvzip' needs the reconstruction scores; prefill with "
                                   "the policy's capture")
            return state.reconstruction
        return None

    def compress_model(self, states: list[LayerState], start: int, ctx: CompressContext, S: int, L: int, H: int,
                       meta: dict) -> CompactCache:
        rows = self.head_rows(S, ctx, H)
        whole = [(li, h) for (li, h), n in rows.items() if n >= S]
        comp = int(self.compensation != "none")
        others = L * H - len(whole)
        forced = min(self.sinks + self.window, min(n for n in rows.values()) - comp)
        sinks = min(self.sinks, forced)
        scores = torch.stack([self.fill_scores(st, H) for st in states]).float().clone()  # [L, Hkv, S]
        for li, h in whole:
            scores[li, h] = float("inf")  # retrieval heads keep every row
        keep = keep_top_global(scores, sum(rows.values()) - comp * others, sinks, forced - sinks)
        layers = []
        for i, st in enumerate(states):
            keeps = [None if bool(keep[i, h].all()) else keep[i, h].nonzero().flatten() for h in range(H)]
            layers.append(self.layer_from(st, keeps, [sinks] * H))
        return CompactCache(layers, seq_len=start + S, start=start, meta=meta)

    def compress_layer(self, state: LayerState, ctx: CompressContext) -> LayerCache:
        S, Hkv = state.num_tokens, state.num_kv_heads
        if self.budget(S) >= S:
            return keep_all(state)
        rows = self.head_rows(S, ctx, Hkv)
        scores = self.fill_scores(state, Hkv)
        keeps, sink_counts = [], []
        for h in range(Hkv):
            n_h = rows[(state.layer, h)]
            sinks = min(self.sinks, n_h)
            comp = int(self.compensation != "none")  # "none": the row goes to the recent window instead
            recent = n_h - sinks - comp
            sink_counts.append(sinks)
            if n_h >= S or recent < 1:
                keeps.append(None)
                continue
            keeps.append(self.kept_rows(S, sinks, recent, None if scores is None else scores[h]).to(state.keys.device))
        return self.layer_from(state, keeps, sink_counts)

    def layer_from(self, state: LayerState, keeps: list, sink_counts: list[int]) -> LayerCache:
        """The layer from each head's kept rows (sorted indices, the first sink_counts[h] the sinks; None:
        every row): the dropped rows fold into one compensation row after the sinks."""
        S, Hkv = state.num_tokens, state.num_kv_heads
        ks, vs, ps, lws, rids = [], [], [], [], []
        rec_pos, rec_heads, rec_lens = [], [], []
        dev = state.keys.device
        comp = int(self.compensation != "none")
        for h in range(Hkv):
            k, v, pos = state.keys[h], state.values[h], state.positions
            keep, sinks = keeps[h], sink_counts[h]
            if keep is None:
                ks.append(k); vs.append(v); ps.append(pos)
                lws.append(torch.zeros(S, device=dev)); rids.append(torch.full((S,), NO_RECALL, device=dev))
                continue
            n_h = keep.numel() + comp
            if not comp:
                ks.append(k[keep]); vs.append(v[keep]); ps.append(pos[keep])
                lws.append(torch.zeros(n_h, device=dev)); rids.append(torch.full((n_h,), NO_RECALL, device=dev))
                continue
            mask = torch.ones(S, dtype=torch.bool, device=dev)
            mask[keep] = False
            drop = mask.nonzero().flatten()  # folded into one compensation row
            m = drop.numel()
            tail = keep[sinks:]
            ks.append(torch.cat([k[:sinks], k[drop].mean(0, keepdim=True), k[tail]]))
            vs.append(torch.cat([v[:sinks], v[drop].mean(0, keepdim=True), v[tail]]))
            ps.append(torch.cat([pos[:sinks], pos.new_full((1,), -1), pos[tail]]))
            lw = torch.zeros(n_h, device=dev)
            lw[sinks] = math.log(m) if self.compensation == "weighted" else 0.0
            rid = torch.full((n_h,), NO_RECALL, dtype=torch.long, device=dev)
            rid[sinks] = len(rec_heads)
            lws.append(lw); rids.append(rid)
            rec_pos.append(pos[drop]); rec_heads.append(h); rec_lens.append(m)
        recall = _recall_table(state, rec_pos, rec_heads, rec_lens)
        return LayerCache.from_heads(ks, vs, ps, lws, [r.long() for r in rids], recall)


def _recall_table(state: LayerState, positions: list, heads: list[int], lens: list[int]) -> RecallTable | None:
    """Originals behind each compensation row, so the store can keep them for recall."""
    if not heads:
        return None
    start = int(state.positions[0])
    offsets = torch.zeros(len(lens) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor(lens), 0)
    pos = torch.cat(positions)
    idx = pos - start
    head_of_row = torch.repeat_interleave(torch.tensor(heads), torch.tensor(lens)).to(idx.device)
    return RecallTable(
        offsets.to(idx.device), pos, torch.tensor(heads, dtype=torch.long, device=idx.device),
        state.keys[head_of_row, idx], state.values[head_of_row, idx],
    )
