"""The native spread env must reproduce mpe2 simple_spread_v3 episode for episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mpe2 import simple_spread_v3

from envs.spread import SpreadEnv, spread_obs_dim


def _mpe2_episode(n: int, continuous: bool, seed: int, max_cycles: int = 25):
    """Run one real mpe2 episode with random actions; return start state, actions, obs, rewards."""
    env = simple_spread_v3.parallel_env(
        N=n, max_cycles=max_cycles, continuous_actions=continuous, local_ratio=0.5
    )
    obs, _ = env.reset(seed=seed)
    world = env.unwrapped.world
    agent_pos = np.stack([a.state.p_pos.copy() for a in world.agents])
    landmark_pos = np.stack([lm.state.p_pos.copy() for lm in world.landmarks])
    rng = np.random.default_rng(seed)
    agents = env.possible_agents
    actions, observations, rewards = [], [np.stack([obs[a] for a in agents])], []
    for _ in range(max_cycles):
        if continuous:
            # Values outside [0, 1] exercise the clipping both sides must agree on.
            act = rng.uniform(-0.2, 1.2, size=(n, 5)).astype(np.float32)
        else:
            act = rng.integers(0, 5, size=n)
        obs, rew, _, trunc, _ = env.step({a: act[i] for i, a in enumerate(agents)})
        actions.append(act)
        observations.append(np.stack([obs[a] for a in agents]))
        rewards.append(np.array([rew[a] for a in agents]))
    assert all(trunc.values())
    return agent_pos, landmark_pos, actions, observations, rewards, np.asarray(env.state())


# mpe2 simulates in float64; float32 (the training default) drifts ~1e-5 once contacts chain.
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-5), (torch.float32, 1e-3)])
@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_matches_mpe2_for_a_whole_episode(
    n: int, continuous: bool, dtype: torch.dtype, atol: float
) -> None:
    seeds = [11 * n + 1, 11 * n + 2]  # two worlds stepped side by side in one batch
    episodes = [_mpe2_episode(n, continuous, s) for s in seeds]
    env = SpreadEnv(num_envs=len(seeds), n_agents=n, continuous_actions=continuous, dtype=dtype)
    start = env.reset_to(
        torch.tensor(np.stack([e[0] for e in episodes])),
        torch.tensor(np.stack([e[1] for e in episodes])),
    )
    assert start.obs.shape == (2, n, spread_obs_dim(n))
    np.testing.assert_allclose(start.obs.numpy(), np.stack([e[3][0] for e in episodes]), atol=1e-6)
    for t in range(25):
        act = torch.tensor(np.stack([e[2][t] for e in episodes]))
        res = env.step(act)
        want_obs = np.stack([e[3][t + 1] for e in episodes])
        want_rew = np.stack([e[4][t] for e in episodes])
        # The final observation (before auto-reset) is what mpe2 returns on the last step.
        np.testing.assert_allclose(res.final.obs.numpy(), want_obs, atol=atol, err_msg=f"t={t}")
        np.testing.assert_allclose(res.reward.numpy(), want_rew, atol=atol, err_msg=f"t={t}")
        assert bool(res.truncated.all()) == (t == 24)
    np.testing.assert_allclose(
        res.final.state.numpy(), np.stack([e[5] for e in episodes]), atol=atol
    )


def test_collisions_are_exercised_and_match() -> None:
    """Agents driven into each other: the contact force and -1 penalties must agree too."""
    n = 3
    env_ref = simple_spread_v3.parallel_env(N=n, max_cycles=25)
    env_ref.reset(seed=0)
    world = env_ref.unwrapped.world
    start = np.array([[-0.2, 0.0], [0.2, 0.0], [0.0, 0.25]])
    for a, p in zip(world.agents, start, strict=True):
        a.state.p_pos = p.copy()
    lms = np.stack([lm.state.p_pos for lm in world.landmarks])
    env = SpreadEnv(num_envs=1, n_agents=n, dtype=torch.float64)
    env.reset_to(torch.tensor(start)[None], torch.tensor(lms)[None])
    moves = [2, 1, 3]  # agents 0 and 1 push into each other, agent 2 moves down onto them
    saw_collision = False
    for _ in range(10):
        obs, rew, *_ = env_ref.step({f"agent_{i}": moves[i] for i in range(n)})
        res = env.step(torch.tensor([moves]))
        want = np.array([rew[f"agent_{i}"] for i in range(n)])
        np.testing.assert_allclose(res.reward[0].numpy(), want, atol=1e-5)
        np.testing.assert_allclose(
            res.final.obs[0].numpy(), np.stack([obs[f"agent_{i}"] for i in range(n)]), atol=1e-5
        )
        global_part = -0.5 * sum(
            min(np.linalg.norm(a.state.p_pos - lm.state.p_pos) for a in world.agents)
            for lm in world.landmarks
        )
        saw_collision |= bool((want < global_part - 0.25).any())
    assert saw_collision, "the scenario must actually produce collisions"


def test_auto_reset_returns_final_observation_and_fresh_start() -> None:
    env = SpreadEnv(num_envs=8, n_agents=3, max_cycles=5, seed=0)
    env.reset()
    for _ in range(5):
        res = env.step(env.random_actions())
    assert bool(res.truncated.all())
    # Fresh worlds start at rest; the final observation still carries the old motion.
    assert torch.all(res.observation.obs[..., 0:2] == 0)
    assert not torch.allclose(res.final.obs, res.observation.obs)
    assert torch.all(env.steps == 0)


def test_seeded_resets_are_reproducible_and_batches_differ() -> None:
    a = SpreadEnv(num_envs=4, n_agents=3).reset(seed=7).obs
    b = SpreadEnv(num_envs=4, n_agents=3).reset(seed=7).obs
    assert torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])


def test_bad_arguments_name_the_value() -> None:
    with pytest.raises(ValueError, match="local_ratio"):
        SpreadEnv(local_ratio=1.5)
    with pytest.raises(ValueError, match="n_agents"):
        SpreadEnv(n_agents=0)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_graph_only_worlds_step_exactly_like_full_ones(n: int) -> None:
    """Skipping mpe2's per-agent vectors changes what is returned, never the dynamics."""
    full = SpreadEnv(num_envs=16, n_agents=n, max_cycles=6, seed=3)
    graph = SpreadEnv(num_envs=16, n_agents=n, max_cycles=6, seed=3)
    graph.restrict_observation(frozenset({"nodes", "node_pos", "node_mask", "alive"}))
    a, b = full.reset(), graph.reset()
    gen = torch.Generator().manual_seed(0)
    for _ in range(14):  # across two auto-resets
        assert b.obs.shape == (16, n, 0) and b.state.shape == (16, 0)
        torch.testing.assert_close(b.nodes, a.nodes, atol=1e-6, rtol=0)
        assert torch.equal(b.node_pos[:, :n], a.node_pos[:, :n])
        actions = torch.randint(5, (16, n), generator=gen)
        ra, rb = full.step(actions), graph.step(actions)
        assert torch.equal(ra.reward, rb.reward) and torch.equal(ra.truncated, rb.truncated)
        assert torch.equal(full.agent_pos, graph.agent_pos)
        a, b = ra.observation, rb.observation
    # Asking for the vectors again brings them back.
    graph.restrict_observation(frozenset({"obs"}))
    assert graph.reset().obs.shape == (16, n, full.obs_dim)


def test_other_agents_come_in_mpe2_order_without_a_gather() -> None:
    pos = torch.randn(2, 5, 2)
    obs = SpreadEnv(num_envs=2, n_agents=5).reset_to(pos, torch.zeros(2, 5, 2)).obs
    other = obs[..., 4 + 10 : 4 + 10 + 8].reshape(2, 5, 4, 2)
    for i in range(5):
        want = torch.stack([pos[:, j] - pos[:, i] for j in range(5) if j != i], dim=1)
        assert torch.equal(other[:, i], want)
