"""Checks over rendered manifests. Each returns a list of problems (empty = fine), so a test can
feed a deliberately broken copy and see the right problem reported."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml

from cluster.k8s_render import CONFIGMAP_NAME, find, settings_from_configmap
from cluster.serve_config import serve_config

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"  # the oldest Kubernetes the manifests target (grpc probes GA in 1.27)
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
SECRETISH = re.compile(r"TOKEN|PASSWORD|SECRET|API_?KEY|TENANTS$", re.I)
Doc = dict[str, Any]

# kubernetes-validate reads its (large) schema files on every call; they never change in a run.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents)


def name_of(doc: Doc) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def pod_templates(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    """(where, pod template) of every workload, the RayService head and worker groups included."""
    for d in docs:
        if d["kind"] in WORKLOAD_KINDS:
            yield name_of(d), d["spec"]["template"]
        elif d["kind"] == "RayService":
            rc = d["spec"].get("rayClusterConfig", {})
            yield f"{name_of(d)} head", rc.get("headGroupSpec", {}).get("template", {})
            for g in rc.get("workerGroupSpecs", []):
                yield f"{name_of(d)} group {g.get('groupName')}", g.get("template", {})


def containers(template: Doc) -> list[Doc]:
    spec = template.get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


# ---- schemas -------------------------------------------------------------------------------------

def validate_core(docs: list[Doc]) -> list[str]:
    """Core kinds against the Kubernetes OpenAPI schemas shipped by kubernetes-validate (offline, strict)."""
    problems = []
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            problems += _core(d.get("spec", {}).get("serveService"), "v1", "Service", f"{name_of(d)} serveService")
            for where, tpl in pod_templates([d]):
                problems += _core({"template": tpl, "metadata": {"name": "t"}}, "v1", "PodTemplate", where)
        else:
            problems += _core(d, d["apiVersion"], d["kind"], name_of(d))
    return problems


def _core(obj: Doc | None, api: str, kind: str, where: str) -> list[str]:
    if obj is None:
        return []
    obj = {**obj, "apiVersion": api, "kind": kind}
    obj.setdefault("metadata", {"name": "x"})
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{where}: {'.'.join(map(str, e.path))}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{where}: {e.message}"]
    return []


def validate_rayservice(docs: list[Doc], schema_path: Path = ROOT / "k8s/schemas/rayservice.ray.io_v1.schema.json") -> list[str]:
    """RayServices against the KubeRay CRD subset, plus the rules KubeRay's controller enforces."""
    schema = json.loads(schema_path.read_text())
    problems = []
    for d in (d for d in docs if d["kind"] == "RayService"):
        for e in jsonschema.Draft202012Validator(schema).iter_errors(d):
            problems.append(f"{name_of(d)}: {'.'.join(map(str, e.path))}: {e.message}")
        groups = d.get("spec", {}).get("rayClusterConfig", {}).get("workerGroupSpecs", [])
        names = [g.get("groupName") for g in groups]
        if len(set(names)) != len(names):
            problems.append(f"{name_of(d)}: worker group names repeat: {names}")
        for g in groups:
            lo, n, hi = g.get("minReplicas", 0), g.get("replicas", g.get("minReplicas", 0)), g.get("maxReplicas", 0)
            if isinstance(lo, int) and isinstance(hi, int) and isinstance(n, int) and not lo <= n <= hi:
                problems.append(f"{name_of(d)} group {g.get('groupName')}: needs minReplicas <= replicas <= maxReplicas, has {lo}, {n}, {hi}")
    return problems


# ---- one source of truth ---------------------------------------------------------------------------

