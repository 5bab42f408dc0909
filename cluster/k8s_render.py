"""Render the k8s/ kustomizations in Python, and generate their serveConfigV2 from `serve_config()`.

No kustomize binary is needed (none can be downloaded here): this implements the subset the
overlays use, with kustomize's meaning:

- `resources:` files and directories (a directory is another kustomization), in order;
- `patches:` with `path:` and an optional `target:`; a file holding a mapping is a strategic
  merge patch (its own kind/name pick the target), a file holding a list is a JSON 6902 patch;
- `images:` (`name` -> `newName`/`newTag`), applied to every `containers`/`initContainers`
  list at any depth, so the RayService's pod templates get it too (kustomize's image filter
  walks custom resources the same way);
- `namespace:`.

Strategic merge here merges mappings recursively, merges lists of mappings by their `name`
(containers, env, volumes, ports, volumeMounts...), honours `$patch: delete` on a list item,
and replaces every other list: what Kubernetes' own merge keys do for the fields we patch.
(For custom resources kustomize falls back to a JSON merge patch, which replaces lists: the
RayService patches here therefore never carry a list.)

`sync` writes the generated `serve-config.patch.yaml` of each kustomization that has one, from
the HEADWISE_ settings of the ConfigMap that kustomization renders: the Serve application in
the RayService is `serve_config()` of the same settings the pods run with.

    python -m cluster.k8s_render build k8s/overlays/cpu   # the rendered manifests, on stdout
    python -m cluster.k8s_render sync                     # regenerate every serve-config.patch.yaml
"""

from __future__ import annotations

import copy
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import yaml

from cluster.serve_config import serve_config
from services.settings import Settings

