"""Torch-vectorised port of mpe2 ``simple_spread_v3``.

``N`` agents and ``N`` landmarks; agents are rewarded by how close the nearest agent is to
each landmark and penalised for collisions. Physics, observation layout and rewards follow
mpe2 exactly (tests compare whole episodes against the real package), but ``B`` copies run
in one batch of tensor ops instead of a Python loop over entities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from envs.base import Observation, StepResult, VecMultiAgentEnv, check_at_least

# mpe2 world constants (mpe2/_mpe_utils/core.py World, simple_spread Scenario).
DT = 0.1
DAMPING = 0.25
CONTACT_FORCE = 1e2
CONTACT_MARGIN = 1e-3
AGENT_SIZE = 0.15
SENSITIVITY = 5.0  # mpe2 SimpleEnv._set_action default accel
DIM_C = 2  # silent agents still report a zero communication vector

# Discrete action -> unit force: [no_action, move_left, move_right, move_down, move_up].
_DISCRETE_U = ((0.0, 0.0), (-1.0, 0.0), (1.0, 0.0), (0.0, -1.0), (0.0, 1.0))

NODE_AGENT, NODE_LANDMARK = 0, 1


def spread_obs_dim(n_agents: int) -> int:
    """Observation width of mpe2 simple_spread with ``n_agents`` agents and landmarks."""
    return 4 + 2 * n_agents + 4 * (n_agents - 1)


def spread_entities(obs: Tensor, n_agents: int) -> tuple[Tensor, Tensor, Tensor]:
    """Recover the entity graph (agents, then landmarks) from simple_spread observations.

    The observation holds each agent's absolute velocity and position plus landmark positions
    relative to it, so the graph is exact and identical for the native env and real mpe2.

    Args:
        obs: ``[B, N, D]`` simple_spread observations.
        n_agents: ``N``.

    Returns:
        ``nodes [B, 2N, 5]`` (velocity, position, is_agent), ``node_pos [B, 2N, 2]`` and
        ``node_type [B, 2N]``.
    """
    b, n = obs.shape[0], n_agents
    vel, pos = obs[..., 0:2], obs[..., 2:4]
    # Landmarks are seen by every agent; agent 0's view is as good as any.
    lm_pos = obs[:, 0, 4 : 4 + 2 * n].reshape(b, n, 2) + pos[:, :1]
    node_pos = torch.cat([pos, lm_pos], dim=1)
    node_vel = torch.cat([vel, torch.zeros_like(lm_pos)], dim=1)
    is_agent = torch.zeros(b, 2 * n, 1, dtype=obs.dtype, device=obs.device)
    is_agent[:, :n] = 1.0
    nodes = torch.cat([node_vel, node_pos, is_agent], dim=-1)
    node_type = torch.full((b, 2 * n), NODE_LANDMARK, dtype=torch.long, device=obs.device)
    node_type[:, :n] = NODE_AGENT
    return nodes, node_pos, node_type


class MPEWorlds(Protocol):
    """What :func:`end_step` needs of a native mpe2 scenario (``spread``, ``tag``)."""

    agent_vel: Tensor
    steps: Tensor
    max_cycles: int

    def _observe(self) -> Observation: ...


def integrate(
    pos: Tensor, vel: Tensor, force: Tensor, max_speed: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One ``DT`` of mpe2's physics for ``[B, N, 2]`` agents: new positions and velocities.

    mpe2 moves positions by the old velocity, then damps and accelerates it, and caps the speed
    of agents that have a ``max_speed`` (broadcast against ``[B, N, 1]``).
    """
    pos = pos + vel * DT
    vel = vel * (1.0 - DAMPING) + force * DT
    if max_speed is not None:
        speed = (vel[..., 0].square() + vel[..., 1].square()).sqrt().unsqueeze(-1)
        vel = torch.where(speed > max_speed, vel / speed * max_speed, vel)
    return pos, vel


def end_step(env: MPEWorlds, reward: Tensor, reset_worlds: Callable[[Tensor], None]) -> StepResult:
    """Count a step, cut worlds at their time limit and start them afresh.

    mpe2's scenarios never terminate: every episode ends by truncation, and ``final`` is what
    the agents saw before ``reset_worlds(idx)`` placed new entities (velocities zeroed here).
    """
    env.steps += 1
    truncated = env.steps >= env.max_cycles
    terminated = torch.zeros_like(reward, dtype=torch.bool)
    final = env._observe()
    obs = final
    if bool(truncated.any()):
        idx = truncated.nonzero().squeeze(1)
        reset_worlds(idx)
        env.agent_vel[idx] = 0.0
        env.steps[idx] = 0
        obs = env._observe()
    return StepResult(obs, reward, terminated, truncated, final)


