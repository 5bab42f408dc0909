"""Shared fixtures. Each area keeps its fixtures in its own module under tests/fixtures/
and lists it in pytest_plugins below (one line each)."""

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.redis",
    "tests.fixtures.redis_cluster",
]
