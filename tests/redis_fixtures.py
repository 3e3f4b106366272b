"""Private redis-server fixtures; conftests import them so any test tree can share one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from orchestrator.runtime.services import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One server for the whole session; tests keep apart by using their own run ids."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of the test's own, for tests that stop or restart it."""
    with RedisServer() as server:
        yield server