def check_serve_config(docs: list[Doc]) -> list[str]:
    """serveConfigV2 is serve_config() of the ConfigMap's settings; ports and capacity agree with it."""
    rs, cm = find(docs, "RayService", "headwise"), find(docs, "ConfigMap", CONFIGMAP_NAME)
    settings = settings_from_configmap(cm)
    problems = []
    got = yaml.safe_load(rs["spec"].get("serveConfigV2", "")) or {}
    if got != serve_config(settings):
        problems.append("RayService/headwise: serveConfigV2 differs from cluster/serve_config.py for the ConfigMap's settings; run `make k8s`")
    rc = rs["spec"]["rayClusterConfig"]
    ports = {p["port"]: p for p in rs["spec"].get("serveService", {}).get("spec", {}).get("ports", [])}
    for what, port in (("gRPC proxy port", settings.grpc_port), ("HTTP proxy port (OpenAI API)", settings.http_port)):
        if port not in ports or ports[port].get("targetPort") != port:
            problems.append(f"RayService/headwise: serveService does not expose the {what} {port}")
        for where, tpl in pod_templates([rs]):
            if port not in {p["containerPort"] for p in tpl["spec"]["containers"][0].get("ports", [])}:
                problems.append(f"{where}: the Ray container does not declare the {what} {port}")
    if not rc.get("enableInTreeAutoscaling"):
        problems.append("RayService/headwise: enableInTreeAutoscaling must be true (Ray adds worker pods for Serve replicas)")
    problems += _capacity(rc, settings)
    return problems


def _capacity(rc: Doc, settings) -> list[str]:
    # The Ray autoscaler can only place what its worker groups can hold at maxReplicas.
    need_cpu = settings.prefill_max_replicas * settings.prefill_num_cpus + settings.decode_max_replicas * settings.decode_num_cpus
    need_gpu = settings.prefill_max_replicas * settings.prefill_num_gpus + settings.decode_max_replicas * settings.decode_num_gpus
    have_cpu = have_gpu = 0.0
    for g in rc.get("workerGroupSpecs", []):
        limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        have_cpu += g["maxReplicas"] * _cpu(limits.get("cpu", 0))
        have_gpu += g["maxReplicas"] * float(limits.get("nvidia.com/gpu", 0))
    problems = []
    if have_cpu < need_cpu:
        problems.append(f"worker groups hold {have_cpu} CPUs at maxReplicas, Serve's max replicas need {need_cpu}")
    if have_gpu < need_gpu:
        problems.append(f"worker groups hold {have_gpu} GPUs at maxReplicas, Serve's max replicas need {need_gpu}")
    return problems


