"""VMAS scenarios through the adapter: ``envs.make("vmas:<scenario>")``."""

from __future__ import annotations

import pytest
import torch

import envs
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training


def test_shapes_positions_and_the_time_limit() -> None:
    env = envs.make("vmas:navigation", num_envs=8, seed=0, n_agents=3, max_steps=5)
    assert (env.n_agents, env.action_kind) == (3, "discrete")
    first = env.reset(seed=0)
    assert first.obs.shape == (8, 3, env.obs_dim) and first.state.shape == (8, 3 * env.obs_dim)
    gen = torch.Generator().manual_seed(0)
    for t in range(1, 6):
        step = env.step(env.random_actions(gen))
        assert step.reward.shape == (8, 3) and not step.terminated.any()
        assert step.truncated.all() == (t == 5)
    # Nodes sit at the simulated agents; the final view is the world before its reset.
    agents = env.env.agents
    now = torch.stack([a.state.pos for a in agents], dim=1)
    assert torch.equal(step.observation.node_pos, now)
    assert not torch.equal(step.final.node_pos, now)


def test_only_finished_worlds_reset(monkeypatch) -> None:
    env = envs.make("vmas:navigation", num_envs=4, seed=0, n_agents=2, max_steps=50)
    env.reset(seed=0)
    real = env.env.step

    def world_1_ends(actions):
        obs, rew, terminated, truncated, info = real(actions)
        terminated = terminated.clone()
        terminated[1] = True
        return obs, rew, terminated, truncated, info

    monkeypatch.setattr(env.env, "step", world_1_ends)
    step = env.step(env.random_actions())
    assert step.terminated[1].all() and not step.terminated[[0, 2, 3]].any()
    assert not step.truncated.any()
    same = [0, 2, 3]
    assert torch.equal(step.observation.obs[same], step.final.obs[same])
    assert not torch.equal(step.observation.obs[1], step.final.obs[1])


def test_a_graph_policy_trains_on_a_vmas_scenario(tmp_path) -> None:
    cfg = load_config(
        "spread-gnn",
        [
            "env.name=vmas:navigation",
            "env.kwargs.n_agents=3",
            "env.max_cycles=10",
            "env.num_envs=32",
            "train.rollout_len=10",
            "train.total_env_steps=960",
            "model.edges=knn",
            "model.k=2",
            "model.critic_kind=gnn",
            "run.progress=false",
            "redis.enabled=false",
        ],
    )
    summary = run_training(cfg, tmp_path)
    assert summary["counters"]["env_steps"] == 960 and summary["counters"]["iteration"] == 3
    # Every world ends at the 10-step limit, so each iteration closes 32 episodes.
    assert summary["metrics"]["episodes"] == 32
    assert torch.isfinite(torch.tensor(summary["metrics"]["policy_loss"]))

    # Evaluation defaults to the env the run trained on, with its settings.
    res = evaluate(tmp_path, episodes=8)
    assert res["env"] == "vmas:navigation" and res["episodes"] == 8 and res["n_agents"] == 3
    # The graph policy acts with a bigger team: the scenario's own n_agents argument.
    assert evaluate(tmp_path, n_agents=5, episodes=8)["n_agents"] == 5
    with pytest.raises(ValueError, match=r"trained on env 'vmas:navigation'.*--env vmas:navi"):
        evaluate(tmp_path, env_name="mpe2-spread", episodes=8)


def test_continuous_actions_outside_the_box_are_clamped_not_rejected() -> None:
    env = envs.make("vmas:balance", num_envs=4, seed=0, continuous_actions=True, max_steps=5)
    assert env.action_kind == "continuous" and env.action_low < env.action_high
    env.reset(seed=0)
    wild = torch.full((4, env.n_agents, env.action_dim), 100.0)  # a Gaussian's far tail
    step = env.step(wild)
    assert torch.isfinite(step.reward).all()


def test_every_vmas_scenario_builds_and_steps() -> None:
    import vmas

    for scenario in vmas.scenarios:
        env = envs.make(f"vmas:{scenario}", num_envs=2, seed=0, max_steps=3)
        step = env.step(env.random_actions())
        assert step.reward.shape == (2, env.n_agents), scenario
        assert step.observation.obs.shape == (2, env.n_agents, env.obs_dim), scenario
