"""The layering itself, read from the imports (ast, so a lazy import inside a function counts too).

- `headwise/` (the engine) imports no Ray, gRPC or Redis: it runs without the services.
- `services/prefill` and `services/decode` take what they share from shared modules of `services/`
  (errors, handoff, policy, store, replica, ...), never from each other.
- a kvstore client takes the protocol constants from `services/kvstore/protocol.py`, not the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every module `path` imports, at any depth of its code (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                out.add(".".join([*base, node.module] if node.module else base))
            else:
                out.add(node.module)
    return out


def py_files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}"
    return files


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{p.relative_to(ROOT)} imports {m}" for p in py_files(folder) for m in sorted(imported_modules(p))
            if any(m == f or m.startswith(f + ".") for f in forbidden)]


def test_the_engine_imports_no_ray_grpc_or_redis():
    assert offenders("headwise", ("ray", "grpc", "grpc_health", "grpc_reflection", "redis", "services")) == []


@pytest.mark.parametrize("side, other", [("prefill", "decode"), ("decode", "prefill")])
def test_prefill_and_decode_share_code_only_through_shared_modules(side, other):
    assert offenders(f"services/{side}", (f"services.{other}",)) == []


def test_shared_service_modules_import_neither_side():
    shared = [p for p in py_files("services") if p.parent == ROOT / "services"]
    bad = [f"{p.name} imports {m}" for p in shared for m in imported_modules(p)
           if m.startswith(("services.prefill", "services.decode")) and p.name != "app.py"]  # app.py wires both
    assert bad == []


def test_the_kvstore_client_does_not_import_the_server():
    assert "services.kvstore.server" not in imported_modules(ROOT / "services/kvstore/client.py")


def test_the_reader_sees_lazy_and_relative_imports(tmp_path):
    """The checks would pass vacuously if the reader missed imports: it must see those inside a function."""
    (tmp_path / "pkg").mkdir()
    f = tmp_path / "pkg" / "m.py"
    f.write_text("def f():\n    import ray.serve\n    from .sib import x\n    from grpc import aio\n")
    assert imported_modules(f, tmp_path) == {"ray.serve", "pkg.sib", "grpc"}