class SpreadEnv(VecMultiAgentEnv):
    """``num_envs`` simple_spread worlds stepped together.

    Args:
        num_envs: ``B``, worlds per call.
        n_agents: ``N``, agents (and landmarks) per world.
        local_ratio: weight of the per-agent collision penalty against the shared coverage
            reward, as in mpe2.
        max_cycles: steps before an episode is truncated.
        continuous_actions: ``Box(0, 1, (5,))`` actions instead of ``Discrete(5)``.
        device: where the tensors live.
        dtype: float precision; ``torch.float64`` reproduces mpe2's numpy arithmetic bit for
            bit in spirit, ``float32`` (default) agrees to ~1e-6 and is faster.
        seed: seeds the reset generator.

    Shapes:
        - actions: ``[B, N]`` long, or ``[B, N, 5]`` float in ``[0, 1]``.
        - obs: ``[B, N, 4 + 2N + 4(N-1)]``; state: ``[B, N * obs_dim]``.
    """

    def __init__(
        self,
        num_envs: int = 1,
        n_agents: int = 3,
        local_ratio: float = 0.5,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        check_at_least(n_agents=(n_agents, 1))
        if not 0.0 <= local_ratio <= 1.0:
            raise ValueError(f"local_ratio must be in [0, 1], got {local_ratio}")
        check_at_least(max_cycles=(max_cycles, 1), num_envs=(num_envs, 1))
        self.num_envs = num_envs
        self.n_agents = n_agents
        self.local_ratio = local_ratio
        self.max_cycles = self.max_episode_steps = max_cycles
        self.continuous = continuous_actions
        self.device = torch.device(device)
        self.dtype = dtype
        self.obs_dim = spread_obs_dim(n_agents)
        self.state_dim = n_agents * self.obs_dim
        self.node_dim = 5
        self.n_nodes = 2 * n_agents
        self.action_kind = "continuous" if continuous_actions else "discrete"
        self.action_dim = 5
        self.action_low, self.action_high = 0.0, 1.0

        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
        self._u_table = torch.tensor(_DISCRETE_U, dtype=dtype, device=self.device) * SENSITIVITY
        n = n_agents
        self._pair_mask = ~torch.eye(n, dtype=torch.bool, device=self.device)
        shape = (num_envs, n, 2)
        self._pairs: tuple[Tensor, Tensor, Tensor] | None = None
        self._skip_vectors = False
        self.agent_pos = torch.zeros(shape, dtype=dtype, device=self.device)
        self.agent_vel = torch.zeros(shape, dtype=dtype, device=self.device)
        self.landmark_pos = torch.zeros(shape, dtype=dtype, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)

    # -- state -------------------------------------------------------------------------------

    @property
    def agent_pos(self) -> Tensor:
        """``[B, N, 2]`` agent positions."""
        return self._agent_pos

    @agent_pos.setter
    def agent_pos(self, value: Tensor) -> None:
        self._agent_pos = value
        self._pairs = None

    def _agent_pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``dx[b, i, j] = x_i - x_j``, ``dy`` likewise, and the distance, each ``[B, N, N]``.

        The O(N²) part of a step, formed once per set of positions: the rewards and the
        observation after a step and the contact forces of the next step all read it. The
        coordinates are kept apart so that no ``[B, N, N, 2]`` tensor is needed.
        """
        if self._pairs is None:
            x, y = self._agent_pos.unbind(-1)
            dx = x.unsqueeze(2) - x.unsqueeze(1)
            dy = y.unsqueeze(2) - y.unsqueeze(1)
            self._pairs = (dx, dy, (dx * dx + dy * dy).sqrt())
        return self._pairs

    def restrict_observation(self, keys: frozenset[str]) -> None:
        """Skip the per-agent vectors (``obs``, ``state``) when no reader needs them.

        mpe2's observation holds every landmark and every other agent, ``O(N²)`` floats per
        world: at 48 agents it is most of a step's cost. Graph and transformer policies read
        the entity graph only; with neither key in ``keys`` both become zero-width.
        """
        self._skip_vectors = not ({"obs", "state"} & keys)

    def _sample_positions(self, count: int) -> tuple[Tensor, Tensor]:
        n = self.n_agents
        u = torch.rand((count, 2 * n, 2), generator=self._gen, device=self.device)
        u = (u * 2.0 - 1.0).to(self.dtype)
        return u[:, :n], u[:, n:]

    def reset(self, seed: int | None = None) -> Observation:
        """Draw fresh worlds: agents and landmarks uniform in ``[-1, 1]^2``, agents at rest."""
        if seed is not None:
            self._gen.manual_seed(seed)
        agent_pos, landmark_pos = self._sample_positions(self.num_envs)
        return self.reset_to(agent_pos, landmark_pos)

    def reset_to(self, agent_pos: Tensor, landmark_pos: Tensor) -> Observation:
        """Start every world from given positions (used to replay mpe2 episodes exactly).

        Args:
            agent_pos: ``[B, N, 2]``.
            landmark_pos: ``[B, N, 2]``.
        """
        self.agent_pos = agent_pos.to(self.device, self.dtype).clone()
        self.landmark_pos = landmark_pos.to(self.device, self.dtype).clone()
        self.agent_vel = torch.zeros_like(self.agent_pos)
        self.steps.zero_()
        return self._observe()

    # -- dynamics ----------------------------------------------------------------------------

    def _action_force(self, actions: Tensor) -> Tensor:
        if self.continuous:
            a = actions.to(self.dtype).clamp(0.0, 1.0)  # mpe2's ClipOutOfBoundsWrapper
            u = torch.stack([a[..., 2] - a[..., 1], a[..., 4] - a[..., 3]], dim=-1)
            return u * SENSITIVITY
        if actions.dtype.is_floating_point:
            raise TypeError("discrete spread expects integer actions [B, N]")
        return self._u_table[actions]

    def _collision_force(self) -> Tensor:
        dx, dy, dist = self._agent_pairs()  # [B, N, N] each
        k = CONTACT_MARGIN
        penetration = torch.logaddexp(torch.zeros_like(dist), -(dist - 2 * AGENT_SIZE) / k) * k
        # Self pairs have dist 0: mask before dividing so no NaN leaks into the sum.
        safe = torch.where(self._pair_mask, dist, torch.ones_like(dist))
        # mpe2's force on i from j is CONTACT_FORCE * (p_i - p_j) / dist * penetration.
        w = (CONTACT_FORCE * penetration / safe) * self._pair_mask
        return torch.stack([(w * dx).sum(dim=2), (w * dy).sum(dim=2)], dim=-1)

    def _rewards(self) -> Tensor:
        ax, ay = self.agent_pos.unbind(-1)
        lx, ly = self.landmark_pos.unbind(-1)
        ddx = ax.unsqueeze(1) - lx.unsqueeze(2)  # [B, L, N]
        ddy = ay.unsqueeze(1) - ly.unsqueeze(2)
        d_lm = (ddx * ddx + ddy * ddy).sqrt()
        global_rew = -d_lm.min(dim=2).values.sum(dim=1)  # [B]
        d_ag = self._agent_pairs()[2]
        collisions = ((d_ag < 2 * AGENT_SIZE) & self._pair_mask).sum(dim=2)  # [B, N]
        local = -collisions.to(self.dtype)
        return global_rew.unsqueeze(1) * (1.0 - self.local_ratio) + local * self.local_ratio

    def step(self, actions: Tensor) -> StepResult:
        """Apply actions, integrate one ``dt``, score, and auto-reset finished worlds."""
        force = self._action_force(actions) + self._collision_force()
        self.agent_pos, self.agent_vel = integrate(self.agent_pos, self.agent_vel, force)
        return end_step(self, self._rewards(), self._reset_worlds)

    def _reset_worlds(self, idx: Tensor) -> None:
        self.agent_pos[idx], self.landmark_pos[idx] = self._sample_positions(idx.numel())
        self._pairs = None

    # -- observation -------------------------------------------------------------------------

    def _observe(self) -> Observation:
        if self._skip_vectors:
            return spread_graph(self.agent_pos, self.agent_vel, self.landmark_pos)
        dx, dy, _ = self._agent_pairs()
        return spread_observation(
            self.agent_pos, self.agent_vel, self.landmark_pos, torch.stack([dx, dy], dim=-1)
        )

    # -- worlds given as entity graphs (imagination) -------------------------------------------

    def observe_entities(self, nodes: Tensor) -> Observation:
        """What the agents would see in the worlds ``nodes`` describes (agents first).

        Args:
            nodes: ``[B, 2N, 5]`` entity features as :func:`spread_entities` lays them out.
        """
        return observe_spread_entities(nodes, self.n_agents)

    def set_entities(self, nodes: Tensor) -> Observation:
        """Put the worlds in the state ``nodes`` describes (one world per row), at step 0.

        The env must have as many worlds as ``nodes`` has rows. Used to step the true
        dynamics from states a model would start imagining from.
        """
        if nodes.shape[0] != self.num_envs:
            raise ValueError(f"{nodes.shape[0]} worlds given to an env of {self.num_envs}")
        n = self.n_agents
        nodes = nodes.to(self.device, self.dtype)
        self.agent_vel = nodes[:, :n, 0:2].clone()
        self.agent_pos = nodes[:, :n, 2:4].clone()
        self.landmark_pos = nodes[:, n:, 2:4].clone()
        self.steps.zero_()
        return self._observe()


def observe_spread_entities(nodes: Tensor, n_agents: int) -> Observation:
    """simple_spread observations of worlds given as :func:`spread_entities` graphs."""
    n = n_agents
    return spread_observation(nodes[:, :n, 2:4], nodes[:, :n, 0:2], nodes[:, n:, 2:4])


def _drop_diagonal(x: Tensor) -> Tensor:
    """``x [B, N, N, ...]`` without its diagonal, as ``[B, N, N-1, ...]``.

    Row ``i`` holds ``x[:, i, j]`` for every ``j != i`` in order (mpe2's "other agents"). A
    strided copy, not a gather: the flattened ``N x N`` matrix minus its first entry is ``N - 1``
    rows of ``N + 1``, each starting with a diagonal entry's successor.
    """
    b, n = x.shape[:2]
    rest = x.shape[3:]
    flat = x.reshape(b, n * n, *rest)[:, 1:]
    return flat.reshape(b, n - 1, n + 1, *rest)[:, :, :n].reshape(b, n, n - 1, *rest)


def spread_graph(agent_pos: Tensor, agent_vel: Tensor, landmark_pos: Tensor) -> Observation:
    """The entity graph of ``B`` simple_spread worlds, without the per-agent vectors.

    ``obs`` and ``state`` are zero-width; ``nodes``, ``node_pos``, ``alive`` and the masks are
    those ``spread_observation`` gives (to float rounding: landmarks are placed directly,
    not through each agent's relative view).
    """
    b, n = agent_pos.shape[:2]
    node_pos = torch.cat([agent_pos, landmark_pos], dim=1)
    node_vel = torch.cat([agent_vel, torch.zeros_like(landmark_pos)], dim=1)
    is_agent = torch.zeros(b, 2 * n, 1, dtype=agent_pos.dtype, device=agent_pos.device)
    is_agent[:, :n] = 1.0
    node_type = torch.full((b, 2 * n), NODE_LANDMARK, dtype=torch.long, device=agent_pos.device)
    node_type[:, :n] = NODE_AGENT
    return Observation(
        obs=agent_pos.new_zeros(b, n, 0),
        state=agent_pos.new_zeros(b, 0),
        alive=torch.ones(b, n, dtype=torch.bool, device=agent_pos.device),
        nodes=torch.cat([node_vel, node_pos, is_agent], dim=-1),
        node_pos=node_pos,
        node_type=node_type,
        node_mask=torch.ones(b, 2 * n, dtype=torch.bool, device=agent_pos.device),
    )


def spread_observation(
    agent_pos: Tensor, agent_vel: Tensor, landmark_pos: Tensor, delta: Tensor | None = None
) -> Observation:
    """simple_spread observations (and their entity graph) of ``B`` worlds.

    Args:
        agent_pos: ``[B, N, 2]``.
        agent_vel: ``[B, N, 2]``.
        landmark_pos: ``[B, N, 2]``.
        delta: ``agent_pos[:, i] - agent_pos[:, j]`` as ``[B, N, N, 2]`` when the caller has
            it already (the env forms it once per step).
    """
    b, n = agent_pos.shape[:2]
    pos, vel = agent_pos, agent_vel
    if delta is None:
        delta = pos.unsqueeze(2) - pos.unsqueeze(1)
    lm_rel = landmark_pos.unsqueeze(1) - pos.unsqueeze(2)  # [B, N, L, 2]
    # p_j - p_i is exactly -(p_i - p_j) in floating point.
    other_rel = -_drop_diagonal(delta)  # [B, N, N-1, 2]
    comm = torch.zeros(b, n, DIM_C * (n - 1), dtype=pos.dtype, device=pos.device)
    obs = torch.cat([vel, pos, lm_rel.reshape(b, n, -1), other_rel.reshape(b, n, -1), comm], dim=-1)
    nodes, node_pos, node_type = spread_entities(obs, n)
    return Observation(
        obs=obs,
        state=obs.reshape(b, -1),
        alive=torch.ones(b, n, dtype=torch.bool, device=pos.device),
        nodes=nodes,
        node_pos=node_pos,
        node_type=node_type,
        node_mask=torch.ones(b, 2 * n, dtype=torch.bool, device=pos.device),
    )
