"""The algorithm seam: the registry, capability checks, and A2C trained through it."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agents.algorithm import ALGORITHMS, PPO, AlgorithmSpec, algorithm_spec
from orchestrator.config import ConfigError, load_config
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import preflight, run_training
from tests.agents.a2c import A2C

A2C_NAME = "tests.agents.a2c:A2C"
RUN = ["env.num_envs=64", "redis.enabled=false", "run.progress=false", "run.tensorboard=false",
       "run.eval_every_s=null", "run.log_every_s=1e-9", f"train.algorithm={A2C_NAME}"]  # fmt: skip


def test_the_registry_finds_names_and_import_paths_and_refuses_the_rest() -> None:
    assert ALGORITHMS["ppo"] is PPO and algorithm_spec("ppo") is PPO
    assert algorithm_spec(A2C_NAME) is A2C
    for name, says in [
        ("sac", r"unknown algorithm 'sac'; available: ppo"),
        ("no_such_module:X", r"cannot import algorithm module 'no_such_module'"),
        ("tests.agents.a2c:Nope", r"'tests.agents.a2c' has no 'Nope'"),
        ("tests.agents.a2c:A2CLearner", r"is a type, not an AlgorithmSpec"),
    ]:
        with pytest.raises(ConfigError, match=rf"train.algorithm: .*{says}"):
            load_config("spread-mlp", [f"train.algorithm={name}"])


def test_preflight_refuses_an_action_kind_the_algorithm_cannot_learn(monkeypatch) -> None:
    discrete_only = AlgorithmSpec("d", A2C.build, continuous=False)
    monkeypatch.setitem(ALGORITHMS, "d", discrete_only)
    preflight(load_config("spread-mlp", ["train.algorithm=d"]))  # spread's actions: discrete
    with pytest.raises(ConfigError, match=r"train.algorithm=d does not learn continuous"):
        preflight(load_config("spread-mlp", ["train.algorithm=d", "env.continuous_actions=true"]))
    asks_more = AlgorithmSpec("c", A2C.build, acting=frozenset({"q_values"}))
    monkeypatch.setitem(ALGORITHMS, "c", asks_more)
    with pytest.raises(ConfigError, match=r"acted with \['q_values'\]; shoal's rollouts give"):
        preflight(load_config("spread-mlp", ["train.algorithm=c"]))
    # A2C does not declare memory: a recurrent policy is refused before anything starts.
    with pytest.raises(ConfigError, match=r"train.algorithm=a2c does not train policies with"):
        preflight(load_config("spread-mlp", ["train.algorithm=tests.agents.a2c:A2C",
                                             "model.memory=gru"]))  # fmt: skip


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a2c_trains_spread_in_process_and_resumes(tmp_path) -> None:
    run_dir = tmp_path / "a2c"
    run_dir.mkdir()
    run_training(load_config("spread-mlp", [*RUN, "train.total_env_steps=64000"]), run_dir)
    rows = _rows(run_dir)
    assert {"a2c_policy_loss", "a2c_value_loss", "a2c_entropy"} <= set(rows[0])
    assert "approx_kl" not in rows[0]  # PPO never ran
    first = sum(float(r["episode_return"]) for r in rows[:5]) / 5
    last = sum(float(r["episode_return"]) for r in rows[-5:]) / 5
    assert last > first + 5, (first, last)  # it learns
    ckpt = load_checkpoint(run_dir)
    assert ckpt["learner"]["updates"] == 40 and ckpt["learner"]["optimizer"]["state"]

    cfg = load_config("spread-mlp", [*RUN, "train.total_env_steps=80000"])
    summary = run_training(cfg, run_dir, resume=str(run_dir))
    assert summary["counters"]["env_steps"] == 80000
    assert load_checkpoint(run_dir)["learner"]["updates"] == 50  # counted on from 40
