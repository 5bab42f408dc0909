"""A request's compression policy: its name and `kept` or the server's defaults (prefill and decode).

Decode checks a request's policy before it calls prefill (bad input fails before any work);
prefill resolves it again for the work itself. Both go through `resolve_policy`.
"""

from __future__ import annotations

from headwise.errors import InvalidInput
from headwise.policies import Policy, get_policy
from services.errors import invalid


def resolve_policy(name: str, kept: float, default_name: str, default_kept: float) -> Policy:
    """A Policy for a request: empty name / zero kept take the server defaults (validated at start:
    services/settings.py)."""
    name = name or default_name
    kept = float(kept) if kept else default_kept
    try:
        return get_policy(name, kept=kept)
    except InvalidInput as e:
        raise invalid(str(e)) from None
    except TypeError as e:  # a policy without a `kept` setting
        raise invalid(f"policy {name!r} rejected kept={kept}: {e}") from None
