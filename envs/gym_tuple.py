"""Gymnasium envs with tuple spaces (one entry per agent) behind the ``VecMultiAgentEnv`` contract.

EPyMARL's convention, which Level-Based Foraging (``lbforaging``) and the Multi-Robot
Warehouse (``rware``) follow: ``observation_space`` and ``action_space`` are ``Tuple``s of
per-agent spaces, ``step`` takes a sequence of actions and returns per-agent observations and
rewards, and one episode-level ``done``. :class:`TupleAsParallel` presents such an env as a
PettingZoo ``ParallelEnv``, so ``B`` instances step through
:class:`~envs.pettingzoo.PettingZooVecEnv` (auto-reset, final observations, masks) as every
other loop-stepped env does.

**Termination is not truncation.** LBF 2.0 and rware 2.0 report reaching their step limit as
``done=True`` and ``truncated=False``; taken at its word, GAE would treat the last step of
every time-limited episode as terminal. The adapter splits it: where the env is known it asks
the env itself (LBF ends for real only when no food is left; rware never ends for real: its
step and inactivity limits are both time limits), and otherwise a ``done`` at the step limit
(the env's ``spec.max_episode_steps``, ``_max_episode_steps`` or ``max_steps``) is a
truncation. LBF's valid actions (which it otherwise replaces by NONE in silence) become
``action_mask``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np

from envs.base import EnvError

ActionMaskFn = Callable[[Any], list[np.ndarray]]
TerminalFn = Callable[[Any], bool]


def _lbf_masks(env: Any) -> list[np.ndarray]:
    n = env.action_space[0].n
    out = []
    for player in env.players:
        mask = np.zeros(n, bool)
        mask[[a.value for a in env._valid_actions[player]]] = True
        out.append(mask)
    return out


# Known envs by their unwrapped class: whether a `done` is a real end, and the action masks.
_KNOWN: dict[str, tuple[TerminalFn | None, ActionMaskFn | None]] = {
    # LBF: the episode ends for real when every food is loaded; else it hit its step limit.
    "lbforaging.foraging.environment.ForagingEnv": (lambda e: int(e.field.sum()) == 0, _lbf_masks),
    # rware: never terminal (max_steps and max_inactivity_steps are both time limits).
    "rware.warehouse.Warehouse": (lambda e: False, None),
}


def _step_limit(env: Any) -> int | None:
    spec = getattr(env, "spec", None)
    for value in (
        getattr(spec, "max_episode_steps", None),
        getattr(env.unwrapped, "_max_episode_steps", None),
        getattr(env.unwrapped, "max_steps", None),
    ):
        if isinstance(value, (int, np.integer)) and value > 0:
            return int(value)
    return None


class TupleAsParallel:
    """A Gymnasium env with per-agent tuple spaces seen as a PettingZoo ``ParallelEnv``.

    Agents are ``agent_0`` ... ``agent_{N-1}`` in the tuple's order. Rewards are the env's
    per-agent ones (a scalar reward is every agent's). Action masks, where known, reach the
    policy through ``infos[agent]["action_mask"]``.

    Args:
        env: the Gymnasium env (``gymnasium.make(id)``).
    """

    def __init__(self, env: Any) -> None:
        import gymnasium

        self.env = env
        obs_space, act_space = env.observation_space, env.action_space
        if not isinstance(obs_space, gymnasium.spaces.Tuple) or not isinstance(
            act_space, gymnasium.spaces.Tuple
        ):
            raise EnvError(
                f"{env.spec.id if env.spec else type(env.unwrapped).__name__}: the gym: adapter "
                "takes envs whose observation and action spaces are Tuples of per-agent spaces, "
                f"got {type(obs_space).__name__} and {type(act_space).__name__}; a PettingZoo "
                "env goes through pettingzoo:<module>"
            )
        self.possible_agents = [f"agent_{i}" for i in range(len(obs_space.spaces))]
        self.agents: list[str] = []
        self._obs_spaces = dict(zip(self.possible_agents, obs_space.spaces, strict=True))
        self._act_spaces = dict(zip(self.possible_agents, act_space.spaces, strict=True))
        cls = type(env.unwrapped)
        self._terminal, self._masks = _KNOWN.get(
            f"{cls.__module__}.{cls.__qualname__}", (None, None)
        )
        self.max_cycles = _step_limit(env)
        self.render_mode = getattr(env, "render_mode", None)
        self.steps = 0

    @property
    def unwrapped(self) -> TupleAsParallel:
        """This adapter (it carries ``max_cycles``, the env's step limit)."""
        return self

    def observation_space(self, agent: str) -> Any:
        """The agent's observation space."""
        return self._obs_spaces[agent]

    def action_space(self, agent: str) -> Any:
        """The agent's action space."""
        return self._act_spaces[agent]

    def _infos(self, info: dict[str, Any]) -> dict[str, Any]:
        masks = self._masks(self.env.unwrapped) if self._masks is not None else None
        return {
            a: {**info, **({"action_mask": masks[i]} if masks is not None else {})}
            for i, a in enumerate(self.possible_agents)
        }

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
        """Start an episode; every agent is live."""
        obs, info = self.env.reset(seed=seed, options=options)
        self.agents = list(self.possible_agents)
        self.steps = 0
        return dict(zip(self.possible_agents, obs, strict=True)), self._infos(info)

    def step(self, actions: dict[str, Any]) -> Any:
        """One step; the episode's ``done`` split into terminated and truncated."""
        acts = [actions[a] for a in self.possible_agents]
        obs, reward, done, truncated, info = self.env.step(acts)
        self.steps += 1
        per_agent = np.broadcast_to(np.asarray(reward, np.float64), (len(self.possible_agents),))
        done, truncated = bool(done), bool(truncated)
        if done and not truncated:
            if self._terminal is not None:
                real = self._terminal(self.env.unwrapped)
            else:  # unknown env: an end at its step limit is a time limit
                real = self.max_cycles is None or self.steps < self.max_cycles
            done, truncated = real, not real
        term = dict.fromkeys(self.possible_agents, done)
        trunc = dict.fromkeys(self.possible_agents, truncated)
        rewards = {a: float(r) for a, r in zip(self.possible_agents, per_agent, strict=True)}
        if done or truncated:
            self.agents = []
        return (
            dict(zip(self.possible_agents, obs, strict=True)),
            rewards,
            term,
            trunc,
            self._infos(info),
        )

    def state(self) -> Any:
        """No global state of its own: the adapter concatenates the observations."""
        raise NotImplementedError

    def render(self) -> Any:
        """The env's picture."""
        return self.env.render()

    def close(self) -> None:
        """Close the env."""
        self.env.close()


def load_gym_tuple_factory(spec: str) -> Callable[..., TupleAsParallel]:
    """Resolve ``"<module>:<env id>"`` to a factory of adapted envs.

    The module is imported (it registers its ids), then each instance is
    ``gymnasium.make(id, **kwargs)``.

    Raises:
        EnvError: no module part, a module that does not import, or an id it did not register.
    """
    module_name, _, env_id = spec.partition(":")
    if not env_id:
        raise EnvError(
            f"name the env as 'gym:<module>:<env id>' (e.g. gym:lbforaging:Foraging-8x8-2p-2f-"
            f"coop-v3), got 'gym:{spec}'"
        )
    try:
        importlib.import_module(module_name)
    except ImportError as e:
        raise EnvError(
            f"cannot import '{module_name}' for env '{env_id}': {e}. Install the package "
            "that provides it (e.g. pip install lbforaging rware), or check the spelling."
        ) from None
    import gymnasium

    if env_id not in gymnasium.registry:
        known = sorted(k for k, v in gymnasium.registry.items() if _from(v, module_name))
        hint = f"; '{module_name}' registers e.g. {', '.join(known[:4])}" if known else ""
        raise EnvError(f"unknown env id '{env_id}'{hint}")

    def factory(**kwargs: Any) -> TupleAsParallel:
        return TupleAsParallel(gymnasium.make(env_id, disable_env_checker=True, **kwargs))

    return factory


def _from(entry: Any, module_name: str) -> bool:
    point = entry.entry_point
    name = point if isinstance(point, str) else getattr(point, "__module__", "")
    return str(name).split(".", 1)[0].split(":", 1)[0] == module_name.split(".", 1)[0]
