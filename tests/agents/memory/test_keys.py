"""The key namespace and the run-id rule."""

from __future__ import annotations

import pytest

from agents.memory import key


def test_key_namespace_and_run_id_validation() -> None:
    assert key("run-1", "weights", 3) == "shoal:run-1:weights:3"
    for bad in ["", "a:b", "with space", "-lead", "x" * 129, "ü"]:
        with pytest.raises(ValueError, match="run_id"):
            key(bad)