K8S_DIR = Path(__file__).resolve().parent.parent / "k8s"
OVERLAYS = ("cpu", "gpu")
CONFIGMAP_NAME = "headwise-config"
RAYSERVICE_NAME = "headwise"
SERVE_PATCH_FILE = "serve-config.patch.yaml"
# HEADWISE_ keys read by the engine's loader rather than by Settings.
NON_SETTINGS_KEYS = frozenset({"HEADWISE_MODEL_DIR"})
CLUSTER_SCOPED_KINDS = frozenset({"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "PriorityClass", "StorageClass"})

Doc = dict[str, Any]


class RenderError(ValueError):
    """A kustomization that cannot be rendered; the message says which file and what to change."""


def load_yaml_docs(path: Path) -> list[Doc]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def build(kustomization_dir: str | os.PathLike, skip_patches: frozenset[str] = frozenset()) -> list[Doc]:
    """The manifests a kustomization renders, in resource order (`skip_patches`: its own patch files to leave out)."""
    root = Path(kustomization_dir)
    kfile = root / "kustomization.yaml"
    if not kfile.is_file():
        raise RenderError(f"{root} has no kustomization.yaml")
    kust = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(kust) - {"apiVersion", "kind", "resources", "patches", "images", "namespace"}
    if unknown:
        raise RenderError(f"{kfile}: fields {sorted(unknown)} are not supported by this renderer; use resources, patches, images, namespace")
    docs: list[Doc] = []
    for res in kust.get("resources", []):
        p = root / res
        docs.extend(build(p) if p.is_dir() else load_yaml_docs(p))
    for patch in kust.get("patches", []):
        if patch.get("path") not in skip_patches:
            _apply_patch_entry(docs, root, patch)
    for image in kust.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    if "namespace" in kust:
        for doc in docs:
            if doc.get("kind") not in CLUSTER_SCOPED_KINDS:
                doc.setdefault("metadata", {})["namespace"] = kust["namespace"]
    return docs


def _apply_patch_entry(docs: list[Doc], root: Path, entry: Doc) -> None:
    if "path" not in entry:
        raise RenderError(f"{root}/kustomization.yaml: a patch needs `path:` (inline patches are not supported)")
    body = yaml.safe_load((root / entry["path"]).read_text())
    if isinstance(body, list):
        target = entry.get("target")
        if not target:
            raise RenderError(f"{root / entry['path']}: a JSON 6902 patch needs a `target:` in kustomization.yaml")
        for doc in _matching(docs, target, root / entry["path"]):
            apply_json6902(doc, body)
    else:
        target = entry.get("target") or {"kind": body.get("kind"), "name": body.get("metadata", {}).get("name")}
        for i, doc in enumerate(docs):
            if doc in _matching(docs, target, root / entry["path"]):
                docs[i] = strategic_merge(doc, body)


def _matching(docs: list[Doc], target: Doc, where: Path) -> list[Doc]:
    found = [d for d in docs if all(_field(d, k) == v for k, v in target.items())]
    if not found:
        raise RenderError(f"{where}: the patch target {target} matches no resource")
    return found


def _field(doc: Doc, key: str) -> Any:
    if key in ("name", "namespace"):
        return doc.get("metadata", {}).get(key)
    if key == "version":
        return doc.get("apiVersion", "").split("/")[-1]
    if key == "group":
        api = doc.get("apiVersion", "")
        return api.split("/")[0] if "/" in api else ""
    return doc.get(key)


def strategic_merge(base: Any, patch: Any) -> Any:
    """`patch` merged into a copy of `base` (the subset described in the module docstring)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = strategic_merge(out[key], value)
            else:
                out[key] = _without_directives(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and _named_list(base) and _named_list(patch):
        out = copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if item.get("$patch") == "delete":
                if at is not None:
                    del out[at]
            elif at is None:
                out.append(_without_directives(item))
            else:
                out[at] = strategic_merge(out[at], item)
        return out
    return _without_directives(patch)


def _named_list(items: list) -> bool:
    return bool(items) and all(isinstance(i, dict) and "name" in i for i in items)


def _without_directives(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_directives(v) for k, v in value.items() if not k.startswith("$patch")}
    if isinstance(value, list):
        return [_without_directives(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")]
    return copy.deepcopy(value)


def apply_json6902(doc: Doc, ops: list[Doc]) -> None:
    """RFC 6902 add / replace / remove (the ops the overlays use), in place."""
    for op in ops:
        kind = op.get("op")
        if kind not in ("add", "replace", "remove"):
            raise RenderError(f"JSON patch op {kind!r} is not supported; use add, replace or remove")
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            try:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            except (KeyError, IndexError, ValueError) as e:
                raise RenderError(f"JSON patch path {op['path']!r} does not exist in {doc.get('kind')}/{doc.get('metadata', {}).get('name')}") from e
        last = parts[-1]
        if isinstance(parent, list):
            idx = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(idx, copy.deepcopy(op["value"]))
            elif kind == "replace":
                parent[idx] = copy.deepcopy(op["value"])
            else:
                del parent[idx]
        else:
            if kind != "add" and last not in parent:
                raise RenderError(f"JSON patch {kind} of {op['path']!r}: no such field")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = copy.deepcopy(op["value"])


def _set_image(node: Any, image: Doc) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and "image" in c:
                        c["image"] = _retag(c["image"], image)
            _set_image(value, image)
    elif isinstance(node, list):
        for value in node:
            _set_image(value, image)


def _retag(ref: str, image: Doc) -> str:
    name = ref.split("@")[0]
    tag = ""
    if ":" in name.rsplit("/", 1)[-1]:
        name, tag = name.rsplit(":", 1)
    if name != image["name"]:
        return ref
    new = image.get("newName", name)
    if "digest" in image:
        return f"{new}@{image['digest']}"
    new_tag = image.get("newTag", tag)
    return f"{new}:{new_tag}" if new_tag else new


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    for d in docs:
        if d.get("kind") == kind and d.get("metadata", {}).get("name") == name:
            return d
    raise KeyError(f"no {kind}/{name} in the rendered manifests")


@contextmanager
def _no_headwise_env() -> Iterator[None]:
    # The manifests' settings are the ConfigMap's, never those of the shell that renders them.
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.upper().startswith("HEADWISE_")}
    try:
        yield
    finally:
        os.environ.update(saved)


def settings_from_configmap(configmap: Doc) -> Settings:
    """The Settings a pod gets from this ConfigMap as its environment (envFrom)."""
    data = configmap.get("data", {})
    unknown = [k for k in data if k.startswith("HEADWISE_") and k not in NON_SETTINGS_KEYS
               and k[len("HEADWISE_"):].lower() not in Settings.model_fields]
    if unknown:
        raise RenderError(f"ConfigMap {configmap['metadata']['name']}: {unknown} are not Settings fields (services/settings.py)")
    kwargs = {k[len("HEADWISE_"):].lower(): v for k, v in data.items() if k.startswith("HEADWISE_") and k not in NON_SETTINGS_KEYS}
    with _no_headwise_env():
        return Settings(**kwargs)


def serve_config_yaml(settings: Settings) -> str:
    return yaml.safe_dump(serve_config(settings), sort_keys=False, default_flow_style=False)


def serve_patch(docs_without_serve: list[Doc]) -> str:
    """The text of serve-config.patch.yaml for a kustomization that renders these docs."""
    settings = settings_from_configmap(find(docs_without_serve, "ConfigMap", CONFIGMAP_NAME))
    patch = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": RAYSERVICE_NAME},
             "spec": {"serveConfigV2": serve_config_yaml(settings)}}
    head = ("# GENERATED by `make k8s` (python -m cluster.k8s_render sync) from cluster/serve_config.py and the\n"
            f"# {CONFIGMAP_NAME} ConfigMap this kustomization renders. Do not edit: tests/k8s fail on drift.\n")
    return head + yaml.dump(patch, sort_keys=False, Dumper=_BlockDumper)


class _BlockDumper(yaml.SafeDumper):
    pass


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def kustomizations_with_serve_patch(k8s_dir: Path = K8S_DIR) -> list[Path]:
    return [k8s_dir / "base"] + [k8s_dir / "overlays" / o for o in OVERLAYS if (k8s_dir / "overlays" / o / SERVE_PATCH_FILE).exists()]


def expected_serve_patch(kdir: Path) -> str:
    """What serve-config.patch.yaml of `kdir` must hold (rendered without it, so it cannot feed itself)."""
    return serve_patch(build(kdir, skip_patches=frozenset({SERVE_PATCH_FILE})))


def sync(k8s_dir: Path = K8S_DIR) -> list[Path]:
    """Regenerate every serve-config.patch.yaml; returns the files that changed."""
    changed = []
    for kdir in kustomizations_with_serve_patch(k8s_dir):
        text = expected_serve_patch(kdir)
        target = kdir / SERVE_PATCH_FILE
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
            changed.append(target)
    return changed


def dump(docs: list[Doc]) -> str:
    return yaml.dump_all(docs, sort_keys=False, Dumper=_BlockDumper)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "build":
        sys.stdout.write(dump(build(argv[1])))
        return 0
    if len(argv) == 1 and argv[0] == "sync":
        for p in sync():
            print(f"wrote {p}")
        return 0
    if len(argv) == 2 and argv[0] == "write":
        out = Path(argv[1])
        out.mkdir(parents=True, exist_ok=True)
        for overlay in OVERLAYS:
            (out / f"{overlay}.yaml").write_text(dump(build(K8S_DIR / "overlays" / overlay)))
            print(f"wrote {out / f'{overlay}.yaml'}")
        return 0
    print(__doc__.split("\n\n")[-1], file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main(sys.argv[1:]))
