"""The registry and the PettingZoo adapter: same contract as native envs, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces
from pettingzoo.utils.env import ParallelEnv

import envs
from envs.spread import SpreadEnv


def test_unknown_name_lists_what_exists() -> None:
    with pytest.raises(ValueError, match=r"unknown env 'sprad'.*spread"):
        envs.make("sprad")


def test_failing_import_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot import PettingZoo env module 'nope.nothing'"):
        envs.make("pettingzoo:nope.nothing")


def test_bad_kwargs_name_the_env() -> None:
    with pytest.raises(envs.EnvError, match=r"cannot build env 'spread': TypeError: .*'n_agnts'"):
        envs.make("spread", n_agnts=3)


def test_adapter_matches_native_spread_from_same_start() -> None:
    """Through the adapter, real mpe2 and the native env agree (entity graph included)."""
    pz = envs.make("pettingzoo:mpe2.simple_spread_v3", num_envs=3, seed=5, N=3)
    start = pz.reset(seed=5)
    native = SpreadEnv(num_envs=3, n_agents=3, dtype=torch.float64)
    worlds = [e.unwrapped.world for e in pz.envs]
    native.reset_to(
        torch.tensor(np.stack([[a.state.p_pos for a in w.agents] for w in worlds])),
        torch.tensor(np.stack([[lm.state.p_pos for lm in w.landmarks] for w in worlds])),
    )
    assert start.obs.shape == (3, 3, 18) and start.state.shape == (3, 54)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        act = torch.randint(5, (3, 3), generator=gen)
        a, b = pz.step(act), native.step(act)
        torch.testing.assert_close(a.reward, b.reward.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.final.obs, b.final.obs.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(a.final.nodes, b.final.nodes.float(), atol=1e-5, rtol=0)
    assert bool(a.truncated.all())
    assert torch.all(a.observation.obs[..., :2] == 0)  # auto-reset worlds start at rest


class _MaskedToy(ParallelEnv):
    """Two agents; agent_1 leaves after one step; action masks in dict observations."""

    metadata = {"name": "masked_toy"}

    def __init__(self) -> None:
        self.possible_agents = ["agent_0", "agent_1"]
        self.t = 0

    def observation_space(self, agent):
        return spaces.Dict(
            {
                "observation": spaces.Box(-1, 1, (2,)),
                "action_mask": spaces.MultiBinary(3),
            }
        )

    def action_space(self, agent):
        return spaces.Discrete(3)

    def _obs(self):
        return {
            a: {"observation": np.full(2, self.t, np.float32), "action_mask": np.array([1, 0, 1])}
            for a in self.agents
        }

    def reset(self, seed=None, options=None):
        self.agents = list(self.possible_agents)
        self.t = 0
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        term = {a: a == "agent_1" for a in self.agents}
        trunc = dict.fromkeys(self.agents, self.t >= 3)
        obs = self._obs()
        rew = dict.fromkeys(self.agents, 1.0)
        self.agents = [a for a in self.agents if not term[a] and not trunc[a]]
        return obs, rew, term, trunc, {a: {} for a in obs}


def test_adapter_masks_absent_agents_and_passes_action_masks() -> None:
    env = envs.make("pettingzoo:tests.envs.test_registry_and_adapter:_MaskedToy", num_envs=2)
    first = env.reset()
    assert first.action_mask is not None
    assert first.action_mask[0, 0].tolist() == [True, False, True]
    res = env.step(torch.zeros(2, 2, dtype=torch.long))
    assert res.terminated[:, 1].all() and not res.terminated[:, 0].any()
    assert res.observation.alive[:, 0].all() and not res.observation.alive[:, 1].any()
    assert torch.all(res.observation.obs[:, 1] == 0)  # absent agents see padding only
    res = env.step(torch.zeros(2, 2, dtype=torch.long))
    assert res.reward[:, 1].eq(0).all()  # an absent agent earns nothing
    res = env.step(torch.zeros(2, 2, dtype=torch.long))
    assert res.truncated.all() and res.observation.alive.all()  # reset brings both back