def _cpu(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def check_ray_version(docs: list[Doc], constraints: Path = ROOT / "constraints.txt") -> list[str]:
    pinned = re.search(r"^ray==(\S+)$", constraints.read_text(), re.M)
    rv = find(docs, "RayService", "headwise")["spec"]["rayClusterConfig"].get("rayVersion")
    if not pinned or pinned.group(1) != rv:
        return [f"rayVersion {rv} is not the ray the image installs ({pinned.group(1) if pinned else 'unpinned'})"]
    return []


# ---- references across files -------------------------------------------------------------------

def check_references(docs: list[Doc], required_secrets: Path = ROOT / "k8s/required-secrets.yaml") -> list[str]:
    secrets = yaml.safe_load(required_secrets.read_text())
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    problems, used_secrets = [], set()
    for where, tpl in pod_templates(docs):
        volumes = {v["name"]: v for v in tpl.get("spec", {}).get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                problems += _keys_exist(where, "ConfigMap", v["configMap"]["name"], [i["key"] for i in v["configMap"].get("items", [])], configmaps)
            if "secret" in v:
                sname = v["secret"]["secretName"]
                problems += _keys_exist(where, "Secret", sname, [i["key"] for i in v["secret"].get("items", [])], secrets)
                used_secrets |= {(sname, i["key"]) for i in v["secret"].get("items", [])}
        for c in containers(tpl):
            cw = f"{where} container {c['name']}"
            env_names = set()
            for ef in c.get("envFrom", []):
                if "configMapRef" in ef:
                    problems += _keys_exist(cw, "ConfigMap", ef["configMapRef"]["name"], [], configmaps)
                    env_names |= set(configmaps.get(ef["configMapRef"]["name"], {}))
                if "secretRef" in ef:
                    problems.append(f"{cw}: envFrom secretRef imports unknown keys; reference each key with secretKeyRef")
            for e in c.get("env", []):
                src = e.get("valueFrom", {})
                if "configMapKeyRef" in src:
                    problems += _keys_exist(cw, "ConfigMap", src["configMapKeyRef"]["name"], [src["configMapKeyRef"]["key"]], configmaps)
                if "secretKeyRef" in src:
                    ref = src["secretKeyRef"]
                    problems += _keys_exist(cw, "Secret", ref["name"], [ref["key"]], secrets)
                    used_secrets.add((ref["name"], ref["key"]))
                if "value" in e:
                    problems += [f"{cw}: env {e['name']} uses $({v}) before it is defined" for v in _vars(e["value"]) if v not in env_names]
                    if SECRETISH.search(e["name"]) and not _vars(e["value"]):
                        problems.append(f"{cw}: env {e['name']} is a literal secret; take it from a Secret (secretKeyRef)")
                env_names.add(e["name"])
            for arg in c.get("command", []) + c.get("args", []):
                problems += [f"{cw}: command/args use $({v}), which is not in the container's environment" for v in _vars(arg) if v not in env_names]
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{cw}: volumeMount {m['name']} has no volume")
            problems += _probe_ports(cw, c)
        problems += _annotation_port(where, tpl)
    for sname, keys in secrets.items():
        problems += [f"required-secrets.yaml: {sname}/{k} is listed but no manifest uses it" for k in keys if (sname, k) not in used_secrets]
    return problems


def _vars(text: str) -> list[str]:
    return re.findall(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)", str(text))


def _keys_exist(where: str, kind: str, name: str, keys: list[str], known: dict) -> list[str]:
    if name not in known:
        return [f"{where}: {kind} {name} does not exist" + (" (list it in k8s/required-secrets.yaml)" if kind == "Secret" else "")]
    return [f"{where}: {kind} {name} has no key {k}" for k in keys if k not in known[name]]


def _probe_ports(where: str, c: Doc) -> list[str]:
    names = {p.get("name") for p in c.get("ports", [])}
    numbers = {p["containerPort"] for p in c.get("ports", [])}
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if probe and handler in probe:
                port = probe[handler]["port"]
                if port not in names and port not in numbers:
                    problems.append(f"{where}: {kind} {handler} port {port} is not a port of the container")
    return problems


def _annotation_port(where: str, tpl: Doc) -> list[str]:
    ann = tpl.get("metadata", {}).get("annotations", {})
    if ann.get("prometheus.io/scrape") != "true":
        return []
    ports = {str(p["containerPort"]) for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
    return [] if ann.get("prometheus.io/port") in ports else [f"{where}: prometheus.io/port {ann.get('prometheus.io/port')} is not a container port"]


def check_selectors(docs: list[Doc]) -> list[str]:
    """Selectors match labels; Services reach a port their pods declare; HPA/PDB/StatefulSet targets exist."""
    labelled = [(w, t.get("metadata", {}).get("labels", {}), t) for w, t in pod_templates(docs)]
    problems = []

    def matching(selector: Doc) -> list[Doc]:
        return [t for _, labels, t in labelled if selector and all(labels.get(k) == v for k, v in selector.items())]

    for d in docs:
        spec, n = d.get("spec", {}), name_of(d)
        if d["kind"] in WORKLOAD_KINDS:
            sel = spec["selector"]["matchLabels"]
            labels = spec["template"]["metadata"].get("labels", {})
            if any(labels.get(k) != v for k, v in sel.items()):
                problems.append(f"{n}: selector {sel} does not match its pod labels")
        if d["kind"] == "Service":
            pods = matching(spec.get("selector", {}))
            if not pods:
                problems.append(f"{n}: selector {spec.get('selector')} matches no pods")
            for p in spec.get("ports", []):
                tp = p.get("targetPort", p["port"])
                if pods and not any(tp in (q.get("name"), q["containerPort"]) for t in pods for c in t["spec"]["containers"] for q in c.get("ports", [])):
                    problems.append(f"{n}: targetPort {tp} is not a port of the pods it selects")
        if d["kind"] == "PodDisruptionBudget" and not matching(spec["selector"]["matchLabels"]):
            problems.append(f"{n}: selector matches no pods")
        if d["kind"] == "NetworkPolicy" and spec["podSelector"] and not matching(spec["podSelector"].get("matchLabels", {})):
            problems.append(f"{n}: podSelector matches no pods")
        if d["kind"] == "HorizontalPodAutoscaler":
            ref = spec["scaleTargetRef"]
            target = next((t for t in docs if t["kind"] == ref["kind"] and t["metadata"]["name"] == ref["name"]), None)
            if target is None:
                problems.append(f"{n}: scaleTargetRef {ref['kind']}/{ref['name']} does not exist")
            elif any("cpu" not in c.get("resources", {}).get("requests", {}) for c in target["spec"]["template"]["spec"]["containers"]):
                problems.append(f"{n}: scales on CPU but {ref['name']} has containers without a CPU request")
        if d["kind"] == "StatefulSet":
            svc = next((s for s in docs if s["kind"] == "Service" and s["metadata"]["name"] == spec.get("serviceName")), None)
            if svc is None or svc["spec"].get("clusterIP") != "None":
                problems.append(f"{n}: serviceName {spec.get('serviceName')} is not a headless Service")
    return problems


def check_addresses(docs: list[Doc]) -> list[str]:
    """host:port settings (kvstore address, Redis URL) name a Service that has that port."""
    services = {d["metadata"]["name"]: {p["port"] for p in d["spec"].get("ports", [])} for d in docs if d["kind"] == "Service"}
    cm = find(docs, "ConfigMap", CONFIGMAP_NAME)["data"]
    addresses = [("HEADWISE_KVSTORE_ADDR", cm.get("HEADWISE_KVSTORE_ADDR", ""))]
    for where, tpl in pod_templates(docs):
        for c in containers(tpl):
            addresses += [(f"{where} {e['name']}", e["value"]) for e in c.get("env", []) if e["name"].endswith("_URL") and "value" in e]
    problems = []
    for what, value in addresses:
        m = re.match(r"^(?:[a-z]+://)?(?:[^@/]*@)?([a-z0-9.-]+):(\d+)", value)
        if not m or m.group(1).split(".")[0] not in services or int(m.group(2)) not in services[m.group(1).split(".")[0]]:
            problems.append(f"{what}={value!r} does not name a Service and one of its ports")
    kv_service = next((d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] ==
                       cm.get("HEADWISE_KVSTORE_ADDR", "").split(":")[0].split(".")[0]), None)
    if kv_service is not None and kv_service["spec"].get("clusterIP") != "None":
        problems.append(f"Service/{kv_service['metadata']['name']} (HEADWISE_KVSTORE_ADDR) is not headless (clusterIP: None): "
                        "its one virtual address would hold each client's connection to one kvstore pod")
    kvstore = find(docs, "Deployment", "kvstore")["spec"]["template"]["spec"]["containers"][0]
    if int(cm["HEADWISE_KVSTORE_PORT"]) not in {p["containerPort"] for p in kvstore["ports"]}:
        problems.append("HEADWISE_KVSTORE_PORT is not a container port of kvstore")
    if int(cm["HEADWISE_KVSTORE_METRICS_PORT"]) not in {p["containerPort"] for p in kvstore["ports"]}:
        problems.append("HEADWISE_KVSTORE_METRICS_PORT is not a container port of kvstore")
    return problems


# ---- security --------------------------------------------------------------------------------

def check_no_inline_secrets(docs: list[Doc]) -> list[str]:
    problems = [f"{name_of(d)}: Secrets are created in the cluster (docs/deploy.md), never kept in k8s/" for d in docs if d["kind"] == "Secret"]
    for d in docs:
        if d["kind"] == "ConfigMap":
            problems += [f"{name_of(d)}: {k} looks like a secret; take it from a Secret" for k in d.get("data", {}) if SECRETISH.search(k)]
    return problems


def check_images(docs: list[Doc], allowed_names: set[str]) -> list[str]:
    """Every image is one the kustomization's `images:` names (a registry you control), with a tag."""
    problems = []
    for where, tpl in pod_templates(docs):
        for c in containers(tpl):
            name, _, tag = c["image"].rpartition(":") if ":" in c["image"].rsplit("/", 1)[-1] else (c["image"], "", "")
            if name not in allowed_names:
                problems.append(f"{where} container {c['name']}: image {c['image']} is not set by the kustomization's images:")
            if not tag or tag == "latest":
                problems.append(f"{where} container {c['name']}: image {c['image']} needs a pinned tag")
    return problems


def check_network_policies(docs: list[Doc]) -> list[str]:
    """Default deny; Redis only from kvstore; kvstore from the Ray pods; only the client API ports open to all."""
    cm = find(docs, "ConfigMap", CONFIGMAP_NAME)["data"]
    public = {int(cm["HEADWISE_GRPC_PORT"]), int(cm["HEADWISE_HTTP_PORT"])}
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"]
    problems = []
    if not any(p["spec"]["podSelector"] == {} and "Ingress" in p["spec"].get("policyTypes", []) and not p["spec"].get("ingress") for p in pols):
        problems.append("no default-deny ingress NetworkPolicy")

    def component(selector: Doc) -> str | None:
        return selector.get("matchLabels", {}).get("app.kubernetes.io/component")

    allowed: dict[str, list[tuple[str, int | None]]] = {}
    for p in pols:
        target = component(p["spec"]["podSelector"])
        for rule in p["spec"].get("ingress", []):
            ports = [q["port"] for q in rule.get("ports", [])] or [None]
            sources = ["*"] if not rule.get("from") else [component(f.get("podSelector", {})) or "namespace" for f in rule["from"]]
            allowed.setdefault(target, []).extend((s, port) for s in sources for port in ports)
    for target, rules in allowed.items():
        for source, port in rules:
            if source == "*" and (port not in public or target != "ray"):
                problems.append(f"NetworkPolicy: {target} pods open port {port} to everyone; only the Ray pods' "
                                f"{sorted(public)} may be")
            if target == "redis" and source != "kvstore":
                problems.append(f"NetworkPolicy: redis reachable from {source}; only kvstore may reach Redis")
    if ("ray", int(cm["HEADWISE_KVSTORE_PORT"])) not in allowed.get("kvstore", []):
        problems.append("NetworkPolicy: the Ray pods (prefill/decode) cannot reach kvstore")
    if not any(s == "kvstore" for s, _ in allowed.get("redis", [])):
        problems.append("NetworkPolicy: kvstore cannot reach Redis")
    return problems


def check_dockerfile(text: str, configmap_model_dir: str) -> list[str]:
    """Multi-stage, pinned, non-root, the default model installed at build time."""
    problems = []
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S*)", text, re.M))
    if len(froms) < 2:
        problems.append("Dockerfile: not multi-stage")
    for f in froms:
        image = args.get(f.strip("${}"), f) if f.startswith("$") else f
        if not re.search(r":[0-9][\w.-]*|@sha256:", image) and image not in re.findall(r"AS\s+(\w+)", text):
            problems.append(f"Dockerfile: base image {image} is not pinned to a version")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("Dockerfile: the final stage must run as a non-root USER")
    if not re.search(r"^ARG TORCH_SPEC=torch==[0-9.]+$", text, re.M):
        problems.append("Dockerfile: torch is not pinned (ARG TORCH_SPEC=torch==X)")
    if "-c constraints.txt" not in text:
        problems.append("Dockerfile: pip install does not use constraints.txt")
    if "headwise model install" not in text or f"HEADWISE_MODEL_DIR={configmap_model_dir}" not in text:
        problems.append(f"Dockerfile: the default model is not installed at build time into {configmap_model_dir}")
    return problems


def all_problems(docs: list[Doc], images: set[str]) -> list[str]:
    return (validate_core(docs) + validate_rayservice(docs) + check_serve_config(docs) + check_ray_version(docs)
            + check_references(docs) + check_selectors(docs) + check_addresses(docs) + check_no_inline_secrets(docs)
            + check_images(docs, images) + check_network_policies(docs))
