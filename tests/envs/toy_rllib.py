"""A tiny env written against RLlib's ``MultiAgentEnv`` API, without importing RLlib."""

from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np


class Relay:
    """Agent ``a{i}`` earns 1 for playing action ``i``; ``a2`` leaves after step 2.

    The episode ends by ``"__all__"`` truncation after ``max_steps``, as an RLlib env with a
    time limit reports it. Observations are ``[agent index, step, 1, 0]``.
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        config = config or {}
        self.max_steps = int(config.get("max_steps", 5))
        self.possible_agents = ["a0", "a1", "a2"]
        self.observation_spaces = {
            a: gymnasium.spaces.Box(-10.0, 10.0, (4,), np.float32) for a in self.possible_agents
        }
        self.action_spaces = {a: gymnasium.spaces.Discrete(3) for a in self.possible_agents}
        self.t = 0
        self.agents: list[str] = []

    def _obs(self) -> dict[str, np.ndarray]:
        return {a: np.array([int(a[1]), self.t, 1.0, 0.0], np.float32) for a in self.agents}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
        self.t = 0
        self.agents = list(self.possible_agents)
        return self._obs(), {a: {} for a in self.agents}

    def step(self, actions: dict[str, Any]) -> Any:
        assert set(actions) == set(self.agents), (actions, self.agents)
        self.t += 1
        rewards = {a: float(int(actions[a]) == int(a[1])) for a in self.agents}
        terminated: dict[str, bool] = {"__all__": False}
        truncated = {"__all__": self.t >= self.max_steps}
        if self.t == 2 and "a2" in self.agents:
            terminated["a2"] = True
        obs = self._obs()
        self.agents = [a for a in self.agents if not terminated.get(a)]
        return obs, rewards, terminated, truncated, {a: {} for a in obs}
