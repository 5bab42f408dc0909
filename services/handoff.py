"""What decode asks prefill, and what prefill answers: the cache handle (DESIGN.md 2, steps 3-4).

The contract between the two deployments, so it lives beside both rather than in either.

These cross Ray between deployments, so they are plain picklable dataclasses. The handle
names segments by key; the tensors stay in the KV store. The only tensors in a handle are
the first token's logits and, when the store is unreachable, the inline segments (bypass).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

# Figures.store_status values (proto/headwise/v1/generate.proto).
STORED, REUSED, PARTIAL, BYPASSED, PRIVATE = "stored", "reused", "partial", "bypassed", "private"
NOT_STORED = "not_stored"  # the store refused the cache (larger than the quota, store full): answered without it
COMPRESSING = "compressing"  # answered from the exact cache; the compressed one is being computed and stored


@dataclass(frozen=True)
class PrefillRequest:
    """One Generate request as prefill needs it (already validated and authenticated by decode)."""

    tenant: str  # tenant id (the store namespace)
    salt: str  # tenant salt, part of every segment key
    context: str
    prompt: str
    answer_prefix: str = ""
    policy: str = "streaming"
    kept: float = 0.25
    history: tuple[tuple[int, ...], ...] = ()  # earlier turns of a session: token ids after the context
    session: bool = False  # keep the question segment in the store (a later turn builds on it)
    recompute: bool = False  # the stored chain failed to load: drop it and compute again
    inline: bool = False  # hand the segments back through Ray (the store failed for decode)
    kv_precision: str = ""  # precision of the stored rows: fp32, bf16, int8, int4; "" = the server's default
    query_aware: bool = False  # one-shot: the question is the policy's window; private, the store is never used


@dataclass
class CacheHandle:
    """Where the prompt's cache is and what it cost: prefill's answer to decode."""

    keys: list[str]  # the chain to fetch, in order (the last one may be ephemeral)
    ephemeral: list[str]  # keys decode deletes once fetched (one-shot question, private context)
    segment_tokens: list[list[int]]  # token ids of each segment (a session appends the answer)
    logits: Tensor  # [V] fp32 logits after the prompt: the first token comes from these
    prompt_tokens: int
    reused_tokens: int
    full_kv_bytes: int
    held_kv_bytes: int
    realised_kept: float
    wire_bytes: int  # bytes prefill moved to and from the store
    store_status: str
    policy: str  # e.g. "streaming(kept=0.25, sinks=4)"
    prefill_s: float = 0.0
    inline_segments: list | None = None  # CompactCache per segment, only when bypassed
    kv_precision: str = "fp32"  # the precision the segments are stored at
    stored_kv_bytes: int = 0  # the chain's bytes as stored (codec + recall blobs at kv_precision)
