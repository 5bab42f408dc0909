"""constraints.txt pins every package pyproject.toml needs, and this environment runs those versions."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
from packaging.utils import canonicalize_name

from cluster.constraints import ROOT, UNPINNED, render, resolved, roots

LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE.match(line)
        assert m, f"constraints.txt: {line!r} is not name==version"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = m.group(2)
    return out


def test_every_requirement_is_pinned_within_its_bounds():
    pinned = pins()
    assert not UNPINNED & set(pinned), "torch is pinned by TORCH_SPEC, headwise is the project"
    for req in roots():
        name = canonicalize_name(req.name)
        if name in UNPINNED:
            continue
        assert name in pinned, f"{req} is not in constraints.txt: run `make constraints`"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {req}: run `make constraints`"


def test_this_environment_runs_the_pinned_versions():
    """What the suite passes on is what `make venv`, CI and the image install."""
    wrong = {}
    for name, version in pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # an extra this environment was not bootstrapped with (bench's matplotlib)
        if installed != version:
            wrong[name] = f"installed {installed}, pinned {version}"
    assert not wrong, f"run `make venv` (or `make constraints` after a deliberate change): {wrong}"


def test_the_pins_are_what_the_generator_writes_for_this_environment():
    wanted = [r for r in roots() if _installed(r.name)]
    got = render(resolved(wanted)).splitlines()
    assert all(line in (ROOT / "constraints.txt").read_text().splitlines() for line in got if not line.startswith("#"))


def _installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def test_a_requirement_missing_from_the_environment_is_named():
    from packaging.requirements import Requirement

    with pytest.raises(SystemExit, match="no-such-package-here"):
        resolved([Requirement("no-such-package-here>=1")])
