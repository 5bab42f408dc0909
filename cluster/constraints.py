"""constraints.txt: the exact version of everything pyproject.toml needs, as this environment resolved it.

    python -m cluster.constraints > constraints.txt      # what `make constraints` runs in .venv

The bootstrap (`make venv`, so CI's `.ci/run`) and the image (Dockerfile) install with
`pip install -c constraints.txt`, so a fresh clone gets the versions the test suite passed on
instead of whatever is newest that day. The pins are the installed distributions reached from
pyproject's dependencies, its optional extras and its build requirement (setuptools), through
each distribution's own requirements (markers evaluated here, extras followed), plus pip.
torch is left out: `TORCH_SPEC` pins it (a CPU or a CUDA build); its own dependencies are in.
"""

from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"torch", "headwise"}  # torch: TORCH_SPEC; headwise: the project itself
HEADER = """\
# Exact versions of everything pyproject.toml needs (its extras and its build requirement
# included), as resolved in the environment the test suite passed in; torch is pinned by
# TORCH_SPEC instead. Used by `make venv` (so .ci/run) and the Dockerfile: pip install -c constraints.txt
# Regenerate after changing a dependency, in a .venv that passes `make test`: make constraints
"""


def roots(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """What the project asks for: dependencies, every optional extra, the build requirements, pip."""
    doc = tomllib.loads(pyproject.read_text())
    reqs = list(doc["project"]["dependencies"]) + list(doc["build-system"]["requires"]) + ["pip"]
    for extra in doc["project"].get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    env = default_environment()
    return any(req.marker.evaluate(env | {"extra": e}) for e in extras or {""})


def resolved(reqs: list[Requirement]) -> dict[str, str]:
    """{distribution name: installed version} of `reqs` and all they require, transitively."""
    pins: dict[str, str] = {}
    todo = [(r, set()) for r in reqs]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{req.name} (needed for {req}) is not installed here: "
                             "bootstrap the environment first (make venv)") from None
        if key[0] not in UNPINNED:
            pins[dist.metadata["Name"]] = dist.version
        todo += [(Requirement(r), set(req.extras)) for r in dist.requires or ()]
    return pins


def render(pins: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pins.items(), key=lambda p: p[0].lower()))


def main() -> None:
    sys.stdout.write(render(resolved(roots())))


if __name__ == "__main__":
    main()
