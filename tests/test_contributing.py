"""CONTRIBUTING.md's recipes, followed as written: an env and a policy (the algorithm's is
``tests/agents/test_algorithm.py``)."""

from __future__ import annotations

import csv

import envs
from envs import registry
from envs.spread import SpreadEnv
from orchestrator.config import load_config
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import run_training
from policies.actor_critic import ARCHITECTURES, Architecture
from policies.mlp import MLPActor, MLPCritic

RUN = ["env.num_envs=16", "train.rollout_len=25", "train.total_env_steps=800",
       "redis.enabled=false", "run.progress=false", "run.tensorboard=false",
       "run.eval_every_s=null"]  # fmt: skip


def _trained(tmp_path, *overrides: str) -> list[dict[str, str]]:
    """Train a few iterations; the metrics rows."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_training(load_config("spread-mlp", [*RUN, *overrides]), run_dir)
    assert summary["counters"]["env_steps"] == 800
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_an_env_registered_as_the_recipe_says_trains(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # undone after
    envs.register("my-spread", SpreadEnv)
    assert "my-spread" in envs.available()
    rows = _trained(tmp_path, "env.name=my-spread", "env.n_agents=4")
    assert float(rows[-1]["episodes"]) == 16  # 16 worlds, 25-step episodes


def test_a_policy_added_as_the_recipe_says_trains(tmp_path, monkeypatch) -> None:
    wide = Architecture(
        actor=lambda s: MLPActor(s.obs_dim, s.action_kind, s.action_dim, 4 * s.hidden, s.layers),
        critic=lambda s: MLPCritic(s.obs_dim, s.state_dim, s.centralised, s.hidden, s.layers),
        inputs=lambda s: frozenset({"obs", "state"}),
    )
    monkeypatch.setitem(ARCHITECTURES, "wide-mlp", wide)
    rows = _trained(tmp_path, "model.kind=wide-mlp", "model.hidden=8")
    assert rows and float(rows[-1]["entropy"]) > 0
    model = load_checkpoint(tmp_path / "run")["model"]
    assert {tuple(v.shape) for k, v in model.items() if k.startswith("actor.")} >= {(32, 32)}
