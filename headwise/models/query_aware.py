"""Query-aware prefill: the question's queries are the policy's observation window.

The regime the window-based papers (SnapKV, AdaKV, AhaKV, Task-KV, EMS, PoD + SnapKV) and
kvpress evaluate in: document and question are prefilled together with full attention, the
document's rows are scored by the attention of the question's queries, the document is
compressed, and decoding continues from the compressed document plus the question's rows,
which are kept exactly. The first token comes from the full prefill's logits, as there.

Such a cache depends on the question, so it is private to its request: never stored or
reused (the service reports `store_status` "private").

Every window-based policy runs unchanged: it sees a LayerState of the document rows only,
whose `window_queries` are the question's queries and whose `window_keys` are the question's
keys (so the window's softmax covers document + question, causal within the question, as one
prefill of both). `kept` is the fraction of the DOCUMENT's rows. A policy whose signal is
"window+kvzip" also reads KVzip's reconstruction scores of the document alone
(`document_reconstruction`: one more pass over the document, independent of the question).
Settings a policy leaves unset take this regime's defaults (`Policy.query_aware_form`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from headwise.cache.compact import CompactCache, LayerCache
from headwise.errors import InvalidInput
from headwise.policies.base import Capture, CompressContext, LayerState, Policy
from headwise.policies.full import FullPolicy


@dataclass
class QueryAwareResult:
    logits: Tensor  # [V] fp32 after the question (full-attention prefill)
    document: CompactCache  # the document's rows, compressed (positions 0..D)
    question: CompactCache  # the question's rows, exact (positions D..D+Q)
    cache: CompactCache  # document + question: what decode continues from


def supports_query_aware(policy: Policy) -> bool:
    """A policy takes the question as its window when it scores with window queries. Beside them
    it may read KVzip's reconstruction scores of the document (`signal="window+kvzip"`: the pass
    re-reads the document alone, so its scores do not depend on the question), not the hidden
    states (kvzap's scorer is trained on document prefills only)."""
    cap = policy.query_aware_form().capture
    return cap.window > 0 and not cap.hidden


def query_aware_names() -> list[str]:
    """Registered policies that support the regime with their default settings."""
    from headwise.policies import _discover

    out = []
    for name, cls in sorted(_discover().items()):
        try:
            if name != "full" and supports_query_aware(cls(kept=0.5)):
                out.append(name)
        except (InvalidInput, TypeError):
            continue
    return out


def check_query_aware(policy: Policy) -> None:
    if not supports_query_aware(policy):
        raise InvalidInput(
            f"policy {policy.name!r} does not score with an observation window, so it has no query-aware form; "
            f"query-aware policies: {', '.join(query_aware_names())}"
        )


def document_state(state: LayerState, D: int, reconstruction: Tensor | None = None) -> LayerState:
    """The document's part of a document + question LayerState, with the question as its window.

    state: keys/values [Hkv, D + Q, d], positions [D + Q], window_queries [Hq, Q, d] (the
    question's), column_sums [Hq, D + Q] or None. Returns keys/values [Hkv, D, d], positions
    [D], window_queries [Hq, Q, d], window_keys [Hkv, Q, d], column_sums [Hq, D], and the
    document's reconstruction scores [Hkv, D] when given (`document_reconstruction`).
    Column sums are rescaled by (D - j) / (D + Q - j) so that a policy dividing them by the
    number of document queries that see key j (EMS's causal-bias correction) gets the mean
    over every query that sees it, question queries included.
    """
    cs = None
    if state.column_sums is not None:
        S = state.keys.shape[1]
        j = torch.arange(D, device=state.column_sums.device, dtype=torch.float32)
        cs = state.column_sums[:, :D].float() * ((D - j) / (S - j))
    return LayerState(
        layer=state.layer, keys=state.keys[:, :D], values=state.values[:, :D], positions=state.positions[:D],
        scaling=state.scaling, window_queries=state.window_queries, column_sums=cs,
        window_keys=state.keys[:, D:], reconstruction=reconstruction,
    )


def document_reconstruction(runner, out, document_ids: Sequence[int], capture: Capture) -> list[Tensor]:
    """KVzip's reconstruction scores of the document rows of a document + question prefill `out`:
    per layer [Hkv, D]. The pass re-reads the document alone on its own rows (causal attention
    makes them the document-only prefill's rows), so the scores are the reuse regime's, whatever
    the question."""
    D = len(document_ids)
    rows = [LayerState(layer=s.layer, keys=s.keys[:, :D], values=s.values[:, :D], positions=s.positions[:D],
                       scaling=s.scaling) for s in out.states]
    return runner.reconstruction_scores(list(document_ids), None, rows, 0, capture.reconstruction_span,
                                        capture.reconstruction_precision)


def prefill_query_aware(
    runner, document_ids: Sequence[int], question_ids: Sequence[int], policy: Policy,
    ctx: CompressContext | None = None,
) -> QueryAwareResult:
    """Prefill document + question, compress the document with the question as the window.

    runner: a ModelRunner. The prompt starts at position 0 (one-shot: no cache below it).
    Returns the compressed document, the exact question rows, their concatenation and the
    first-token logits. Raises InvalidInput for a policy without a window (check_query_aware)
    or an empty document / question.
    """
    check_query_aware(policy)
    policy = policy.query_aware_form()
    D, Q = len(document_ids), len(question_ids)
    if D == 0 or Q == 0:
        raise InvalidInput("a query-aware prefill needs a non-empty document and a non-empty question")
    cap = policy.capture
    out = runner.prefill(list(document_ids) + list(question_ids), None, Capture(window=Q, column_sums=cap.column_sums))
    rec = document_reconstruction(runner, out, document_ids, cap) if cap.reconstruction else None
    return compress_prefilled(out, D, policy, ctx or runner.context(policy), rec)


def compress_prefilled(out, D: int, policy: Policy, ctx: CompressContext,
                       reconstruction: list[Tensor] | None = None) -> QueryAwareResult:
    """Compress the document rows 0..D of a document + question PrefillOutput `out` (captured with
    window = Q, the question's length, and the policy's column sums; `reconstruction`: the
    document's KVzip scores, `document_reconstruction`, for a policy whose capture asks for them).
    Several policies may compress one prefill (bench.quality does, so the comparison is paired);
    `out` is not modified."""
    S = out.states[0].num_tokens
    if out.start != 0 or not 0 < D < S or out.states[0].window_queries is None or out.states[0].window_queries.shape[1] != S - D:
        raise InvalidInput(f"a query-aware compression needs a prefill from position 0 whose window is the question "
                           f"(rows {D}..{S}); capture window={S - D}")
    policy = policy.query_aware_form()  # unset settings: the regime's defaults
    if policy.capture.reconstruction and reconstruction is None:
        raise InvalidInput(f"policy {policy.name!r} reads the document's reconstruction scores; pass "
                           "document_reconstruction(...) of this prefill")
    recs = reconstruction if reconstruction is not None else [None] * len(out.states)
    document = policy.compress([document_state(s, D, r) for s, r in zip(out.states, recs, strict=True)], 0, ctx)
    question = CompactCache(
        [LayerCache.from_dense(s.keys[:, D:], s.values[:, D:], s.positions[D:]) for s in out.states],
        seq_len=S, start=D, meta={"policy": FullPolicy().params()},
    )
    return QueryAwareResult(out.logits, document, question, document.extended(question))
