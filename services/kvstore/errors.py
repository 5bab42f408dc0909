"""What a kvstore call raises, by name: StoreError, and the two failures callers treat apart.

Without gRPC, so code that only catches these (the store facade, the workers, their tests) does not
depend on the transport. `code` is the call's grpc.StatusCode (anything with a `.name` does).
"""

from __future__ import annotations


class StoreError(Exception):
    """A store call that failed; `.code` is the status code, the message says why."""

    def __init__(self, code, message: str):
        self.code = code
        super().__init__(f"{getattr(code, 'name', code)}: {message}")


class StoreUnavailable(StoreError):
    """UNAVAILABLE or DEADLINE_EXCEEDED after every retry: the store is down or too slow."""


class QuotaExceeded(StoreError):
    """RESOURCE_EXHAUSTED on Put: the segment alone is larger than the tenant's whole quota, or the
    store is full (Redis at maxmemory); nothing was stored. (Within the quota a put always fits:
    the store evicts the tenant's least recently used segments.)"""
