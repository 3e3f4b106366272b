"""RLlib ``MultiAgentEnv`` classes through the adapter: ``envs.make("rllib:module:Class")``."""

from __future__ import annotations

import csv

import pytest
import torch

import envs
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

RELAY = "rllib:tests.envs.toy_rllib:Relay"


def test_relay_episode_through_the_adapter() -> None:
    env = envs.make(RELAY, num_envs=4, seed=0, max_steps=5)
    assert (env.n_agents, env.obs_dim, env.action_kind, env.action_dim) == (3, 4, "discrete", 3)
    first = env.reset(seed=0)
    assert first.alive.all() and first.obs.shape == (4, 3, 4)
    right = torch.tensor([0, 1, 2]).expand(4, 3)  # every agent plays its own index
    team = torch.zeros(4)
    for t in range(1, 6):
        step = env.step(right)
        team += step.reward.sum(-1)
        if t == 2:  # a2 left: terminated for good, padding from now on
            assert step.terminated[:, 2].all() and not step.terminated[:, :2].any()
            assert not step.observation.alive[:, 2].any() and step.observation.alive[:, :2].all()
        if t < 5:
            assert not step.truncated.any()
    # The time limit is a truncation of everyone still there; the envs auto-reset.
    assert step.truncated.all() and not step.terminated[:, :2].any()
    assert step.final.obs[:, 0, 1].eq(5).all()  # the last view, step counter 5
    assert step.observation.alive.all() and step.observation.obs[:, 0, 1].eq(0).all()
    assert team.tolist() == [2 * 5 + 2] * 4  # a0 and a1 for 5 steps, a2 for 2


def test_wrong_names_say_what_to_write() -> None:
    with pytest.raises(ValueError, match="rllib:module.path:Class"):
        envs.make("rllib:tests.envs.toy_rllib")
    with pytest.raises(ValueError, match="has no 'Nope'"):
        envs.make("rllib:tests.envs.toy_rllib:Nope")
    with pytest.raises(ValueError, match="cannot import RLlib env module 'no_such_module'"):
        envs.make("rllib:no_such_module:Env")


def test_a_policy_trains_on_an_rllib_env(tmp_path) -> None:
    cfg = load_config(
        "spread-mlp",
        [
            f"env.name={RELAY}",
            "env.kwargs={max_steps: 5}",
            "env.num_envs=16",
            "train.rollout_len=10",
            "train.total_env_steps=3200",
            "model.critic=independent",
            "run.progress=false",
            "redis.enabled=false",
            "run.log_every_s=0.0001",
        ],
    )
    summary = run_training(cfg, tmp_path)
    with open(tmp_path / "metrics.csv", newline="") as fh:
        first = float(next(csv.DictReader(fh))["episode_return"])
    # Each step pays 1 per agent that plays its index: random play earns about 4 of the 12 an
    # episode offers, and 20 updates get close to all of it.
    assert first < 6 and summary["metrics"]["episode_return"] > 10
