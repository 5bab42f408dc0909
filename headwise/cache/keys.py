"""Segment keys: a stable, chained identity of a segment's cache (DESIGN.md 4).

key = blake2b(parent key, token ids, model id, the model's runtime dtype, policy and its parameters
(with the head profile's fingerprint for a policy that reads one), codec version, tenant salt, row
precision of the stored cache). Keys chain, so a conversation turn names everything before it; the
salt differs per tenant, so reuse never crosses tenants; caches stored at different precisions
("fp32", "bf16", "int8", "int4") never mix, nor those of an fp32 and a bf16 replica of one model (their
rows differ), nor those compressed under two head profiles. Never Python's hash().
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NewType, Sequence

SegmentKey = NewType("SegmentKey", str)  # 32 hex chars
ROOT = SegmentKey("0" * 32)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def segment_key(
    parent: SegmentKey | None,
    token_ids: Sequence[int],
    model_id: str,
    policy_params: dict[str, Any],
    codec_version: int,
    tenant_salt: str,
    kv_precision: str = "fp32",
    model_dtype: str = "float32",
) -> SegmentKey:
    h = hashlib.blake2b(digest_size=16, person=b"headwise-seg-v1")
    h.update((parent or ROOT).encode())
    h.update(len(token_ids).to_bytes(8, "little"))
    h.update(b"".join(int(t).to_bytes(4, "little") for t in token_ids))
    h.update(_canonical({"model": model_id, "policy": policy_params, "codec": codec_version, "salt": tenant_salt,
                         "precision": kv_precision, "dtype": model_dtype}))
    return SegmentKey(h.hexdigest())


def chain_keys(
    segments: Sequence[Sequence[int]],
    model_id: str,
    policies: Sequence[dict[str, Any]],
    codec_version: int,
    tenant_salt: str,
    kv_precision: str = "fp32",
    model_dtype: str = "float32",
) -> list[SegmentKey]:
    """Keys of a chain of segments, each naming its parent."""
    keys: list[SegmentKey] = []
    parent: SegmentKey | None = None
    for ids, params in zip(segments, policies, strict=True):
        parent = segment_key(parent, ids, model_id, params, codec_version, tenant_salt, kv_precision, model_dtype)
        keys.append(parent)
    return keys
