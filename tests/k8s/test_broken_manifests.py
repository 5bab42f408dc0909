"""Deliberately broken copies of k8s/ must be rejected: the checks can fail."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cluster.k8s_render import K8S_DIR, RenderError, build
from tests.k8s import checks

IMAGES = {"headwise"}


def broken_copy(tmp_path: Path, rel: str, old: str, new: str, overlay: str = "cpu") -> list[dict]:
    """Render an overlay from a copy of k8s/ in which `old` became `new` in file `rel`."""
    root = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, root)
    f = root / rel
    text = f.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {rel}: the test no longer breaks anything"
    f.write_text(text.replace(old, new, 1))
    return build(root / "overlays" / overlay)


CASES = [
    # (file, old, new, check, words in the problem)
    ("base/kvstore.yaml", "replicas: 2", "replicas: two", "validate_core", "Deployment/kvstore"),
    ("base/kvstore.yaml", "readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", "validate_core", "Deployment/kvstore"),
    ("base/rayservice.yaml", "enableInTreeAutoscaling: true", "enableInTreeAutoScaling: true", "validate_rayservice", "enableInTreeAutoScaling"),
    ("base/rayservice.yaml", "maxReplicas: 4", "maxReplicas: \"4\"", "validate_rayservice", "maxReplicas"),
    ("base/rayservice.yaml", "- groupName: workers", "- name: workers", "validate_rayservice", "groupName"),
    ("base/rayservice.yaml", "containerPort: 10001", "containerPort: \"10001\"", "validate_core", "head"),
    ("base/configmap.yaml", 'HEADWISE_DECODE_MAX_REPLICAS: "4"', 'HEADWISE_DECODE_MAX_REPLICAS: "6"', "check_serve_config", "serveConfigV2"),
    ("base/rayservice.yaml", "maxReplicas: 4", "maxReplicas: 2", "check_serve_config", "CPUs"),
    ("base/rayservice.yaml", "targetPort: 9000", "targetPort: 9001", "check_serve_config", "gRPC proxy port"),
    ("base/rayservice.yaml", "targetPort: 8000", "targetPort: 8001", "check_serve_config", "HTTP proxy port"),
    ("base/rayservice.yaml", 'rayVersion: "2.60.0"', 'rayVersion: "2.9.0"', "check_ray_version", "rayVersion"),
    ("base/kvstore.yaml", "port: 50051\n            periodSeconds: 5", "port: 50052\n            periodSeconds: 5", "check_references", "readinessProbe"),
    ("base/kvstore.yaml", "name: headwise-service-token", "name: headwise-svc-token", "check_references", "headwise-svc-token"),
    ("base/kvstore.yaml", "key: password", "key: passwd", "check_references", "passwd"),
    ("base/kvstore.yaml", "redis://:$(REDIS_PASSWORD)@", "redis://:$(REDIS_PASWORD)@", "check_references", "REDIS_PASWORD"),
    ("base/redis.yaml", "name: redis-config", "name: redis-conf", "check_references", "redis-conf"),
    ("base/rayservice.yaml", 'prometheus.io/port: "8080"', 'prometheus.io/port: "8081"', "check_references", "prometheus.io/port"),
    ("base/kvstore.yaml", "            - name: REDIS_PASSWORD\n              valueFrom:\n                secretKeyRef:\n                  name: headwise-redis\n                  key: password\n",
     "            - name: REDIS_PASSWORD\n              value: hunter2\n", "check_references", "literal secret"),
    ("base/kvstore.yaml", "  selector:\n    app.kubernetes.io/name: headwise\n    app.kubernetes.io/component: kvstore",
     "  selector:\n    app.kubernetes.io/name: headwise\n    app.kubernetes.io/component: kv-store", "check_selectors", "Service/kvstore"),
    ("base/kvstore.yaml", "targetPort: metrics", "targetPort: prometheus", "check_selectors", "targetPort"),
    ("base/kvstore.yaml", "    name: kvstore\n  minReplicas", "    name: kv\n  minReplicas", "check_selectors", "scaleTargetRef"),
    ("base/redis.yaml", "serviceName: redis", "serviceName: redis-headless", "check_selectors", "serviceName"),
    ("base/configmap.yaml", 'HEADWISE_KVSTORE_ADDR: "kvstore:50051"', 'HEADWISE_KVSTORE_ADDR: "kvstore:50052"', "check_addresses", "HEADWISE_KVSTORE_ADDR"),
    ("base/kvstore.yaml", "@redis:6379/0", "@cache:6379/0", "check_addresses", "HEADWISE_REDIS_URL"),
    ("base/kvstore.yaml", "  clusterIP: None\n", "", "check_addresses", "not headless"),
    ("base/configmap.yaml", '  HEADWISE_DEVICE: "cpu"', '  HEADWISE_SERVICE_TOKEN: "s3cret"\n  HEADWISE_DEVICE: "cpu"', "check_no_inline_secrets", "HEADWISE_SERVICE_TOKEN"),
    ("base/networkpolicy.yaml", "              app.kubernetes.io/component: kvstore\n      ports:\n        - port: 6379",
     "              app.kubernetes.io/component: ray\n      ports:\n        - port: 6379", "check_network_policies", "redis reachable from ray"),
    ("base/networkpolicy.yaml", "    - ports:\n        - port: 9000", "    - ports:\n        - port: 8265", "check_network_policies", "open port 8265"),
    ("base/networkpolicy.yaml", "        - port: 8000\n", "        - port: 8001\n", "check_network_policies", "open port 8001"),
    ("base/networkpolicy.yaml", "  podSelector: {}\n", "  podSelector:\n    matchLabels:\n      app.kubernetes.io/component: redis\n", "check_network_policies", "default-deny"),
]


@pytest.mark.parametrize("rel,old,new,check,words", CASES, ids=[f"{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_broken_copy_is_rejected(tmp_path, rel, old, new, check, words):
    problems = getattr(checks, check)(broken_copy(tmp_path, rel, old, new))
    assert any(words in p for p in problems), problems


def test_unknown_configmap_setting_is_rejected(tmp_path):
    with pytest.raises(RenderError, match="HEADWISE_DECODE_MAX_REPLICA"):
        checks.check_serve_config(broken_copy(tmp_path, "base/configmap.yaml", "HEADWISE_DECODE_MAX_REPLICAS", "HEADWISE_DECODE_MAX_REPLICA"))


def test_a_secret_manifest_is_rejected(tmp_path):
    docs = build(K8S_DIR / "overlays" / "cpu") + [{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "headwise-redis"}, "stringData": {"password": "x"}}]
    assert any("never kept in k8s/" in p for p in checks.check_no_inline_secrets(docs))


def test_foreign_or_unpinned_image_is_rejected(tmp_path):
    docs = broken_copy(tmp_path, "overlays/cpu/kustomization.yaml", "  - name: headwise\n    newName: headwise\n    newTag: 0.1.0",
                       "  - name: headwise\n    newName: docker.io/someone/headwise\n    newTag: latest")
    problems = checks.check_images(docs, IMAGES)
    assert any("docker.io/someone/headwise" in p for p in problems) and any("pinned tag" in p for p in problems)


def test_patch_without_target_is_rejected(tmp_path):
    with pytest.raises(RenderError, match="headwise-cfg"):  # kustomize: no resource matches the patch
        broken_copy(tmp_path, "overlays/gpu/configmap.patch.yaml", "name: headwise-config", "name: headwise-cfg", "gpu")


def test_patch_file_outside_the_overlay_is_rejected(tmp_path):
    # kustomize reads a patch only from inside its kustomization: shared patches are components
    with pytest.raises(RenderError, match="is not in or below"):
        broken_copy(tmp_path, "overlays/cpu/kustomization.yaml", "# components:\n#   - ../../components/redis-persistence\n",
                    "patches:\n  - path: ../../components/redis-persistence/redis.patch.yaml\n")
