"""Shared fixtures; also turns an empty collection into a failure instead of pytest's exit 5."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.redis_fixtures"]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A suite that collected nothing must fail loudly, never pass as "no tests ran".
    if session.testscollected == 0:
        session.exitstatus = 1
