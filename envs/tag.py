"""Torch-vectorised port of mpe2 ``simple_tag_v3``: predators, prey and obstacles.

``A`` adversaries (slower, larger) are rewarded +10 for every adversary-prey contact; ``G``
good agents (faster) lose 10 for each adversary touching them and are penalised for leaving
the ``[-0.9, 0.9]`` square; ``L`` fixed obstacles block everyone. Physics, observation layout
and rewards follow mpe2 exactly (tests compare whole episodes against the real package, float64),
but ``B`` worlds step in one batch of tensor ops.

Agents come in mpe2's order, adversaries first. The two sides see different widths (an
adversary sees every good agent's velocity, a good agent every other one's); the narrower
observations are zero-padded at the end, as the PettingZoo adapter pads them; ``agent_info``
gives each side's own width, so agent groups (``groups:`` in a run config) give predators and
prey their own policies without the padding. Registered as ``tag``; team sizes are
``env.kwargs`` (``num_adversaries``, ``num_good``, ``num_obstacles``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs.base import AgentInfo, Observation, StepResult, VecMultiAgentEnv, check_at_least
from envs.spread import _DISCRETE_U, CONTACT_FORCE, CONTACT_MARGIN, end_step, integrate

ADVERSARY_SIZE, GOOD_SIZE, OBSTACLE_SIZE = 0.075, 0.05, 0.2
ADVERSARY_ACCEL, GOOD_ACCEL = 3.0, 4.0
ADVERSARY_MAX_SPEED, GOOD_MAX_SPEED = 1.0, 1.3
TAG_REWARD = 10.0
NODE_AGENT, NODE_OBSTACLE = 0, 1


def tag_obs_dim(num_adversaries: int, num_good: int, num_obstacles: int) -> int:
    """The widest (an adversary's) simple_tag observation."""
    n = num_adversaries + num_good
    return 4 + 2 * num_obstacles + 2 * (n - 1) + 2 * num_good


def _bound(x: Tensor) -> Tensor:
    """mpe2's out-of-area penalty of a coordinate's magnitude ``x``."""
    return torch.where(
        x < 0.9,
        torch.zeros_like(x),
        torch.where(x < 1.0, (x - 0.9) * 10, torch.exp(2 * x - 2).clamp(max=10.0)),
    )


def _pair_force(delta: Tensor, dist: Tensor, dist_min: Tensor) -> Tensor:
    """mpe2's soft contact force on ``a`` from ``b``: ``delta = p_a - p_b [..., 2]``."""
    k = CONTACT_MARGIN
    penetration = torch.logaddexp(torch.zeros_like(dist), -(dist - dist_min) / k) * k
    safe = torch.where(dist > 0, dist, torch.ones_like(dist))
    return CONTACT_FORCE * delta / safe.unsqueeze(-1) * penetration.unsqueeze(-1)


class TagEnv(VecMultiAgentEnv):
    """``num_envs`` simple_tag worlds stepped together.

    Args:
        num_envs: ``B``.
        num_adversaries: ``A`` predators (agents ``0 .. A-1``).
        num_good: ``G`` prey (agents ``A .. A+G-1``).
        num_obstacles: ``L`` fixed obstacles.
        max_cycles: steps before an episode is truncated.
        continuous_actions: ``Box(0, 1, (5,))`` actions instead of ``Discrete(5)``.
        device: where the tensors live.
        dtype: ``torch.float64`` reproduces mpe2's arithmetic; ``float32`` is the default.
        seed: seeds the reset generator.

    Shapes:
        - actions: ``[B, N]`` long, or ``[B, N, 5]`` float in ``[0, 1]`` (``N = A + G``).
        - obs: ``[B, N, tag_obs_dim(A, G, L)]``; nodes ``[B, N + L, 7]`` (velocity, position,
          is adversary, is good, is obstacle).
    """

    def __init__(
        self,
        num_envs: int = 1,
        num_adversaries: int = 3,
        num_good: int = 1,
        num_obstacles: int = 2,
        max_cycles: int = 25,
        continuous_actions: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> None:
        check_at_least(
            num_envs=(num_envs, 1), num_adversaries=(num_adversaries, 1),
            num_good=(num_good, 1), num_obstacles=(num_obstacles, 0), max_cycles=(max_cycles, 1),
        )  # fmt: skip
        self.num_envs = num_envs
        self.num_adversaries, self.num_good, self.num_obstacles = (
            num_adversaries,
            num_good,
            num_obstacles,
        )
        a, g, n = num_adversaries, num_good, num_adversaries + num_good
        self.n_agents = n
        self.max_cycles = self.max_episode_steps = max_cycles
        self.continuous = continuous_actions
        self.device = torch.device(device)
        self.dtype = dtype
        self.obs_dim = tag_obs_dim(a, g, num_obstacles)
        self.state_dim = n * self.obs_dim
        self.node_dim = 7
        self.n_nodes = n + num_obstacles
        self.action_kind = "continuous" if continuous_actions else "discrete"
        self.action_dim = 5
        self.action_low, self.action_high = 0.0, 1.0

        def per_agent(adv: float, good: float) -> Tensor:
            return torch.tensor([adv] * a + [good] * g, dtype=dtype, device=self.device)

        self.size = per_agent(ADVERSARY_SIZE, GOOD_SIZE)
        self.accel = per_agent(ADVERSARY_ACCEL, GOOD_ACCEL)
        self.max_speed = per_agent(ADVERSARY_MAX_SPEED, GOOD_MAX_SPEED)
        self.is_adversary = torch.arange(n, device=self.device) < a
        self._u_table = torch.tensor(_DISCRETE_U, dtype=dtype, device=self.device)
        self._pair_min = self.size.unsqueeze(1) + self.size.unsqueeze(0)  # [N, N]
        self._pair_mask = ~torch.eye(n, dtype=torch.bool, device=self.device)
        # Row i: the agents other than i, in order; then the good agents other than i, padded
        # with index n (a zero velocity row) to the adversaries' G slots.
        self._others = torch.tensor(
            [[j for j in range(n) if j != i] for i in range(n)], device=self.device
        ).reshape(n, n - 1)
        self._other_good = torch.tensor(
            [
                [j for j in range(a, n) if j != i]
                + [n] * (g - len([j for j in range(a, n) if j != i]))
                for i in range(n)
            ],
            device=self.device,
        ).reshape(n, g)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)
        self.agent_pos = torch.zeros(num_envs, n, 2, dtype=dtype, device=self.device)
        self.agent_vel = torch.zeros_like(self.agent_pos)
        self.obstacle_pos = torch.zeros(num_envs, num_obstacles, 2, dtype=dtype, device=self.device)
        self.steps = torch.zeros(num_envs, dtype=torch.long, device=self.device)

    def agent_info(self) -> list[AgentInfo]:
        """mpe2's names (``adversary_<i>``, then ``agent_<j>``) and each side's own width."""
        a, g = self.num_adversaries, self.num_good
        good_dim = self.obs_dim - 2  # a good agent sees no velocity of its own in the list
        return [AgentInfo(f"adversary_{i}", self.obs_dim, 5) for i in range(a)] + [
            AgentInfo(f"agent_{j}", good_dim, 5) for j in range(g)
        ]

    # -- state -------------------------------------------------------------------------------

    def _sample(self, count: int) -> tuple[Tensor, Tensor]:
        n, l_ = self.n_agents, self.num_obstacles
        u = torch.rand((count, n + l_, 2), generator=self._gen, device=self.device).to(self.dtype)
        return u[:, :n] * 2.0 - 1.0, u[:, n:] * 1.8 - 0.9

    def reset(self, seed: int | None = None) -> Observation:
        """Agents uniform in ``[-1, 1]^2`` at rest, obstacles uniform in ``[-0.9, 0.9]^2``."""
        if seed is not None:
            self._gen.manual_seed(seed)
        agent_pos, obstacle_pos = self._sample(self.num_envs)
        return self.reset_to(agent_pos, obstacle_pos)

    def reset_to(self, agent_pos: Tensor, obstacle_pos: Tensor) -> Observation:
        """Start every world from given positions (``[B, N, 2]``, ``[B, L, 2]``)."""
        self.agent_pos = agent_pos.to(self.device, self.dtype).clone()
        self.obstacle_pos = obstacle_pos.to(self.device, self.dtype).clone()
        self.agent_vel = torch.zeros_like(self.agent_pos)
        self.steps.zero_()
        return self._observe()

    # -- dynamics ----------------------------------------------------------------------------

    def _action_force(self, actions: Tensor) -> Tensor:
        if self.continuous:
            a = actions.to(self.dtype).clamp(0.0, 1.0)
            u = torch.stack([a[..., 2] - a[..., 1], a[..., 4] - a[..., 3]], dim=-1)
        else:
            if actions.dtype.is_floating_point:
                raise TypeError("discrete tag expects integer actions [B, N]")
            u = self._u_table[actions]
        return u * self.accel.view(1, -1, 1)

    def _contact_force(self) -> Tensor:
        pos = self.agent_pos
        delta = pos.unsqueeze(2) - pos.unsqueeze(1)  # [B, N, N, 2]: p_i - p_j
        dist = delta.square().sum(-1).sqrt()
        f = _pair_force(delta, dist, self._pair_min) * self._pair_mask.view(
            1, *self._pair_mask.shape, 1
        )
        force = f.sum(dim=2)
        if self.num_obstacles:
            d_ob = pos.unsqueeze(2) - self.obstacle_pos.unsqueeze(1)  # [B, N, L, 2]
            dist_ob = d_ob.square().sum(-1).sqrt()
            force = force + _pair_force(
                d_ob, dist_ob, (self.size + OBSTACLE_SIZE).view(1, -1, 1)
            ).sum(2)
        return force

    def _rewards(self) -> Tensor:
        pos, a = self.agent_pos, self.num_adversaries
        dist = (pos.unsqueeze(2) - pos.unsqueeze(1)).square().sum(-1).sqrt()
        touching = (dist < self._pair_min) & self._pair_mask  # [B, N, N]
        tags = touching[:, :a, a:]  # [B, A, G]: adversary i touches good agent j
        good = -TAG_REWARD * tags.sum(1).to(self.dtype) - _bound(pos[:, a:].abs()).sum(-1)
        adversary = TAG_REWARD * tags.sum((1, 2)).to(self.dtype)
        return torch.cat([adversary.unsqueeze(1).expand(-1, a), good], dim=1)

    def step(self, actions: Tensor) -> StepResult:
        """Apply actions, integrate one ``dt`` (speeds capped), score, auto-reset."""
        force = self._action_force(actions) + self._contact_force()
        cap = self.max_speed.view(1, -1, 1)
        self.agent_pos, self.agent_vel = integrate(self.agent_pos, self.agent_vel, force, cap)
        return end_step(self, self._rewards(), self._reset_worlds)

    def _reset_worlds(self, idx: Tensor) -> None:
        self.agent_pos[idx], self.obstacle_pos[idx] = self._sample(idx.numel())

    # -- observation -------------------------------------------------------------------------

    def _observe(self) -> Observation:
        pos, vel, ob = self.agent_pos, self.agent_vel, self.obstacle_pos
        b, n = pos.shape[:2]
        l_ = ob.shape[1]
        ob_rel = ob.unsqueeze(1) - pos.unsqueeze(2)  # [B, N, L, 2]
        other_rel = pos[:, self._others] - pos.unsqueeze(2)  # [B, N, N-1, 2]
        padded_vel = torch.cat([vel, torch.zeros_like(vel[:, :1])], dim=1)
        other_vel = padded_vel[:, self._other_good]  # [B, N, G, 2]; adversaries see all G
        obs = torch.cat(
            [
                vel,
                pos,
                ob_rel.reshape(b, n, -1),
                other_rel.reshape(b, n, -1),
                other_vel.reshape(b, n, -1),
            ],
            dim=-1,
        )
        kind = torch.zeros(b, n + l_, 3, dtype=pos.dtype, device=pos.device)
        kind[:, : self.num_adversaries, 0] = 1.0
        kind[:, self.num_adversaries : n, 1] = 1.0
        kind[:, n:, 2] = 1.0
        node_pos = torch.cat([pos, ob], dim=1)
        nodes = torch.cat([torch.cat([vel, torch.zeros_like(ob)], dim=1), node_pos, kind], dim=-1)
        node_type = torch.full((b, n + l_), NODE_OBSTACLE, dtype=torch.long, device=pos.device)
        node_type[:, :n] = NODE_AGENT
        return Observation(
            obs=obs,
            state=obs.reshape(b, -1),
            alive=torch.ones(b, n, dtype=torch.bool, device=pos.device),
            nodes=nodes,
            node_pos=node_pos,
            node_type=node_type,
            node_mask=torch.ones(b, n + l_, dtype=torch.bool, device=pos.device),
        )
