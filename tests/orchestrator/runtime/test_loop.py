"""The training loop's schedule: reproducible rows, evaluations placed by env steps."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

# What a run measures of its machine rather than of its learning.
TIMING = {"wall_time", "env_steps_per_s", "collect_s", "update_s", "weights_fetch_s", "eval_s"}
RUN = [
    "env.num_envs=16",
    "train.rollout_len=10",
    "train.total_env_steps=960",
    "run.progress=false",
    "run.tensorboard=false",
    "redis.enabled=false",
    "run.log_every_s=1e-9",  # a row every iteration
    "run.eval_every_steps=320",
    "run.eval_episodes=8",
]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _train(tmp_path: Path, name: str, *extra: str) -> list[dict[str, str]]:
    run_dir = tmp_path / name
    run_dir.mkdir()
    run_training(load_config("spread-gnn", [*RUN, *extra]), run_dir)
    return _rows(run_dir)


def test_two_runs_with_one_seed_write_identical_rows(tmp_path) -> None:
    first, second = _train(tmp_path, "a"), _train(tmp_path, "b")
    assert len(first) == 6
    for a, b in zip(first, second, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {
            k: v for k, v in b.items() if k not in TIMING
        }
    other = _train(tmp_path, "c", "train.seed=1")
    assert [r["episode_return"] for r in other] != [r["episode_return"] for r in first]


def test_evaluations_fall_where_the_env_step_counter_passes_each_mark(tmp_path) -> None:
    rows = _train(tmp_path, "run", "run.eval_every_s=null")
    evaluated = [int(float(r["env_steps"])) for r in rows if r.get("eval_return")]
    assert evaluated == [320, 640, 960]  # 160 env steps an iteration: every second one
    falls = [float(r["eval_return_fall"]) for r in rows if r.get("eval_return")]
    returns = [float(r["eval_return"]) for r in rows if r.get("eval_return")]
    assert falls[-1] == max(max(returns[: i + 1]) - returns[i] for i in range(len(returns)))
    train_falls = [float(r["return_fall"]) for r in rows]
    assert train_falls == sorted(train_falls) and all(math.isfinite(f) for f in train_falls)


def _loop(tmp_path: Path, step, saved: list[int] | None = None):
    from orchestrator.runtime.checkpoint import fresh_counters
    from orchestrator.runtime.loop import run_loop
    from orchestrator.runtime.metrics import Metrics

    cfg = load_config("spread-mlp", ["train.total_env_steps=1000"])
    saved = [] if saved is None else saved
    counters = fresh_counters()

    def checkpoint() -> Path:
        saved.append(int(counters["env_steps"]))
        return tmp_path / f"step-{counters['env_steps']}"

    result = run_loop(cfg, counters, step, Metrics([]), checkpoint)
    return result, saved


def test_a_fatal_error_mid_run_checkpoints_what_was_learned_and_says_where(tmp_path) -> None:
    import pytest

    from orchestrator.runtime.loop import FatalRunError

    calls = [0]

    def step(lr_frac: float) -> tuple[int, dict[str, float]]:
        calls[0] += 1
        if calls[0] == 4:
            raise FatalRunError("Redis at 127.0.0.1:1 stayed unreachable for 30 s")
        return 100, {"episode_return": -50.0}

    saved: list[int] = []
    with pytest.raises(FatalRunError, match=r"unreachable.*env step 300 is saved in .*step-300"):
        _loop(tmp_path, step, saved)
    assert saved == [300]


def test_any_other_failure_keeps_the_last_good_checkpoint(tmp_path) -> None:
    import pytest

    def step(lr_frac: float) -> tuple[int, dict[str, float]]:
        raise FloatingPointError("non-finite training statistics")

    saved: list[int] = []
    with pytest.raises(FloatingPointError):
        _loop(tmp_path, step, saved)
    assert saved == []  # the state may be half-updated: nothing is written over the last good
    result, saved = _loop(tmp_path, lambda f: (100, {"episode_return": -50.0}))
    assert saved[-1] == 1000 and result.reason == "total_env_steps reached"
