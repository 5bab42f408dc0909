"""Validate a GenerateRequest before any work: bad input is INVALID_ARGUMENT naming the allowed values."""

from __future__ import annotations

import math

from headwise.errors import InvalidInput
from headwise.models.sampling import SamplingParams
from services.errors import invalid
from services.policy import resolve_policy

MAX_STOP_STRINGS = 16
MAX_STOP_BYTES = 256
MAX_SESSION_BYTES = 128
MAX_TEXT_BYTES = 1 << 20  # a 1 MiB document is far beyond any model context here
DEFAULT_MAX_NEW_TOKENS = 64


def sampling_params(req, settings) -> SamplingParams:
    """SamplingParams of a request; zero fields take the documented defaults."""
    limit = settings.max_new_tokens
    n = req.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limit)
    if not 1 <= n <= limit:
        raise invalid(f"max_new_tokens={n} is outside the allowed range [1, {limit}]")
    for name in ("temperature", "top_p"):
        if math.isnan(getattr(req, name)):
            raise invalid(f"{name} is NaN; give a number")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise invalid(f"{len(req.stop)} stop strings given; at most {MAX_STOP_STRINGS} are allowed")
    for s in req.stop:
        if not s or len(s.encode()) > MAX_STOP_BYTES:
            raise invalid(f"stop string {s[:20]!r} must be 1 to {MAX_STOP_BYTES} bytes long")
    try:
        return SamplingParams(
            max_new_tokens=int(n), temperature=float(req.temperature), top_p=float(req.top_p) or 1.0,
            seed=int(req.seed), stop=tuple(req.stop),
        )
    except InvalidInput as e:
        raise invalid(str(e)) from None


def check_request(req, settings) -> SamplingParams:
    """Everything about a request that can be checked without the model; returns its sampling."""
    for name in ("context", "prompt", "answer_prefix"):
        if len(getattr(req, name).encode()) > MAX_TEXT_BYTES:
            raise invalid(f"{name} is over {MAX_TEXT_BYTES} bytes; the allowed prompt is at most "
                          f"{settings.max_prompt_tokens} tokens")
    if not req.prompt.strip():
        raise invalid("prompt is empty; give the question to answer")
    if len(req.session_id.encode()) > MAX_SESSION_BYTES:
        raise invalid(f"session_id is over {MAX_SESSION_BYTES} bytes")
    if math.isnan(req.kept) or not 0.0 <= req.kept <= 1.0:
        raise invalid(f"kept={req.kept} is outside the allowed range (0, 1] (0 = the server default)")
    resolve_policy(req.policy, req.kept, settings.default_policy, settings.default_kept)
    return sampling_params(req, settings)
