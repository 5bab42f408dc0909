"""Tenancy: keys kept hashed, authentication from metadata, stream limits, per-tenant salts."""

from __future__ import annotations

import json

import pytest

from services.errors import ServiceError
from services.settings import Settings
from services.tenancy import TenantRegistry, hash_key, load_tenants_file, parse_tenants_env, write_tenants_file


@pytest.fixture
def registry(tmp_path) -> TenantRegistry:
    path = write_tenants_file(tmp_path / "t.json", {"acme": "key-a", "globex": "key-b"}, globex={"max_streams": 1})
    return TenantRegistry.from_settings(Settings(tenants_file=str(path)))


def test_file_holds_only_hashes(tmp_path):
    path = write_tenants_file(tmp_path / "t.json", {"acme": "secret-key"})
    text = path.read_text()
    assert "secret-key" not in text and hash_key("secret-key") in text
    assert load_tenants_file(path)[0]["id"] == "acme"


def test_bearer_and_header_keys(registry):
    assert registry.authenticate({"authorization": "Bearer key-a"}).id == "acme"
    assert registry.authenticate([("x-headwise-tenant-key", "key-b")]).id == "globex"
    assert registry.authenticate({"authorization": "Bearer key-a", "x-headwise-tenant": "acme"}).id == "acme"


@pytest.mark.parametrize("md", [{}, {"authorization": "Bearer nope"}, {"authorization": "Bearer key-a", "x-headwise-tenant": "globex"}])
def test_wrong_key_is_unauthenticated(registry, md):
    with pytest.raises(ServiceError) as e:
        registry.authenticate(md)
    assert e.value.code == "UNAUTHENTICATED"


def test_stream_limit(registry):
    t = registry.tenants["globex"]
    with registry.stream(t):
        with pytest.raises(ServiceError) as e:
            with registry.stream(t):
                pass
        assert e.value.code == "RESOURCE_EXHAUSTED" and "limit 1" in e.value.message
    with registry.stream(t):  # released
        assert registry.open_streams("globex") == 1
    assert registry.open_streams("globex") == 0


def test_salts_differ_per_tenant_and_are_stable(tmp_path):
    s = Settings(tenants="acme:k1,globex:k2")
    a, b = TenantRegistry.from_settings(s), TenantRegistry.from_settings(s)
    assert a.tenants["acme"].salt == b.tenants["acme"].salt != a.tenants["globex"].salt
    other = TenantRegistry.from_settings(Settings(tenants="acme:k1", service_token="another"))
    assert other.tenants["acme"].salt != a.tenants["acme"].salt


def test_env_spec_and_bad_entries(tmp_path):
    assert parse_tenants_env("a:k:3:100") == [{"id": "a", "key": "k", "max_streams": 3, "quota_bytes": 100}]
    with pytest.raises(ValueError):
        parse_tenants_env("nokey")
    with pytest.raises(ValueError, match="must match"):
        TenantRegistry.from_settings(Settings(tenants="Bad Id:k"))
    with pytest.raises(ValueError, match="no tenants"):
        TenantRegistry.from_settings(Settings())
    (tmp_path / "t.yaml").write_text("tenants:\n  - id: acme\n    key: k\n    max_streams: 2\n")
    r = TenantRegistry.from_settings(Settings(tenants_file=str(tmp_path / "t.yaml")))
    assert r.tenants["acme"].max_streams == 2
    (tmp_path / "bad.json").write_text(json.dumps({"tenants": [{"id": "acme"}]}))
    with pytest.raises(ValueError, match="key"):
        TenantRegistry.from_settings(Settings(tenants_file=str(tmp_path / "bad.json")))
