"""The policy catalogue: one file per method; every Policy subclass with a `name` is listed.

`get_policy("snapkv", kept=0.25, window=32)` builds one; an unknown name or a bad setting
raises InvalidInput naming the allowed values.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from headwise.errors import InvalidInput
from headwise.policies.base import Capture, CompressContext, LayerState, Policy, ScorerPolicy

_REGISTRY: dict[str, type[Policy]] = {}


def _discover() -> dict[str, type[Policy]]:
    if not _REGISTRY:
        for mod in pkgutil.iter_modules(__path__):
            if mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")
        stack = list(Policy.__subclasses__())
        while stack:
            cls = stack.pop()
            stack.extend(cls.__subclasses__())
            if cls.__dict__.get("name"):
                _REGISTRY[cls.name] = cls
    return _REGISTRY


def policy_names() -> list[str]:
    return sorted(_discover())


def get_policy(name: str, **params: Any) -> Policy:
    reg = _discover()
    if name not in reg:
        raise InvalidInput(f"unknown policy {name!r}; allowed: {', '.join(sorted(reg))}")
    cls = reg[name]
    fields = {f for f in cls.__dataclass_fields__}
    bad = sorted(set(params) - fields)
    if bad:
        raise InvalidInput(f"policy {name!r} has no setting {', '.join(bad)}; allowed: {', '.join(sorted(fields))}")
    if name == "full":
        params.pop("kept", None)
    return cls(**params)


__all__ = ["Capture", "CompressContext", "LayerState", "Policy", "ScorerPolicy", "get_policy", "policy_names"]
