"""VMAS scenarios behind the ``VecMultiAgentEnv`` contract: a second vectorised fast path.

VMAS (``pip install vmas``) simulates ``B`` worlds in torch in one call, like the native
``spread``, and ships dozens of cooperative scenarios (balance, transport, navigation,
wheel, ...). This adapter only reshapes: per-agent observation lists become ``[B, N, D]``
(zero-padded to the widest), per-agent rewards ``[B, N]``, and each agent is one graph node
placed at its simulated position, so radius and kNN edges follow the agents. Finished worlds
reset inside :meth:`VmasVecEnv.step`, keeping their last view in ``final``.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from envs.base import AgentInfo, EnvError, Observation, StepResult, VecMultiAgentEnv


def _import_vmas() -> Any:
    try:
        import vmas
    except ImportError as e:
        raise EnvError(f"VMAS is not installed ({e}); install it with: pip install vmas") from e
    return vmas


def _space_kind(space: Any) -> tuple[str, int, float, float]:
    """``(kind, dim, low, high)`` of a gym or gymnasium action space."""
    name = type(space).__name__
    if name == "Discrete":
        return "discrete", int(space.n), -1.0, 1.0
    if name == "Box":
        return (
            "continuous",
            int(np.prod(space.shape)),
            float(np.min(space.low)),
            float(np.max(space.high)),
        )
    raise ValueError(f"unsupported VMAS action space {space!r}: use Discrete or Box actions")


class VmasVecEnv(VecMultiAgentEnv):
    """``num_envs`` worlds of a VMAS scenario.

    Args:
        scenario: a VMAS scenario name (``"balance"``, ``"navigation"``, ...).
        num_envs: ``B``.
        seed: seeds VMAS's generators.
        device: where the simulation and returned tensors live.
        continuous_actions: Box actions instead of VMAS's discrete ones.
        max_steps: time limit; episodes cut by it are truncations (bootstrapped).
        **kwargs: scenario arguments, e.g. ``n_agents=4``.

    Shapes:
        Observations ``[B, N, D]``; ``nodes`` are the observations, ``node_pos [B, N, 2]`` the
        agents' positions; ``state`` the observations of all agents side by side.
    """

    def __init__(
        self,
        scenario: str,
        num_envs: int = 1,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        continuous_actions: bool = False,
        max_steps: int | None = 100,
        **kwargs: Any,
    ) -> None:
        vmas = _import_vmas()
        known = [*vmas.scenarios, *vmas.mpe_scenarios, *vmas.debug_scenarios]
        if scenario not in known:
            raise EnvError(
                f"unknown VMAS scenario '{scenario}'; VMAS {vmas.__version__} has "
                f"{', '.join(vmas.scenarios)} (and MPE/debug ones: `shoal envs` lists all)"
            )
        self.device = torch.device(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.env = vmas.make_env(
                scenario,
                num_envs=num_envs,
                device=self.device,
                continuous_actions=continuous_actions,
                seed=seed,
                max_steps=max_steps,
                terminated_truncated=True,
                **kwargs,
            )
        for w in caught:
            # VMAS ignores a scenario argument it does not know (a typo in env.kwargs) with
            # a warning it says will become an error; shoal makes it one now.
            unused = re.search(r"kwargs: (.*) passed but not used", str(w.message))
            if unused:
                raise EnvError(
                    f"VMAS scenario '{scenario}' does not use {unused.group(1)} (env.kwargs); "
                    "check their names against the scenario's make_world"
                )
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self.num_envs = num_envs
        self.n_agents = len(self.env.agents)
        self.max_episode_steps = max_steps
        obs_spaces = list(self.env.observation_space)
        self._names = [a.name for a in self.env.agents]
        self._obs_dims = [int(np.prod(s.shape)) for s in obs_spaces]
        self.obs_dim = max(self._obs_dims)
        kinds = {_space_kind(s) for s in self.env.action_space}
        if len(kinds) != 1:
            raise ValueError(f"VMAS scenario {scenario!r} gives agents different action spaces")
        kind, self.action_dim, self.action_low, self.action_high = kinds.pop()
        self.action_kind = "discrete" if kind == "discrete" else "continuous"
        probe = self.reset(seed=seed)
        self.state_dim = probe.state.shape[1]
        self.node_dim = probe.nodes.shape[2]
        self.n_nodes = probe.nodes.shape[1]

    def _observe(self, per_agent: list[Tensor]) -> Observation:
        b, n = self.num_envs, self.n_agents
        obs = torch.zeros(b, n, self.obs_dim, device=self.device)
        for j, o in enumerate(per_agent):
            flat = o.reshape(b, -1)
            obs[:, j, : flat.shape[1]] = flat
        pos = torch.stack([a.state.pos for a in self.env.agents], dim=1).to(self.device)
        every = torch.ones(b, n, dtype=torch.bool, device=self.device)
        return Observation(
            obs=obs,
            state=obs.reshape(b, -1),
            alive=every,
            nodes=obs,
            node_pos=pos.clone(),
            node_type=torch.zeros(b, n, dtype=torch.long, device=self.device),
            node_mask=every.clone(),
            action_mask=None,
        )

    def agent_info(self) -> list[AgentInfo]:
        """VMAS's agent names (e.g. ``adversary_0``, ``agent_0``) and observation widths."""
        return [
            AgentInfo(name, d, self.action_dim)
            for name, d in zip(self._names, self._obs_dims, strict=True)
        ]

    def reset(self, seed: int | None = None) -> Observation:
        """Reset every world (reseeding VMAS first when ``seed`` is given)."""
        if seed is not None:
            self.env.seed(seed)
        return self._observe(self.env.reset())

    def step(self, actions: Tensor) -> StepResult:
        """Step every world; finished ones are reset and their final view kept."""
        if self.action_kind == "continuous":  # Gaussian samples may leave the box VMAS asserts
            actions = actions.clamp(self.action_low, self.action_high)
        acts = [actions[:, j].to(self.device) for j in range(self.n_agents)]
        obs, rewards, terminated, truncated, _ = self.env.step(acts)
        final = self._observe(obs)
        terminated = terminated.to(self.device).bool()
        truncated = truncated.to(self.device).bool() & ~terminated  # an ending wins
        done = terminated | truncated
        observation = final
        if bool(done.all()):
            observation = self._observe(self.env.reset())
        elif bool(done.any()):
            for i in done.nonzero().flatten().tolist():
                self.env.reset_at(i, return_observations=False)
            current = self.env.get_from_scenario(
                get_observations=True, get_rewards=False, get_infos=False, get_dones=False
            )[0]
            observation = self._observe(current)
        return StepResult(
            observation=observation,
            reward=torch.stack([r.reshape(-1) for r in rewards], dim=1).to(self.device),
            terminated=terminated.unsqueeze(1).expand(-1, self.n_agents).clone(),
            truncated=truncated,
            final=final,
        )
