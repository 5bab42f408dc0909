"""One settings object per process (pydantic-settings, env prefix HEADWISE_).

Validated where read: a bad value stops the process at start with a message naming the setting and
what it allows (a dtype torch does not have, a default policy that is not registered, a replica range
whose minimum is above its maximum), instead of failing, or quietly doing something else, later.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class TenantLimits(BaseModel):
    """One tenant's overrides of tenant_quota_bytes / tenant_ttl_s (None = the default)."""

    model_config = {"extra": "forbid"}

    quota_bytes: int | None = Field(None, ge=0)
    ttl_s: float | None = Field(None, ge=0)


def parse_tenant_limits(v):
    """HEADWISE_TENANT_LIMITS is JSON ({"acme": {"quota_bytes": 1000000, "ttl_s": 600}}); also as a
    string given to the constructor (a ConfigMap value rendered offline), not only from the env."""
    if isinstance(v, (str, bytes)):
        try:
            v = json.loads(v or "{}")
        except ValueError as e:
            raise ValueError(f"tenant_limits must be a JSON object of tenant -> limits: {e}") from None
    return v


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HEADWISE_", env_file=None, extra="ignore")

    # model
    model_path: str = Field("", description="HF model directory; empty = the installed default model")
    device: str = "cpu"
    dtype: str = Field("float32", description="torch dtype of the weights: float32, bfloat16, float16")

    # ports and addresses
    grpc_port: int = Field(9000, description="Ray Serve gRPC proxy port (the client API: Generate)")
    http_port: int = Field(8000, description="Ray Serve HTTP port: the OpenAI-compatible API (/v1) and health")
    kvstore_addr: str = Field("127.0.0.1:50051", description="host:port of the kvstore gRPC server, or several "
                              "(h1:p,h2:p) or a name resolving to several: calls balance round-robin over them")
    kvstore_port: int = 50051
    kvstore_metrics_port: int = 0
    redis_url: str = "redis://127.0.0.1:6379/0"

    # security
    service_token: str = Field("dev-service-token", description="token services present to kvstore")
    tenants_file: str = Field("", description="YAML/JSON file of tenants: id, key hash, limits")
    tenants: str = Field("", description="tenants inline: id:key[:max_streams[:quota_bytes]],...")
    tenant_max_streams: int = Field(8, description="concurrent Generate streams per tenant, across all decode replicas")
    stream_lease_s: float = Field(30.0, description="a stream's cluster-wide slot lapses this long after its last "
                                  "renewal (renewed every third of it), so a dead replica frees its slots")
    fill_lease_s: float = Field(60.0, description="a prefill replica computing a context holds a cluster-wide lease "
                                "on it (renewed every third of this), so other replicas wait instead of computing it too")
    deferred_compression: bool = Field(True, description="a document not yet stored is answered from its exact "
                                       "cache as soon as the plain prefill is done, and a policy that needs a "
                                       "reconstruction pass (kvzip) computes and stores the compressed cache after "
                                       "that handoff; false = compress before the first answer")
    session_ttl_s: float = Field(3600.0, description="a conversation (session_id) is kept this long after its last turn")

    # store behaviour
    store_timeout_s: float = 5.0
    tenant_ttl_s: int = 86400
    tenant_quota_bytes: int = 2 * 1024**3
    tenant_limits: dict[str, TenantLimits] = Field(
        default_factory=dict, description="per-tenant overrides, JSON: {tenant: {quota_bytes, ttl_s}} (kvstore enforces)")

    # request defaults and limits
    default_policy: str = Field("kvzap", description="policy of a request that names none (a registered one)")
    default_kept: float = Field(0.25, gt=0, le=1, description="kept fraction of a request that gives 0")
    default_kv_precision: Literal["fp32", "bf16", "int8", "int4"] = Field(
        "fp32", description="precision of stored K/V rows when a request names none (Generate.kv_precision)")
    max_prompt_tokens: int = 8000
    max_new_tokens: int = 256
    recall_threshold: float = 0.2
    decode_max_batch: int = Field(32, ge=1, description="streams a decode replica steps together (continuous batching); "
                                  "1 = one stream per step, in turns")
    recall: bool = True
    torch_threads: int = Field(0, description="torch threads per prefill/decode replica; 0 = the replica's num_cpus")

    # autoscaling (Ray Serve autoscaling_config of each deployment)
    prefill_min_replicas: int = 1
    prefill_max_replicas: int = 4
    prefill_target_ongoing_requests: int = 2
    decode_min_replicas: int = 1
    decode_max_replicas: int = 4
    decode_target_ongoing_requests: int = 4
    prefill_num_cpus: float = 1.0
    decode_num_cpus: float = 1.0
    # GPUs per replica (the gpu k8s overlay sets 1); 0 leaves ray_actor_options CPU-only
    prefill_num_gpus: float = 0.0
    decode_num_gpus: float = 0.0

    _tenant_limits = field_validator("tenant_limits", mode="before")(parse_tenant_limits)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        import torch

        if not isinstance(getattr(torch, v, None), torch.dtype):
            raise ValueError(f"dtype {v!r} is not a torch dtype; use float32, bfloat16 or float16")
        return v

    @field_validator("default_policy")
    @classmethod
    def _default_policy(cls, v: str) -> str:
        from headwise.policies import policy_names

        if v not in policy_names():
            raise ValueError(f"default_policy {v!r} is not a registered policy; registered: {', '.join(policy_names())}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> "Settings":
        for side in ("prefill", "decode"):
            lo, hi = getattr(self, f"{side}_min_replicas"), getattr(self, f"{side}_max_replicas")
            if not 0 <= lo <= hi or hi < 1:
                raise ValueError(f"{side}_min_replicas={lo} and {side}_max_replicas={hi}: need 0 <= min <= max "
                                 f"and max >= 1")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
