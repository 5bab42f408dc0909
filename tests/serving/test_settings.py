"""Settings are validated where they are read: a bad value stops the process at start, naming the
setting and what it allows; a tenant's quota is written once (its tenants entry) and the store
enforces it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.kvstore.errors import QuotaExceeded
from services.kvstore.settings import KVStoreSettings
from services.settings import Settings
from services.tenancy import TenantRegistry, write_tenants_file
from tests.kvstore.conftest import settings as store_settings
from tests.kvstore.conftest import small_cache, start_service


@pytest.mark.parametrize("kept", [0.0, -0.1, 1.01, float("nan")])
def test_default_kept_is_in_zero_one(kept):
    with pytest.raises(ValidationError, match="default_kept"):
        Settings(default_kept=kept)


def test_default_kept_of_one_is_allowed():
    assert Settings(default_kept=1.0).default_kept == 1.0


@pytest.mark.parametrize("dtype", ["float33", "fp32", "Tensor", ""])
def test_dtype_is_a_torch_dtype(dtype):
    with pytest.raises(ValidationError, match=f"dtype {dtype!r} is not a torch dtype"):
        Settings(dtype=dtype)


def test_real_dtypes_pass():
    assert [Settings(dtype=d).dtype for d in ("float32", "bfloat16", "float16")] == ["float32", "bfloat16", "float16"]


@pytest.mark.parametrize("side", ["prefill", "decode"])
def test_min_replicas_above_max_is_refused(side):
    with pytest.raises(ValidationError, match=f"{side}_min_replicas=3 and {side}_max_replicas=2"):
        Settings(**{f"{side}_min_replicas": 3, f"{side}_max_replicas": 2})
    with pytest.raises(ValidationError, match=f"{side}_max_replicas=0"):
        Settings(**{f"{side}_min_replicas": 0, f"{side}_max_replicas": 0})
    s = Settings(**{f"{side}_min_replicas": 2, f"{side}_max_replicas": 2})
    assert getattr(s, f"{side}_min_replicas") == getattr(s, f"{side}_max_replicas") == 2


def test_decode_max_batch_is_at_least_one():
    with pytest.raises(ValidationError, match="decode_max_batch"):
        Settings(decode_max_batch=0)
    assert Settings(decode_max_batch=1).decode_max_batch == 1


def test_an_unknown_default_policy_is_an_error_not_a_fallback():
    with pytest.raises(ValidationError, match="default_policy 'kvzipp' is not a registered policy; registered: .*kvzip"):
        Settings(default_policy="kvzipp")


def test_the_environment_is_validated_too(monkeypatch):
    monkeypatch.setenv("HEADWISE_DEFAULT_KEPT", "0")
    with pytest.raises(ValidationError, match="default_kept"):
        Settings()


# ---- a tenant's quota: one home, enforced by the store ----------------------------------
def test_the_store_takes_each_tenants_quota_from_its_entry(tmp_path):
    path = write_tenants_file(tmp_path / "t.json", {"acme": "ka", "globex": "kb"}, acme={"quota_bytes": 5000})
    s = KVStoreSettings(tenants_file=str(path), tenant_quota_bytes=10**9, tenant_limits={"acme": {"ttl_s": 60}})
    assert (s.limits("acme").quota_bytes, s.limits("acme").ttl_s) == (5000, 60)
    assert s.limits("globex").quota_bytes == 10**9
    assert KVStoreSettings(tenants="acme:ka:2:7000").limits("acme").quota_bytes == 7000


def test_two_quotas_for_one_tenant_are_an_error(tmp_path):
    path = write_tenants_file(tmp_path / "t.json", {"acme": "ka"}, acme={"quota_bytes": 5000})
    with pytest.raises(ValidationError, match="tenant 'acme' has quota_bytes=5000 in its tenants entry and 6000"):
        KVStoreSettings(tenants_file=str(path), tenant_limits={"acme": {"quota_bytes": 6000}})


def test_a_negative_quota_is_refused_by_decode_and_store_alike():
    with pytest.raises(ValueError, match="quota_bytes must be >= 0"):
        KVStoreSettings(tenants="acme:ka:2:-1")
    with pytest.raises(ValueError, match="quota_bytes must be >= 0"):
        TenantRegistry.from_settings(Settings(tenants="acme:ka:2:-1"))


async def test_the_tenants_file_quota_is_enforced_on_put(tmp_path):
    seg = small_cache()
    path = write_tenants_file(tmp_path / "t.json", {"acme": "ka", "globex": "kb"}, acme={"quota_bytes": 100})
    svc = await start_service(store_settings("memory://", tenants_file=str(path)))
    try:
        with pytest.raises(QuotaExceeded, match="quota"):
            await svc.client("acme").put("doc", seg)
        assert await svc.client("globex").put("doc", seg) > 100  # no quota in its entry: the default (unlimited)
        assert (await svc.client("acme").stats())["quota_bytes"] == 100
    finally:
        await svc.close()
