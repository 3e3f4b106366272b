"""The native tag env must reproduce mpe2 simple_tag_v3 episode for episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpe2 import simple_tag_v3

from envs.tag import TagEnv, tag_obs_dim


def _chase(world, rng: np.random.Generator, n_adv: int) -> np.ndarray:
    """Adversaries run at the first prey; prey dawdle or run outward: tags and the bound."""
    agents = world.agents
    prey = agents[n_adv].state.p_pos
    act = rng.integers(0, 5, size=len(agents))
    for i, a in enumerate(agents):
        d = (prey - a.state.p_pos) if i < n_adv else a.state.p_pos
        if i >= n_adv and rng.random() < 0.6:
            act[i] = 0  # a prey that waits gets caught
        elif rng.random() < 0.9:  # mostly purposeful, sometimes random
            act[i] = (2 if d[0] > 0 else 1) if abs(d[0]) > abs(d[1]) else (4 if d[1] > 0 else 3)
    return act


def _mpe2_episode(n_adv: int, n_good: int, continuous: bool, seed: int, chase: bool):
    env = simple_tag_v3.parallel_env(
        num_good=n_good, num_adversaries=n_adv, num_obstacles=2, max_cycles=25,
        continuous_actions=continuous,
    )  # fmt: skip
    obs, _ = env.reset(seed=seed)
    world = env.unwrapped.world
    agent_pos = np.stack([a.state.p_pos.copy() for a in world.agents])
    obstacle_pos = np.stack([lm.state.p_pos.copy() for lm in world.landmarks])
    rng = np.random.default_rng(seed)
    agents = env.possible_agents
    width = tag_obs_dim(n_adv, n_good, 2)

    def stacked(o: dict) -> np.ndarray:
        return np.stack([np.pad(o[a], (0, width - len(o[a]))) for a in agents])

    actions, observations, rewards = [], [stacked(obs)], []
    for _ in range(25):
        if continuous:
            act = rng.uniform(-0.2, 1.2, size=(len(agents), 5)).astype(np.float32)
        else:
            act = _chase(world, rng, n_adv) if chase else rng.integers(0, 5, size=len(agents))
        obs, rew, _, trunc, _ = env.step({a: act[i] for i, a in enumerate(agents)})
        actions.append(act)
        observations.append(stacked(obs))
        rewards.append(np.array([rew[a] for a in agents]))
    assert all(trunc.values())
    return agent_pos, obstacle_pos, actions, observations, rewards


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize(("n_adv", "n_good"), [(1, 1), (2, 1), (3, 1), (1, 2), (3, 2)])
def test_matches_mpe2_for_whole_episodes(n_adv: int, n_good: int, continuous: bool) -> None:
    seeds = [0, 1, 2, 3]
    episodes = [_mpe2_episode(n_adv, n_good, continuous, s, chase=s % 2 == 0) for s in seeds]
    env = TagEnv(len(seeds), n_adv, n_good, 2, continuous_actions=continuous, dtype=torch.float64)
    first = env.reset_to(
        torch.tensor(np.stack([e[0] for e in episodes])),
        torch.tensor(np.stack([e[1] for e in episodes])),
    )
    want0 = np.stack([e[3][0] for e in episodes])
    np.testing.assert_allclose(first.obs.numpy(), want0, atol=1e-5)
    for t in range(25):
        act = np.stack([e[2][t] for e in episodes])
        res = env.step(torch.tensor(act))
        want_obs = np.stack([e[3][t + 1] for e in episodes])
        want_rew = np.stack([e[4][t] for e in episodes])
        np.testing.assert_allclose(res.final.obs.numpy(), want_obs, atol=1e-5, err_msg=f"t={t}")
        np.testing.assert_allclose(res.reward.numpy(), want_rew, atol=1e-5, err_msg=f"t={t}")
    assert bool(res.truncated.all())


def test_chasing_produces_tags_and_boundary_penalties_that_match() -> None:
    """The episodes above must exercise what makes tag tag: contacts and the bound."""
    rewards = np.concatenate(
        [np.stack(_mpe2_episode(3, 1, False, s, chase=True)[4]) for s in range(4)]
    )
    assert (rewards[:, :3] >= 10).any(), "no adversary ever tagged the prey"
    frac = np.abs(rewards[:, 3] - np.round(rewards[:, 3] / 10) * 10)
    assert (frac > 1e-6).any(), "the prey never paid a boundary penalty"


def test_float32_default_steps_a_batch_and_auto_resets() -> None:
    env = TagEnv(num_envs=64, seed=0, max_cycles=5)
    obs = env.reset()
    assert obs.obs.shape == (64, 4, 16) and obs.nodes.shape == (64, 6, 7)
    for _ in range(5):
        res = env.step(env.random_actions())
    assert bool(res.truncated.all()) and torch.all(env.steps == 0)
    assert torch.all(res.observation.obs[..., 0:2] == 0)


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="num_good"):
        TagEnv(num_good=0)
