"""benchmarks.suite names real configs: every task's preset and overrides load."""

from __future__ import annotations

import pytest

from benchmarks.suite import TASKS
from orchestrator.config import load_config


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_suite_task_is_a_valid_config(name: str) -> None:
    task = TASKS[name]
    cfg = load_config(task.preset, task.overrides)
    assert task.every <= task.budget and task.budget % task.every == 0
    assert cfg.env.name
    for algorithm, preset in task.replay_presets.items():  # replay learners train the same task
        q = load_config(preset, [*task.overrides, f"train.algorithm={algorithm}"])
        assert q.env.name == cfg.env.name and q.train.algorithm == algorithm
