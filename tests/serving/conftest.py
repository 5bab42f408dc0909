"""Serving fixtures: the kvstore every worker test talks to (tests/fixtures/kvstore.py)."""

from __future__ import annotations

import pytest

from tests.fixtures.kvstore import LocalStore


@pytest.fixture
async def store():
    """The real kvstore server on loopback over its MemoryBackend, with fault switches."""
    s = await LocalStore.start()
    yield s
    await s.close()
