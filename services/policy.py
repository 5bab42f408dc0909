"""A request's compression policy: its name and `kept` or the server's defaults (prefill and decode).

Decode checks a request's policy before it calls prefill (bad input fails before any work);
prefill resolves it again for the work itself. Both go through `resolve_policy`.
"""

from __future__ import annotations

from headwise.errors import InvalidInput
from headwise.policies import Policy, get_policy, policy_names
from services.errors import invalid


def default_policy_name(configured: str) -> str:
    """The configured default when it exists, else the best available query-agnostic one."""
    names = policy_names()
    for name in (configured, "kvzip", "razor", "streaming", "full"):
        if name in names:
            return name
    return names[0]


def resolve_policy(name: str, kept: float, default_name: str, default_kept: float) -> Policy:
    """A Policy for a request: empty name / zero kept take the server defaults."""
    name = name or default_policy_name(default_name)
    kept = float(kept) if kept else default_kept
    try:
        return get_policy(name, kept=kept)
    except InvalidInput as e:
        raise invalid(str(e)) from None
    except TypeError as e:  # a policy without a `kept` setting
        raise invalid(f"policy {name!r} rejected kept={kept}: {e}") from None
