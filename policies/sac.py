"""Soft actor-critic policies: a stochastic actor and twin critics (MASAC, ISAC).

The actor is an actor kind's encoder (MLP, GNN or transformer from
``policies.actor_critic.ARCHITECTURES``, weights shared by every agent) with a head that gives
a categorical over the legal actions (discrete) or a Gaussian squashed by ``tanh`` into the
env's action box (continuous; the log-density carries the squash's Jacobian, Haarnoja et al.,
2018, appendix C).

Each of the twin critics has its own copy of the encoder and an MLP on top:

- **MASAC** (``centralised``): agent ``i``'s critic reads its encoder features, the global
  ``state`` and — for continuous actions — every agent's action, so it values the team's joint
  action (tied to the team size it was built for, as an MLP critic on the state is);
  discrete critics give a value per own action given the state (the expectation over the
  agent's own policy is exact, as in discrete SAC; the others' actions are not inputs).
- **ISAC** (independent): features and the agent's own action only.

Rollouts never read the critics (``value`` is zero: replay learners bootstrap from their own
target critics). Evaluation (:meth:`SACPolicy.evaluating`) acts with the mode: the most
probable legal action, or the squashed mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policies.actor_critic import ARCHITECTURES, POLICY_KINDS, Policy, PolicySpec
from policies.distributions import _MASKED_LOGIT, Categorical
from policies.groups import AgentGroup, GroupLayout, unit_view
from policies.q import Identity

#: log-std bounds of the squashed Gaussian (SAC's usual ``[-5, 2]``).
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class SquashedGaussian:
    """A diagonal Gaussian pushed through ``tanh`` and scaled into ``[low, high]``.

    Args:
        mean, log_std: ``[..., A]`` of the Gaussian before the squash.
        low, high: the action box.
    """

    def __init__(self, mean: Tensor, log_std: Tensor, low: float, high: float) -> None:
        self.mean, self.log_std = mean, log_std
        self.half, self.mid = (high - low) / 2, (high + low) / 2

    def _logp(self, u: Tensor, squashed: Tensor) -> Tensor:
        z = (u - self.mean) / self.log_std.exp()
        gauss = -0.5 * z.square() - self.log_std - 0.5 * math.log(2 * math.pi)
        jacobian = torch.log(self.half * (1 - squashed.square()) + 1e-6)
        return (gauss - jacobian).sum(-1)

    def rsample(self, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """A reparameterised action ``[..., A]`` and its log-density ``[...]``.

        ``noise``: the standard normal draws to use (a learner's, shared by its ranks).
        """
        eps = torch.randn_like(self.mean) if noise is None else noise
        u = self.mean + self.log_std.exp() * eps
        squashed = torch.tanh(u)
        return self.mid + self.half * squashed, self._logp(u, squashed)

    def sample(self) -> Tensor:
        """An action ``[..., A]`` in the box."""
        return self.rsample()[0].detach()

    def mode(self) -> Tensor:
        """The squashed mean."""
        return self.mid + self.half * torch.tanh(self.mean)

    def log_prob(self, action: Tensor) -> Tensor:
        """``[...]`` log-density of actions in the box."""
        squashed = ((action - self.mid) / self.half).clamp(-1 + 1e-6, 1 - 1e-6)
        return self._logp(torch.atanh(squashed), squashed)

    def entropy(self) -> Tensor:
        """``[...]`` an estimate from one sample (there is no closed form)."""
        return -self.rsample()[1].detach()


class _Mode:
    """A distribution whose samples are its mode (evaluation)."""

    def __init__(self, d: Categorical | SquashedGaussian) -> None:
        self.d = d

    def sample(self) -> Tensor:
        return self.d.mode()

    def mode(self) -> Tensor:
        return self.d.mode()

    def log_prob(self, action: Tensor) -> Tensor:
        return self.d.log_prob(action)

    def entropy(self) -> Tensor:
        return self.d.entropy()


class Critic(nn.Module):
    """One critic: an encoder copy and an MLP over its features (and state, actions)."""

    def __init__(self, spec: PolicySpec, extra: int, out: int) -> None:
        super().__init__()
        encoder = ARCHITECTURES[spec.kind].actor(spec)
        del encoder.head
        self.encoder = encoder
        self.mlp = nn.Sequential(
            nn.Linear(spec.hidden + extra, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, spec.hidden), nn.ReLU(),
            nn.Linear(spec.hidden, out),
        )  # fmt: skip

    def forward(self, batch: dict[str, Tensor], extra: list[Tensor]) -> Tensor:
        """``[B, N, out]``."""
        h = self.encoder.features(batch)  # type: ignore[operator]
        return self.mlp(torch.cat([h, *extra], -1))  # type: ignore[no-any-return]


class SoftPolicy(Policy):
    """What the soft actor-critic policies share: acting samples the actor, evaluation its mode.

    A subclass gives :meth:`policy` (every agent's distribution ``[B, N]``).
    """

    greedy: bool
    """Act with the mode (inside :meth:`evaluating`)."""

    def policy(self, batch: dict[str, Tensor]) -> Categorical | SquashedGaussian:
        """The actor's distribution ``[B, N]`` (legal actions only)."""
        raise NotImplementedError

    def dist(self, batch: dict[str, Tensor]) -> Any:
        """The actor's distribution; its mode inside :meth:`evaluating`."""
        d = self.policy(batch)
        return _Mode(d) if self.greedy else d

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Zeros ``[B, N]``: rollouts do not bootstrap a replay learner."""
        return torch.zeros(batch["alive"].shape, device=batch["alive"].device)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Act with the mode inside."""
        kept, self.greedy = self.greedy, True
        try:
            yield
        finally:
            self.greedy = kept


class SACPolicy(SoftPolicy):
    """A stochastic actor shared by every agent and twin critics (MASAC or ISAC).

    Args:
        spec: the encoder (``spec.kind``), widths, the env's dimensions and action box; no
            memory.
        n_agents: the team size a MASAC critic over joint continuous actions is built for.
        centralised: MASAC (critics read the state and, for continuous actions, every
            agent's action) or ISAC.

    Shapes:
        - :meth:`q`: ``[B, N, A]`` per own action (discrete) or ``[B, N]`` for ``actions``
          (continuous), once per critic.
    """

    def __init__(self, spec: PolicySpec, n_agents: int, centralised: bool = True) -> None:
        super().__init__()
        if spec.kind not in ARCHITECTURES:
            raise ValueError(f"policy kind {spec.kind!r} is not one of {POLICY_KINDS}")
        if spec.memory != "none":
            raise ValueError(f"a soft actor-critic policy has no memory (got {spec.memory})")
        self.spec, self.n_agents, self.centralised = spec, n_agents, centralised
        self.discrete = spec.action_kind == "discrete"
        arch = ARCHITECTURES[spec.kind]
        encoder = arch.actor(spec)
        del encoder.head  # its features feed the policy head instead
        self.encoder = encoder
        a = spec.action_dim
        self.pi = nn.Linear(spec.hidden, a if self.discrete else 2 * a)
        nn.init.orthogonal_(self.pi.weight, gain=0.01)
        nn.init.zeros_(self.pi.bias)
        self.uses_state = centralised and spec.state_dim > 0
        state = spec.state_dim if self.uses_state else 0
        if self.discrete:
            extra, out = state, a
        else:
            extra, out = state + (n_agents * a if centralised else a), 1
        self.critics = nn.ModuleList([Critic(spec, extra, out) for _ in range(2)])
        self.value_norm = Identity()
        self.greedy = False
        self.input_keys = frozenset({"alive", "action_mask", "state"} | arch.inputs(spec))

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this policy."""
        return {
            "policy_spec": asdict(self.spec),
            "sac_policy": {"n_agents": self.n_agents, "centralised": self.centralised},
        }

    def policy(self, batch: dict[str, Tensor]) -> Categorical | SquashedGaussian:
        """The actor's distribution ``[B, N]`` (legal actions only)."""
        out = self.pi(self.encoder.features(batch))  # type: ignore[operator]
        if self.discrete:
            return Categorical(out, batch.get("action_mask"))
        mean, log_std = out.chunk(2, -1)
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        return SquashedGaussian(mean, log_std, self.spec.action_low, self.spec.action_high)

    def q(
        self,
        batch: dict[str, Tensor],
        actions: Tensor | None = None,
        critics: nn.ModuleList | None = None,
    ) -> list[Tensor]:
        """Both critics' values (see the class's shapes).

        ``critics``: another pair of the same shape (a learner's target critics) in place of
        the policy's own.
        """
        rows = batch["alive"].shape  # the agents whose values come out (a group's own rows)
        extra = [batch["state"].unsqueeze(-2).expand(*rows, -1)] if self.uses_state else []
        if not self.discrete:
            assert actions is not None
            if self.centralised:  # every agent's action, whichever rows are valued
                extra.append(actions.flatten(-2).unsqueeze(-2).expand(*rows, -1))
            else:
                extra.append(actions)
        out = [critic(batch, extra) for critic in (self.critics if critics is None else critics)]
        return out if self.discrete else [q.squeeze(-1) for q in out]

    def actor_parameters(self) -> list[nn.Parameter]:
        """The actor's parameters (the encoder and the policy head)."""
        return [*self.encoder.parameters(), *self.pi.parameters()]

    def critic_list(self) -> nn.ModuleList:
        """The twin critics (a learner keeps a target copy of them)."""
        return self.critics

    def temperatures(self) -> tuple[Tensor, list[int]]:
        """Which entropy temperature each agent slot uses ``[N]`` and each one's action width.

        One for every agent of a shared policy.
        """
        return torch.zeros(self.n_agents, dtype=torch.long), [self.spec.action_dim]


class GroupedSACPolicy(GroupLayout, SoftPolicy):
    """Soft actor-critic over agent groups: an actor and twin critics per group.

    Each group (or each agent of a group with ``share=false``) has its own
    :class:`SACPolicy` at the group's own widths, read through the same views as
    ``GroupedActorCritic``'s (``policies.groups.unit_view``); every agent learns from its own
    reward, so groups may compete. A frozen group (``train=false``) acts with its weights and
    learns nothing. MASAC's critics of every group read the state and, for continuous actions,
    every agent's action. Discrete actions may differ in number between groups (a group's
    extra actions get no probability); continuous ones must have the env's width, as the
    joint action a critic reads is one row of the env's width per agent.

    Args:
        groups: the groups; together they hold every agent slot ``0 .. N-1`` once.
        centralised: MASAC or ISAC.
        action_kind, action_dim: the env's (its widest action width).

    Raises:
        ValueError: a group with a self-play pool, or with a continuous action width of its
            own, naming it.
    """

    def __init__(
        self, groups: list[AgentGroup], centralised: bool, action_kind: str, action_dim: int
    ) -> None:
        super().__init__()
        n_agents = len({i for g in groups for i in g.agents})
        name = "masac" if centralised else "isac"
        for g in groups:
            if g.past_share > 0:
                raise ValueError(
                    f"groups.{g.name}.pool.size: {name} does not play past versions yet; "
                    "remove it or use train.algorithm=ppo"
                )
            if action_kind != "discrete" and g.spec.action_dim != action_dim:
                raise ValueError(
                    f"groups.{g.name}: its {g.spec.action_dim} continuous actions differ from "
                    f"the env's {action_dim}; {name} with groups needs one continuous width"
                )
        self.centralised = centralised
        self.action_kind, self.action_dim = action_kind, action_dim
        self.discrete = action_kind == "discrete"

        def unit(g: AgentGroup, members: tuple[int, ...]) -> SACPolicy:
            return SACPolicy(g.spec, n_agents, centralised).requires_grad_(g.train)

        self._units: list[SACPolicy] = self._lay_out(groups, unit)  # typed
        self.units = nn.ModuleList(self._units)
        self._own = [ARCHITECTURES[u.spec.kind] is ARCHITECTURES["mlp"] for u in self._units]
        self.value_norm = Identity()
        self.greedy = False
        self.input_keys = frozenset().union(*(u.input_keys for u in self._units))

    def meta(self) -> dict[str, Any]:
        """Every group's settings (``policy_groups``), the action space and the critics."""
        return {
            "policy_groups": [g.as_dict() for g in self.groups],
            "action_kind": self.action_kind,
            "action_dim": self.action_dim,
            "sac_policy": {"n_agents": self.n_agents, "centralised": self.centralised},
        }

    def actor_parameters(self) -> list[nn.Parameter]:
        """The trained groups' actors' parameters."""
        return [p for u in self._units for p in u.actor_parameters() if p.requires_grad]

    def critic_list(self) -> nn.ModuleList:
        """Every unit's twin critics, unit by unit (frozen ones take no gradient)."""
        return nn.ModuleList([u.critics for u in self._units])

    def optimizer_groups(self, lr: float, critics: bool) -> list[dict[str, Any]]:
        """Adam parameter groups of the trained units' actors (or ``critics``).

        Each at its group's rate (``base_lr``; ``lr`` where the group sets none).
        """
        units = self._units
        if critics:
            return self._rated(lr, lambda u: units[u].critics.parameters())
        return self._rated(lr, lambda u: units[u].actor_parameters())

    def temperatures(self) -> tuple[Tensor, list[int]]:
        """One temperature per unit: each agent slot's ``[N]`` and each one's action width."""
        return self.unit_of_agent.cpu(), [u.spec.action_dim for u in self._units]

    def _view(self, batch: dict[str, Tensor], u: int) -> dict[str, Tensor]:
        return unit_view(batch, self.unit_agents(u), self._units[u].spec, 0, self._own[u])

    def _rows(self, x: Tensor, u: int, dim: int) -> Tensor:
        return x if self._own[u] else x.index_select(dim, self.unit_agents(u))

    def policy(self, batch: dict[str, Tensor]) -> Categorical | SquashedGaussian:
        """Every agent's distribution from its unit's actor ``[B, N]``."""
        parts = [unit.policy(self._view(batch, u)) for u, unit in enumerate(self._units)]
        if self.discrete:
            cats = [d for d in parts if isinstance(d, Categorical)]
            logits = [
                F.pad(self._rows(d.logits, u, -2), (0, self.action_dim - d.logits.shape[-1]),
                      value=_MASKED_LOGIT)
                for u, d in enumerate(cats)
            ]  # fmt: skip
            return Categorical(self._slots(logits, -2))
        gauss = [d for d in parts if isinstance(d, SquashedGaussian)]
        mean = self._slots([self._rows(d.mean, u, -2) for u, d in enumerate(gauss)], -2)
        log_std = self._slots([self._rows(d.log_std, u, -2) for u, d in enumerate(gauss)], -2)
        spec = self._units[0].spec
        return SquashedGaussian(mean, log_std, spec.action_low, spec.action_high)

    def q(
        self,
        batch: dict[str, Tensor],
        actions: Tensor | None = None,
        critics: nn.ModuleList | None = None,
    ) -> list[Tensor]:
        """Both critics' values, each agent's from its unit's (see :meth:`SACPolicy.q`).

        ``critics``: a copy of :meth:`critic_list` (a learner's target critics).
        """
        ones: list[Tensor] = []
        twos: list[Tensor] = []
        dim = -2 if self.discrete else -1  # the agent axis of [B, N, A] or [B, N]
        for u, unit in enumerate(self._units):
            view = self._view(batch, u)
            own = actions
            if actions is not None and not self.centralised and self._own[u]:
                own = actions.index_select(-2, self.unit_agents(u))
            pair = None if critics is None else critics[u]
            assert pair is None or isinstance(pair, nn.ModuleList)
            q1, q2 = unit.q(view, own, pair)
            if self.discrete:  # a group's missing actions have no probability: value 0
                width = (0, self.action_dim - q1.shape[-1])
                q1, q2 = F.pad(q1, width), F.pad(q2, width)
            ones.append(self._rows(q1, u, dim))
            twos.append(self._rows(q2, u, dim))
        return [self._slots(ones, dim), self._slots(twos, dim)]


def discrete_probs(d: Categorical) -> tuple[Tensor, Tensor]:
    """``(probabilities, log-probabilities)`` ``[..., A]``.

    Illegal actions have probability 0 and a finite log-probability, so ``p * (log p - q)``
    adds nothing for them.
    """
    return d.logits.exp(), d.logits
