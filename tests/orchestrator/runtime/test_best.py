"""The best checkpoint follows the best evaluation; `shoal eval` says which checkpoint it used."""

from __future__ import annotations

import csv
import math
import types

import pytest
import torch

from orchestrator.cli.main import main as shoal
from orchestrator.config import load_config
from orchestrator.runtime import best as best_module
from orchestrator.runtime import loop as loop_module
from orchestrator.runtime.best import BestTracker
from orchestrator.runtime.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint
from orchestrator.runtime.driver import run_training

# 8 worlds x 10 steps = 80 env steps an iteration, 6 iterations, an evaluation after each.
TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "train.total_env_steps=480",
    "run.progress=false",
    "run.log_every_s=1000",
    "run.eval_every_s=0.000001",
    "run.eval_episodes=4",
    "model.hidden=16",
    "redis.enabled=false",
    "run.checkpoint_every_s=0.000001",
    "run.keep_checkpoints=100",
]


def test_tracker_keeps_the_highest_finite_value() -> None:
    tracker = BestTracker()
    stream = [-60.0, -40.0, math.nan, -50.0, -35.0, -35.0, -45.0]
    assert [tracker.improved(v) for v in stream] == [True, True, False, False, True, False, False]
    assert tracker.best == -35.0


def test_best_checkpoint_is_the_policy_of_the_best_evaluation(tmp_path, monkeypatch) -> None:
    stream = iter([-60.0, -40.0, -50.0, -35.0, -45.0, -70.0])
    seen: list[float] = []

    def synthetic(model, env, episodes, seed, greedy=False):
        seen.append(next(stream))
        per_agent = torch.zeros(episodes, env.n_agents)
        per_agent[:, 0] = seen[-1]  # the team's return, all on the first agent
        return per_agent

    monkeypatch.setattr(best_module, "agent_returns", synthetic)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_training(load_config("spread-mlp", TINY), run_dir)
    assert summary["counters"]["env_steps"] == 480 and len(seen) == 6

    best = load_checkpoint(run_dir, which="best")
    assert best["meta"]["eval_return"] == -35.0 and best["meta"]["eval_episodes"] == 4
    assert best["meta"]["counters"]["env_steps"] == 4 * 80  # the 4th evaluation's weights
    assert load_checkpoint(run_dir)["meta"]["counters"]["env_steps"] == 480  # latest is apart
    # Saving a best never prunes the step-* series (run.keep_checkpoints decides that alone).
    assert len(list_checkpoints(run_dir / "checkpoints")) == 6  # one per iteration, all kept
    # Every evaluation is a row of metrics.csv, with the best so far beside it.
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["eval_return"]) for r in rows] == seen
    assert [float(r["best_eval_return"]) for r in rows] == [-60, -40, -40, -35, -35, -35]

    # A resumed run keeps the best of the first session unless it beats it.
    stream = iter([-36.0, -20.0])
    seen.clear()
    more = load_config(str(run_dir / "config.yaml"), ["train.total_env_steps=640"])
    run_training(more, run_dir, resume=run_dir)
    assert seen == [-36.0, -20.0]
    assert load_checkpoint(run_dir, which="best")["meta"]["eval_return"] == -20.0


def test_shoal_eval_says_which_checkpoint_it_used(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("spread-mlp", TINY), run_dir)
    common = ["eval", str(run_dir), "--episodes", "2", "--env", "spread"]
    assert shoal(common) == 0
    out = capsys.readouterr().out
    assert "the best checkpoint" in out and str(run_dir / "checkpoints" / "best") in out
    assert shoal([*common, "--which", "latest"]) == 0
    assert "the latest checkpoint at 480 env steps" in capsys.readouterr().out

    bare = tmp_path / "bare"
    bare.mkdir()
    run_training(load_config("spread-mlp", [*TINY, "run.eval_every_s=null"]), bare)
    assert not (bare / "checkpoints" / "best").exists()
    assert shoal(["eval", str(bare), "--episodes", "2", "--env", "spread"]) == 0
    assert "the latest checkpoint" in capsys.readouterr().out  # no best: the latest
    with pytest.raises(FileNotFoundError, match="no best checkpoint.*--which latest"):
        resolve_checkpoint(bare, "best")
    assert shoal(["eval", str(bare), "--which", "best"]) == 2


def test_a_slow_evaluation_is_spaced_to_a_tenth_of_the_run(tmp_path, monkeypatch) -> None:
    calls: list[float] = []
    # A fake clock for the loop and the evaluation: an evaluation takes 0.3 s, every other
    # reading of the clock finds 1 ms gone.
    now = [1000.0]

    def tick() -> float:
        now[0] += 0.001
        return now[0]

    clock = types.SimpleNamespace(monotonic=tick, perf_counter=tick)
    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(best_module, "time", clock)

    def slow(model, env, episodes, seed, greedy=False):  # as a PettingZoo env stepped in a loop
        calls.append(1.0)
        now[0] += 0.3
        return torch.full((episodes, env.n_agents), -50.0 / env.n_agents)

    monkeypatch.setattr(best_module, "agent_returns", slow)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_training(load_config("spread-mlp", TINY), run_dir)
    assert summary["counters"]["iteration"] == 6
    # Asked for after every iteration, but 0.3 s of evaluation waits 3 s for the next.
    assert len(calls) == 1
