"""The unit tier: tests that need no Redis, no PostgreSQL, no worker processes and no
big model, and together run in under a minute (``bash scripts/test.sh tests/unit``
runs them without starting the services).

A test here that asks for a service fixture is refused at collection, so the tier
cannot start to need the services unnoticed."""

from __future__ import annotations

from pathlib import Path

import pytest

SERVICE_FIXTURES = frozenset({"redis_url", "database_url", "empty_database_url", "cluster"})
"""The fixtures of tests/conftest.py that connect to Redis or PostgreSQL."""

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not item.path.is_relative_to(HERE):
            continue
        services = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if services:
            raise pytest.UsageError(
                f"{item.nodeid} uses {', '.join(sorted(services))}: a test that needs "
                "Redis or PostgreSQL belongs outside tests/unit")
