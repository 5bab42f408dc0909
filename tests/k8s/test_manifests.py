"""The k8s/ manifests as rendered for each overlay: schemas, references, one source of truth."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.k8s_render import K8S_DIR, build, expected_serve_patch, find, kustomizations_with_serve_patch
from tests.k8s import checks

OVERLAYS = ["cpu", "gpu"]


@functools.lru_cache(maxsize=None)
def _rendered(overlay: str) -> tuple[dict, ...]:
    return tuple(build(K8S_DIR / "overlays" / overlay))


def overlay_docs(overlay: str) -> list[dict]:
    """The overlay as kustomize renders it (rendered once per run; each caller gets its own copy)."""
    return copy.deepcopy(list(_rendered(overlay)))


def overlay_images(kdir: Path) -> set[str]:
    kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
    return {i.get("newName", i["name"]) for i in kust.get("images", [])}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, overlay_docs(request.param)


def test_overlay_renders_everything(rendered):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"RayService", "StatefulSet", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "NetworkPolicy"} <= kinds
    assert all(d["metadata"]["namespace"] == "headwise" for d in docs)


@pytest.mark.parametrize("check", ["validate_core", "validate_rayservice", "check_serve_config", "check_ray_version",
                                   "check_references", "check_selectors", "check_addresses", "check_no_inline_secrets",
                                   "check_network_policies"])
def test_overlay_passes(rendered, check):
    _, docs = rendered
    assert getattr(checks, check)(docs) == []


def test_images_are_parameters(rendered):
    overlay, docs = rendered
    assert checks.check_images(docs, overlay_images(K8S_DIR / "overlays" / overlay)) == []


def test_serve_patches_are_generated_from_serve_config():
    # `make k8s` was run after the last change to serve_config.py or a ConfigMap
    for kdir in kustomizations_with_serve_patch():
        assert (kdir / "serve-config.patch.yaml").read_text() == expected_serve_patch(kdir), f"run `make k8s` ({kdir})"


def test_gpu_overlay_asks_for_gpus():
    docs = overlay_docs("gpu")
    serve = yaml.safe_load(find(docs, "RayService", "headwise")["spec"]["serveConfigV2"])
    assert all(d["ray_actor_options"]["num_gpus"] > 0 for d in serve["applications"][0]["deployments"])
    worker = find(docs, "RayService", "headwise")["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] and worker["tolerations"]


def test_cpu_overlay_uses_no_gpu():
    text = yaml.safe_dump_all(overlay_docs("cpu"))
    assert "nvidia.com/gpu" not in text and "num_gpus" not in text


def test_redis_is_a_cache_without_persistence():
    docs = overlay_docs("cpu")
    conf = find(docs, "ConfigMap", "redis-config")["data"]["redis.conf"].splitlines()
    # Redis must never evict by itself: its LRU is across tenants (the kvstore evicts per tenant)
    assert "maxmemory-policy noeviction" in conf and 'save ""' in conf and "appendonly no" in conf
    maxmem = next(line.split()[1] for line in conf if line.startswith("maxmemory "))
    limit = find(docs, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert int(maxmem.removesuffix("mb")) < int(limit.removesuffix("Gi")) * 1024, "maxmemory must stay below the memory limit"
    quota = int(find(docs, "ConfigMap", "headwise-config")["data"]["HEADWISE_TENANT_QUOTA_BYTES"])
    assert 4 * quota * 1.25 < int(maxmem.removesuffix("mb")) << 20, "four tenants' quotas (+25%) must fit in maxmemory"


def test_redis_persistence_component_renders_and_validates(tmp_path):
    # the cpu overlay with the lines its comment says to uncomment
    root = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, root)
    kust = root / "overlays" / "cpu" / "kustomization.yaml"
    text = kust.read_text()
    assert "# components:\n#   - ../../components/redis-persistence\n" in text
    kust.write_text(text.replace("# components:\n#   - ../../components/redis-persistence\n",
                                 "components:\n  - ../../components/redis-persistence\n"))
    docs = build(root / "overlays" / "cpu")
    sts = find(docs, "StatefulSet", "redis")
    assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert "--appendonly" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    assert checks.validate_core([sts]) == []
    assert sts["metadata"]["namespace"] == "headwise"


def test_kvstore_service_is_headless_so_clients_see_every_pod():
    for overlay in OVERLAYS:
        svc = find(overlay_docs(overlay), "Service", "kvstore")
        assert svc["spec"]["clusterIP"] == "None"


def test_rendering_is_kustomize_itself():
    from cluster.k8s_render import kustomize_command

    cmd = kustomize_command()
    r = subprocess.run([*cmd, str(K8S_DIR / "overlays" / "cpu")], capture_output=True, text=True, check=True)
    assert list(yaml.safe_load_all(r.stdout)) == build(K8S_DIR / "overlays" / "cpu")
    if cmd[:1] == ["kubectl"]:  # `patches:` and components need kustomize v5 (kubectl >= 1.27)
        version = json.loads(subprocess.run(["kubectl", "version", "--client", "-o", "json"], capture_output=True,
                                            text=True, check=True).stdout)
        assert int(version["kustomizeVersion"].lstrip("v").split(".")[0]) >= 5, version


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kvstore_has_grpc_health_probes(overlay):
    from services.kvstore.protocol import LIVENESS

    kv = find(overlay_docs(overlay), "Deployment", "kvstore")["spec"]["template"]["spec"]["containers"][0]
    assert kv["readinessProbe"]["grpc"]["port"] == kv["livenessProbe"]["grpc"]["port"] == 50051
    # readiness follows Redis (the overall status); liveness and startup only need the process alive,
    # so a Redis outage takes pods out of the Service without restarting them
    assert kv["readinessProbe"]["grpc"].get("service", "") == ""
    assert kv["livenessProbe"]["grpc"]["service"] == LIVENESS
    assert kv["startupProbe"]["grpc"]["service"] == LIVENESS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_tenant_limits_parse(overlay, monkeypatch, tmp_path):
    """HEADWISE_TENANT_LIMITS is in the ConfigMap kvstore reads (envFrom) and parses into its settings;
    the kvstore reads the tenants file it mounts, and enforces each entry's quota_bytes."""
    from services.kvstore.settings import KVStoreSettings
    from services.tenancy import write_tenants_file

    docs = overlay_docs(overlay)
    kv = find(docs, "Deployment", "kvstore")["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "headwise-config"}} in kv["envFrom"]
    data = find(docs, "ConfigMap", "headwise-config")["data"]
    assert "HEADWISE_TENANT_LIMITS" in data
    assert data["HEADWISE_TENANTS_FILE"] in {m["mountPath"] + "/tenants.yaml" for m in kv["volumeMounts"]}
    for k, v in data.items():
        monkeypatch.setenv(k, v)
    tenants = write_tenants_file(tmp_path / "tenants.json", {"acme": "k"}, acme={"quota_bytes": 12345})
    monkeypatch.setenv("HEADWISE_TENANTS_FILE", str(tenants))  # the Secret's file, as mounted
    s = KVStoreSettings(redis_url="memory://")
    assert s.limits("acme").quota_bytes == 12345
    assert isinstance(s.tenant_limits, dict)
    for tenant, lim in s.tenant_limits.items():
        assert s.limits(tenant).quota_bytes == (lim.quota_bytes if lim.quota_bytes is not None else s.tenant_quota_bytes)
    default = s.limits("a-tenant-not-listed")
    assert (default.quota_bytes, default.ttl_s) == (int(data["HEADWISE_TENANT_QUOTA_BYTES"]), float(data["HEADWISE_TENANT_TTL_S"]))


def test_dockerfile():
    model_dir = find(overlay_docs("cpu"), "ConfigMap", "headwise-config")["data"]["HEADWISE_MODEL_DIR"]
    text = (checks.ROOT / "Dockerfile").read_text()
    assert checks.check_dockerfile(text, model_dir) == []
    uid = text.split("\nUSER ")[-1].split(":")[0]
    for where, tpl in checks.pod_templates(overlay_docs("cpu")):
        assert str(tpl["spec"]["securityContext"]["runAsUser"]) == uid, where


def test_dockerignore_keeps_the_context_small():
    lines = [x for x in (checks.ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "*", "the build context is a whitelist"
    for line in (checks.ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            for path in line.split()[1:-1]:
                assert f"!{path}" in lines, f".dockerignore leaves out {path}, which the Dockerfile copies"


def test_docs_name_every_secret_and_autoscaler():
    doc = (checks.ROOT / "docs" / "deploy.md").read_text()
    for secret in yaml.safe_load((K8S_DIR / "required-secrets.yaml").read_text()):
        assert secret in doc
    for phrase in ("ongoing requests", "pending", "CPU", "held_kv_bytes", "noeviction"):
        assert phrase in doc


def test_sync_regenerates_missing_serve_patches(tmp_path):
    from cluster.k8s_render import SERVE_PATCH_FILE, sync

    root = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, root)
    kdirs = kustomizations_with_serve_patch(root)
    assert [k.name for k in kdirs] == ["base", "gpu"]
    for kdir in kdirs:
        (kdir / SERVE_PATCH_FILE).unlink()
    assert sorted(sync(root)) == sorted(k / SERVE_PATCH_FILE for k in kdirs)
    for kdir in kdirs:
        assert (kdir / SERVE_PATCH_FILE).read_text() == (K8S_DIR / kdir.relative_to(root) / SERVE_PATCH_FILE).read_text()
    assert sync(root) == []
