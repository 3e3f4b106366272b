"""The client fixture of the tests that talk to a real Redis."""

from __future__ import annotations

import pytest

from agents.memory import connect


@pytest.fixture
def client(redis_server):
    with connect(redis_server.url, outage_timeout=5) as c:
        yield c
