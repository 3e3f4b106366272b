"""``B`` PettingZoo ``ParallelEnv`` instances behind the ``VecMultiAgentEnv`` contract.

This is the slow path: instances are stepped in a Python loop. It exists so any PettingZoo
env trains and evaluates with the same rollout and policy code as the native scenarios, and
so native ports can be checked against the real thing.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import gymnasium
import numpy as np
import torch
from torch import Tensor

from envs.base import AgentInfo, EnvError, Observation, StepResult, VecMultiAgentEnv

EntityFn = Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor]]
ObserveFn = Callable[[Tensor, int], Observation]
"""The inverse of an ``EntityFn``: entity graphs ``[B, E, F]`` and ``N`` to observations."""


def load_parallel_env_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``"module.path"`` or ``"module.path:attr"`` to a ParallelEnv factory.

    ``"mpe2.simple_spread_v3"`` resolves to the module's ``parallel_env``.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise EnvError(
            f"cannot import PettingZoo env module '{module_name}': {e}. "
            "Install the package that provides it, or check the spelling."
        ) from e
    factory = getattr(module, attr or "parallel_env", None)
    if factory is None:
        raise EnvError(
            f"'{module_name}' has no '{attr or 'parallel_env'}'; name the factory as "
            "'module:function'"
        )
    return factory  # type: ignore[no-any-return]


class PettingZooVecEnv(VecMultiAgentEnv):
    """``num_envs`` copies of a PettingZoo ``ParallelEnv`` stepped in a loop.

    Agents are the env's ``possible_agents`` in order. Agents that leave an episode early are
    marked not alive and see zeros. Observations of different widths are zero-padded to the
    widest, and discrete actions an agent does not have are masked (``agent_info`` gives each
    agent's own widths). Action masks come from dict observations (``{"observation",
    "action_mask"}``) or from ``infos[agent]["action_mask"]``.

    Args:
        factory: callable returning a ``ParallelEnv``; called ``num_envs`` times.
        num_envs: ``B``.
        seed: seeds instance ``i`` with ``seed + i``.
        entity_fn: maps ``obs [B, N, D]`` to ``(nodes, node_pos, node_type)``; by default each
            agent is one node whose features are its observation.
        device: where returned tensors live.
        observe_fn: turns entity graphs back into observations, so a world model's imagined
            worlds can be shown to the policy (``observe_entities``); ``None``: it cannot.
        **kwargs: passed to ``factory``.
    """

    def __init__(
        self,
        factory: Callable[..., Any],
        num_envs: int = 1,
        seed: int | None = None,
        entity_fn: EntityFn | None = None,
        device: str | torch.device = "cpu",
        observe_fn: ObserveFn | None = None,
        **kwargs: Any,
    ) -> None:
        self.envs = [factory(**kwargs) for _ in range(num_envs)]
        self._observe_fn = observe_fn
        first = self.envs[0]
        self.agents: list[str] = list(first.possible_agents)
        self.num_envs = num_envs
        self.n_agents = len(self.agents)
        self.device = torch.device(device)
        self.entity_fn = entity_fn
        self._seed = seed
        obs_spaces = [first.observation_space(a) for a in self.agents]
        self._dict_obs = isinstance(obs_spaces[0], gymnasium.spaces.Dict)
        if self._dict_obs:
            obs_spaces = [s["observation"] for s in obs_spaces]
        self._obs_dims = [int(np.prod(s.shape)) for s in obs_spaces]
        self.obs_dim = max(self._obs_dims)
        acts = [first.action_space(a) for a in self.agents]
        if all(isinstance(a, gymnasium.spaces.Discrete) for a in acts):
            self.action_kind = "discrete"
            self._action_dims = [int(a.n) for a in acts]
        elif all(isinstance(a, gymnasium.spaces.Box) for a in acts):
            self.action_kind = "continuous"
            self._action_dims = [int(np.prod(a.shape)) for a in acts]
            self.action_low = float(min(np.min(a.low) for a in acts))
            self.action_high = float(max(np.max(a.high) for a in acts))
        else:
            raise ValueError(
                f"unsupported action spaces {sorted({type(a).__name__ for a in acts})}: use "
                "Discrete or Box, the same kind for every agent"
            )
        # Agents with fewer discrete actions than the widest have the rest masked (a shared
        # policy must never pick an action an agent does not have).
        self.action_dim = max(self._action_dims)
        self._own_actions = np.zeros((self.n_agents, self.action_dim), bool)
        for j, width in enumerate(self._action_dims):
            self._own_actions[j, :width] = True
        self.max_episode_steps = getattr(first.unwrapped, "max_cycles", None)
        self._has_state = True  # probed on the first reset: ParallelEnv.state may raise
        self._obs = np.zeros((num_envs, self.n_agents, self.obs_dim), np.float32)
        self._alive = np.zeros((num_envs, self.n_agents), bool)
        self._mask = np.ones((num_envs, self.n_agents, self.action_dim), bool)
        self._state: list[np.ndarray] = [np.zeros(0, np.float32)] * num_envs
        self._draws = getattr(first, "render_mode", None) == "rgb_array"
        self._frame: np.ndarray | None = None
        probe = self.reset(seed=seed)
        self.state_dim = probe.state.shape[1]
        self.node_dim = probe.nodes.shape[2]
        self.n_nodes = probe.nodes.shape[1]

    def _write(self, i: int, obs: dict[str, Any], infos: dict[str, Any], done: bool) -> None:
        # An agent that just left still reports its last observation; it stays visible in the
        # final view of a finished episode but is padding for the next action.
        live = set(obs) if done else set(self.envs[i].agents)
        self._obs[i] = 0.0
        self._alive[i] = False
        self._mask[i] = self._own_actions
        for j, agent in enumerate(self.agents):
            if agent not in obs or agent not in live:
                continue
            o = obs[agent]
            if self._dict_obs:
                self._mask[i, j, : self._action_dims[j]] = np.asarray(o["action_mask"], bool)
                o = o["observation"]
            elif isinstance(infos.get(agent), dict) and "action_mask" in infos[agent]:
                mask = np.asarray(infos[agent]["action_mask"], bool)
                self._mask[i, j, : self._action_dims[j]] = mask
            flat = np.asarray(o, np.float32).reshape(-1)
            self._obs[i, j, : flat.size] = flat
            self._alive[i, j] = True
        if self._has_state:
            try:
                self._state[i] = np.asarray(self.envs[i].state(), np.float32).reshape(-1)
                return
            except (NotImplementedError, AttributeError):
                self._has_state = False
        self._state[i] = self._obs[i].reshape(-1).copy()

    def _snapshot(self) -> Observation:
        obs = torch.as_tensor(self._obs.copy(), device=self.device)
        b, n = self.num_envs, self.n_agents
        if self.entity_fn is not None:
            nodes, node_pos, node_type = self.entity_fn(obs, n)
        else:
            nodes = obs
            node_pos = torch.zeros(b, n, 2, device=self.device)
            node_type = torch.zeros(b, n, dtype=torch.long, device=self.device)
        alive = torch.as_tensor(self._alive.copy(), device=self.device)
        node_mask = torch.ones(nodes.shape[:2], dtype=torch.bool, device=self.device)
        node_mask[:, :n] = alive
        mask = None
        if self.action_kind == "discrete" and not self._mask.all():
            mask = torch.as_tensor(self._mask.copy(), device=self.device)
        return Observation(
            obs=obs,
            state=torch.as_tensor(np.stack(self._state), device=self.device),
            alive=alive,
            nodes=nodes,
            node_pos=node_pos,
            node_type=node_type,
            node_mask=node_mask,
            action_mask=mask,
        )

    def _reset_one(self, i: int, seed: int | None) -> None:
        obs, infos = self.envs[i].reset(seed=seed)
        self._write(i, obs, infos, done=False)

    def reset(self, seed: int | None = None) -> Observation:
        """Reset every instance; instance ``i`` gets ``seed + i`` when a seed is given."""
        for i in range(self.num_envs):
            self._reset_one(i, None if seed is None else seed + i)
        self._capture()
        return self._snapshot()

    def _capture(self) -> None:
        if self._draws:
            self._frame = np.asarray(self.envs[0].render(), np.uint8)

    def frame(self) -> np.ndarray | None:
        """Instance 0's ``render()`` when the env was built with ``render_mode="rgb_array"``."""
        return self._frame

    def step(self, actions: Tensor) -> StepResult:
        """Step every instance; finished ones are reset and their final view kept."""
        acts = actions.detach().cpu().numpy()
        if self.action_kind == "continuous":  # what envs clip anyway, without a warning each
            acts = np.clip(acts, self.action_low, self.action_high)
        b, n = self.num_envs, self.n_agents
        reward = np.zeros((b, n), np.float32)
        terminated = np.zeros((b, n), bool)
        truncated = np.zeros(b, bool)
        done_envs = []
        for i, env in enumerate(self.envs):
            live = list(env.agents)
            step_actions = {a: self._own(acts[i, self.agents.index(a)], a) for a in live}
            obs, rew, term, trunc, infos = env.step(step_actions)
            for j, agent in enumerate(self.agents):
                reward[i, j] = float(rew.get(agent, 0.0))
                terminated[i, j] = bool(term.get(agent, agent not in live))
            truncated[i] = any(trunc.get(a, False) for a in live)
            done = bool(truncated[i]) or not env.agents
            self._write(i, obs, infos, done)
            if i == 0:
                self._capture()  # before a finished episode is reset: its last picture
            if done:
                done_envs.append(i)
        final = self._snapshot()
        observation = final
        if done_envs:
            for i in done_envs:
                self._reset_one(i, None)
            observation = self._snapshot()
        return StepResult(
            observation=observation,
            reward=torch.as_tensor(reward, device=self.device),
            terminated=torch.as_tensor(terminated, device=self.device),
            truncated=torch.as_tensor(truncated, device=self.device),
            final=final,
        )

    def _own(self, action: np.ndarray, agent: str) -> np.ndarray:
        """An agent's action in its own space: a continuous one without the padded dims."""
        if self.action_kind == "continuous":
            return action[: self._action_dims[self.agents.index(agent)]]
        return action

    def agent_info(self) -> list[AgentInfo]:
        """The env's ``possible_agents`` with their own observation and action widths."""
        return [
            AgentInfo(name, d, a)
            for name, d, a in zip(self.agents, self._obs_dims, self._action_dims, strict=True)
        ]

    def observe_entities(self, nodes: Tensor) -> Observation:
        """What the agents would see in worlds given as entity graphs (see ``observe_fn``)."""
        if self._observe_fn is None:
            return super().observe_entities(nodes)
        return self._observe_fn(nodes.to(self.device), self.n_agents)

    def close(self) -> None:
        """Close every instance."""
        for env in self.envs:
            env.close()
