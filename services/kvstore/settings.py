"""Settings of the KV store process (pydantic-settings, env prefix HEADWISE_).

Field names match services/settings.py (kvstore_port, redis_url, service_token, tenant_ttl_s,
tenant_quota_bytes, tenants_file, ...), so the cluster's one Settings object can build this one:
`KVStoreSettings(**settings.model_dump(include=KVStoreSettings.model_fields.keys()))`.

A tenant's quota is written once, in its tenants entry (HEADWISE_TENANTS_FILE or HEADWISE_TENANTS,
the same ones decode authenticates with): read here into `tenant_limits`, which the store enforces.
`tenant_limits` (JSON) may also give a tenant's ttl_s, or a quota for a tenant whose entry has none;
two different quotas for one tenant are an error, not a choice.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.kvstore.backend import Limits
from services.settings import TenantLimits, parse_tenant_limits
from services.tenancy import tenant_entries, tenant_quotas


class KVStoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEADWISE_", env_file=None, extra="ignore")

    service_token: str = Field("dev-service-token", description="token callers present in x-headwise-service-token")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis to store in; '' or memory:// = in-process dict")
    kvstore_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = a free one)")
    kvstore_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus HTTP port (0 = a free one)")
    metrics_enabled: bool = Field(True, description="serve /metrics over HTTP")
    redis_deadline_s: float = Field(2.0, gt=0, le=60, description="a Redis call slower than this gives UNAVAILABLE")
    tenant_ttl_s: float = Field(86400, ge=0, description="seconds a segment lives after its put (0 = forever)")
    tenant_quota_bytes: int = Field(2 * 1024**3, ge=0, description="bytes a tenant may store (0 = unlimited)")
    tenant_limits: dict[str, TenantLimits] = Field(default_factory=dict, description="per-tenant overrides")
    max_segment_bytes: int = Field(4 * 1024**3, gt=0, description="largest segment one Put may carry")
    tenants_file: str = Field("", description="the tenants file (YAML/JSON): each entry's quota_bytes is enforced")
    tenants: str = Field("", description="tenants inline, id:key[:max_streams[:quota_bytes]],...")
    kvstore_put_sender: Literal["loop", "thread"] = Field(
        "loop", description="who writes a put's chunks to Redis (redis:// and unix:// URLs): the event loop itself, or a "
                            "worker thread per put while the loop receives the next chunks (no faster on 2 cores)")

    _tenant_limits = field_validator("tenant_limits", mode="before")(parse_tenant_limits)

    @field_validator("service_token")
    @classmethod
    def _token(cls, v: str) -> str:
        if not v:
            raise ValueError("service_token must not be empty: callers authenticate with it")
        return v

    @model_validator(mode="after")
    def _url(self) -> "KVStoreSettings":
        if self.redis_url not in ("", "memory://") and not self.redis_url.startswith(("redis://", "rediss://", "unix://", "rediscluster://")):
            raise ValueError(f"redis_url {self.redis_url!r} must start with redis://, rediss://, unix:// or rediscluster:// (or be memory://)")
        return self

    @model_validator(mode="after")
    def _tenant_quotas(self) -> "KVStoreSettings":
        for tenant, quota in tenant_quotas(tenant_entries(self.tenants_file, self.tenants)).items():
            given = self.tenant_limits.get(tenant, TenantLimits())
            if given.quota_bytes is not None and given.quota_bytes != quota:
                raise ValueError(f"tenant {tenant!r} has quota_bytes={quota} in its tenants entry and "
                                 f"{given.quota_bytes} in tenant_limits; give it in one place")
            self.tenant_limits[tenant] = given.model_copy(update={"quota_bytes": quota})
        return self

    def limits(self, tenant: str) -> Limits:
        o = self.tenant_limits.get(tenant)
        quota = o.quota_bytes if o is not None and o.quota_bytes is not None else self.tenant_quota_bytes
        ttl = o.ttl_s if o is not None and o.ttl_s is not None else self.tenant_ttl_s
        return Limits(quota_bytes=quota, ttl_s=ttl)
