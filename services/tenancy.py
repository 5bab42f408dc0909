"""Tenants: API keys (kept hashed), per-tenant limits, and the salt that keeps reuse inside a tenant.

Tenants come from a YAML/JSON file (`HEADWISE_TENANTS_FILE`) or from `HEADWISE_TENANTS`
("id:key[:max_streams[:quota_bytes]],..."). Keys are hashed (sha256) as soon as they are
read; a file may hold `key_sha256` instead of `key` so the plain key never sits on disk.
Decode enforces `max_streams`; the kvstore reads the same entries and enforces `quota_bytes`
(services/kvstore/settings.py: `tenant_quotas`), so a tenant's limits are written in one place.

A request presents its key as `authorization: Bearer <key>` (or `x-headwise-tenant-key`);
`x-headwise-tenant`, when present, must name the key's tenant. The tenant salt is derived
from the tenant id under the cluster's service token, so segment keys differ per tenant and
one tenant can neither read nor time another's cache (DESIGN.md 4).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from services.errors import ServiceError, exhausted

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    id: str
    key_sha256: str
    salt: str
    max_streams: int = 8  # concurrent Generate streams (the store enforces quota_bytes: tenant_quotas)


class TenantRegistry:
    """Authenticates requests and counts each tenant's open streams (per process)."""

    def __init__(self, tenants: Iterable[Tenant]):
        self.tenants = {t.id: t for t in tenants}
        self._by_hash = {t.key_sha256: t for t in self.tenants.values()}
        self._streams: dict[str, int] = {}
        self._lock = threading.Lock()

    # ---- loading ------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings) -> "TenantRegistry":
        secret = settings.service_token
        defaults = {"max_streams": settings.tenant_max_streams}
        entries = tenant_entries(settings.tenants_file, settings.tenants)
        if not entries:
            raise ValueError("no tenants configured: set HEADWISE_TENANTS_FILE or HEADWISE_TENANTS=id:key,...")
        return cls(make_tenant(e, secret, defaults) for e in entries)

    # ---- requests -----------------------------------------------------------------
    def authenticate(self, metadata: Mapping[str, str] | Iterable[tuple[str, str]]) -> Tenant:
        md = {k.lower(): v for k, v in (metadata.items() if isinstance(metadata, Mapping) else metadata)}
        key = md.get("x-headwise-tenant-key", "")
        auth = md.get("authorization", "")
        if not key and auth:
            scheme, _, rest = auth.partition(" ")
            key = rest.strip() if scheme.lower() == "bearer" else auth.strip()
        if not key:
            raise ServiceError("UNAUTHENTICATED", "no API key: send metadata 'authorization: Bearer <key>'")
        digest = hash_key(key)
        tenant = next((t for h, t in self._by_hash.items() if hmac.compare_digest(h, digest)), None)
        if tenant is None:
            raise ServiceError("UNAUTHENTICATED", "the API key is not valid for any tenant")
        claimed = md.get("x-headwise-tenant")
        if claimed and claimed != tenant.id:
            raise ServiceError("UNAUTHENTICATED", f"the API key does not belong to tenant {claimed!r}")
        return tenant

    @contextmanager
    def stream(self, tenant: Tenant) -> Iterator[None]:
        """Hold one of the tenant's concurrent-stream slots for the duration of a request."""
        with self._lock:
            n = self._streams.get(tenant.id, 0)
            if n >= tenant.max_streams:
                raise exhausted(
                    f"tenant {tenant.id!r} already has {n} open streams (limit {tenant.max_streams}); "
                    "wait for one to finish"
                )
            self._streams[tenant.id] = n + 1
        try:
            yield
        finally:
            with self._lock:
                self._streams[tenant.id] -= 1

    def open_streams(self, tenant_id: str) -> int:
        return self._streams.get(tenant_id, 0)


def tenant_salt(tenant_id: str, secret: str) -> str:
    return hmac.new(secret.encode(), f"headwise-tenant-salt:{tenant_id}".encode(), hashlib.sha256).hexdigest()[:32]


def make_tenant(entry: Mapping, secret: str, defaults: Mapping) -> Tenant:
    tid = str(entry.get("id", ""))
    if not TENANT_ID.match(tid):
        raise ValueError(f"tenant id {tid!r} must match {TENANT_ID.pattern}")
    if "key_sha256" in entry:
        digest = str(entry["key_sha256"]).lower()
    elif "key" in entry:
        digest = hash_key(str(entry["key"]))
    else:
        raise ValueError(f"tenant {tid!r} needs 'key' or 'key_sha256'")
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError(f"tenant {tid!r}: key_sha256 must be 64 hex characters")
    max_streams = int(entry.get("max_streams", defaults["max_streams"]))
    if max_streams < 1:
        raise ValueError(f"tenant {tid!r}: max_streams must be >= 1")
    tenant_quotas([entry])  # checked here too, so decode refuses the file the store would refuse
    return Tenant(tid, digest, str(entry.get("salt") or tenant_salt(tid, secret)), max_streams)


def tenant_entries(tenants_file: str, tenants: str) -> list[dict]:
    """The tenants of the tenants file, then those of HEADWISE_TENANTS, as dicts."""
    entries: list[dict] = []
    if tenants_file:
        entries += load_tenants_file(tenants_file)
    if tenants:
        entries += parse_tenants_env(tenants)
    return entries


def tenant_quotas(entries: Iterable[Mapping]) -> dict[str, int]:
    """Tenant id -> the quota_bytes its entry gives (tenants without one take the store's default)."""
    out = {}
    for e in entries:
        if e.get("quota_bytes") is None:
            continue
        quota = int(e["quota_bytes"])
        if quota < 0:
            raise ValueError(f"tenant {e.get('id')!r}: quota_bytes must be >= 0 (0 = unlimited), got {quota}")
        out[str(e.get("id", ""))] = quota
    return out


def load_tenants_file(path: str | Path) -> list[dict]:
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text)
    entries = data.get("tenants", data) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of tenants (or {{tenants: [...]}})")
    return [dict(e) for e in entries]


def parse_tenants_env(spec: str) -> list[dict]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) < 2:
            raise ValueError(f"HEADWISE_TENANTS entry {item!r}: expected id:key[:max_streams[:quota_bytes]]")
        e: dict = {"id": parts[0], "key": parts[1]}
        if len(parts) > 2 and parts[2]:
            e["max_streams"] = int(parts[2])
        if len(parts) > 3 and parts[3]:
            e["quota_bytes"] = int(parts[3])
        out.append(e)
    return out


def write_tenants_file(path: str | Path, tenants: Mapping[str, str], **limits) -> Path:
    """Write a tenants file holding only key hashes (what the local cluster does)."""
    entries = [{"id": tid, "key_sha256": hash_key(key), **limits.get(tid, {})} for tid, key in tenants.items()]
    Path(path).write_text(json.dumps({"tenants": entries}, indent=2))
    return Path(path)
