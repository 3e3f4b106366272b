"""RLlib ``MultiAgentEnv`` classes behind the ``VecMultiAgentEnv`` contract.

An RLlib multi-agent env differs from a PettingZoo ``ParallelEnv`` only in bookkeeping: its
spaces are dicts, and episode ends are the ``"__all__"`` entries of the terminated and
truncated dicts. :class:`MultiAgentAsParallel` translates that, so ``B`` instances step
through :class:`~envs.pettingzoo.PettingZooVecEnv` with masks, agents leaving mid-episode and
auto-reset handled once. Nothing here imports RLlib: any class with the same methods works.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from envs.base import EnvError

ALL = "__all__"


class MultiAgentAsParallel:
    """An RLlib-style ``MultiAgentEnv`` seen as a PettingZoo ``ParallelEnv``.

    Args:
        env: has ``reset(seed=, options=) -> (obs, infos)`` and ``step(actions) -> (obs,
            rewards, terminateds, truncateds, infos)`` keyed by agent id (plus ``"__all__"``),
            ``possible_agents`` (or ``get_agent_ids()``), and ``observation_spaces`` /
            ``action_spaces`` dicts (or ``get_observation_space(agent)`` /
            ``get_action_space(agent)``).
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        agents = getattr(env, "possible_agents", None) or sorted(env.get_agent_ids())
        if not agents:
            raise ValueError(
                f"{type(env).__name__} names no agents: set possible_agents in its constructor"
            )
        self.possible_agents: list[Any] = list(agents)
        self.agents: list[Any] = []
        self.unwrapped = env

    def observation_space(self, agent: Any) -> Any:
        """The agent's observation space."""
        spaces = getattr(self.env, "observation_spaces", None)
        return spaces[agent] if spaces else self.env.get_observation_space(agent)

    def action_space(self, agent: Any) -> Any:
        """The agent's action space."""
        spaces = getattr(self.env, "action_spaces", None)
        return spaces[agent] if spaces else self.env.get_action_space(agent)

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        """Start an episode; the agents with a first observation are the live ones."""
        obs, infos = self.env.reset(seed=seed, options=options)
        self.agents = [a for a in self.possible_agents if a in obs]
        return obs, infos

    def step(self, actions: dict[Any, Any]) -> Any:
        """One step; ``"__all__"`` becomes the per-agent ends PettingZoo reports."""
        obs, rewards, terminated, truncated, infos = self.env.step(actions)
        terminated, truncated = dict(terminated), dict(truncated)
        ended = bool(terminated.pop(ALL, False))
        cut = bool(truncated.pop(ALL, False))
        live = [a for a in self.agents if not (terminated.get(a) or truncated.get(a))]
        if cut:  # a time limit ends everyone still there: bootstrap them
            truncated.update(dict.fromkeys(live, True))
        elif ended:
            terminated.update(dict.fromkeys(live, True))
        joined = [a for a in self.possible_agents if a in obs and a not in self.agents]
        still = [a for a in self.possible_agents if a in live or a in joined]
        self.agents = [] if ended or cut else still
        return obs, rewards, terminated, truncated, infos

    def state(self) -> Any:
        """The global state, if the env provides one."""
        state = getattr(self.env, "state", None)
        if not callable(state):
            raise NotImplementedError
        return state()

    def close(self) -> None:
        """Close the env, if it can be closed."""
        close = getattr(self.env, "close", None)
        if callable(close):
            close()


def load_multi_agent_factory(spec: str) -> Callable[..., MultiAgentAsParallel]:
    """Resolve ``"module.path:Class"`` to a factory of adapted instances.

    RLlib envs take one ``config`` dict, so the env's keyword arguments become that dict.
    """
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise EnvError(f"name the env class as 'rllib:module.path:Class', got 'rllib:{spec}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EnvError(
            f"cannot import RLlib env module '{module_name}': {e}. Install the package that "
            "provides it, or check the spelling."
        ) from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise EnvError(f"'{module_name}' has no '{attr}'")
    return lambda **config: MultiAgentAsParallel(cls(config))
