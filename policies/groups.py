"""Agent groups: a policy (actor, critic, value normaliser) per group of agent slots.

BenchMARL's agent groups and RLlib's policy mapping, in the shape shoal's loop already
consumes: :class:`GroupedActorCritic` is a :class:`~policies.actor_critic.Policy` like
:class:`~policies.actor_critic.ActorCritic`, so rollout workers, learner ranks (and DDP),
weights in Redis and checkpoints carry groups unchanged. Inside, each group's networks see
only their own agents at their own widths:

- an MLP actor or critic reads its agents' observation rows, cut to the group's own
  ``obs_dim`` (no padding from a wider group), and its action head has the group's own
  number of actions;
- a graph or transformer actor or critic reads the whole entity graph (every agent is an
  entity of everyone's world) and its agents' output rows are kept.

A group whose parameters are not shared (``shared=False``) has one policy per agent. A group
with ``train=False`` is frozen: its parameters take no gradient, its agents are left out of
the loss, and it acts with the weights it was built or loaded with.

Self-play: a group with ``past_share > 0`` plays that share of the sub-envs with a *past
version* of itself (frozen copies of its policies, ``past``, whose weights the learner draws
from the group's opponent pool). Its opponents learn against the mix of its current and past
versions; its own samples from those sub-envs never reach its loss (``learn_mask``). Which
agents acted with a past version travels with the rollout (key ``past_agents``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from policies.actor_critic import (
    ARCHITECTURES,
    ActorCritic,
    Policy,
    PolicySpec,
    ValueNorm,
    joined_state,
)
from policies.distributions import (
    Categorical,
    DiagGaussian,
    Distribution,
    GroupedDistribution,
    agent_rows,
)
from policies.memory import KEEP, MEMORY, RecurrentCritic, zero_state

#: Batch key: ``[B, N]`` bool, the agent acted with its group's past version (self-play).
PAST = "past_agents"

# Keys whose tensors have an agent axis ``[..., N, ...]`` that an MLP view cuts to its agents.
_AGENT_DIM = {"obs": -2, "alive": -1, "action_mask": -2, MEMORY: -2, KEEP: -1}


@dataclass(frozen=True)
class AgentGroup:
    """One group: which agent slots, with which policy, trained how.

    Attributes:
        name: the group's name (``groups.<name>`` in a run config, a column in metrics).
        agents: agent slots, increasing.
        spec: the group's policy, sized with the group's own ``obs_dim`` and ``action_dim``.
        train: ``False`` freezes the group.
        shared: one policy for the whole group (``True``) or one per agent.
        lr: the group's learning rate (``None``: the run's ``train.lr``).
        past_share: the share of sub-envs in which the group acts with a past version of
            itself (self-play against an opponent pool; 0: never).
    """

    name: str
    agents: tuple[int, ...]
    spec: PolicySpec
    train: bool = True
    shared: bool = True
    lr: float | None = None
    past_share: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON form (checkpoint metadata)."""
        return {**asdict(self), "agents": list(self.agents)}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> AgentGroup:
        """Inverse of :meth:`as_dict`."""
        spec = PolicySpec(**data["spec"])
        return AgentGroup(**{**data, "agents": tuple(data["agents"]), "spec": spec})


class GroupValueNorm(nn.Module):
    """Each policy's own value normaliser, applied to its agents' columns ``[..., N]``.

    ``update_from_moments`` takes one mean and mean square per policy (``[U]``), with
    ``active`` saying which policies had samples (a frozen group's never do).
    """

    def __init__(self, norms: list[ValueNorm], unit_of_agent: Tensor) -> None:
        super().__init__()
        self.norms = norms  # owned (and checkpointed) by the policies themselves
        self.unit_of_agent: Tensor
        self.register_buffer("unit_of_agent", unit_of_agent, persistent=False)

    def _stats(self) -> tuple[Tensor, Tensor]:
        means, stds = zip(*(n._stats() for n in self.norms), strict=True)
        idx = self.unit_of_agent
        return torch.stack(means)[idx], torch.stack(stds)[idx]

    def normalize(self, x: Tensor) -> Tensor:
        """Raw -> normalised, each agent by its policy's statistics."""
        mean, std = self._stats()
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised -> raw."""
        mean, std = self._stats()
        return x * std + mean

    @torch.no_grad()
    def update_from_moments(
        self, mean: Tensor, mean_sq: Tensor, active: Tensor | None = None
    ) -> None:
        """Fold per-policy moments ``[U]`` (already reduced over ranks) into each normaliser."""
        for u, norm in enumerate(self.norms):
            if active is None or bool(active[u]):
                norm.update_from_moments(mean[u], mean_sq[u])


U = TypeVar("U", bound=nn.Module)


class GroupLayout(nn.Module):
    """Which agent slots each unit of a grouped policy acts for.

    A unit is a group's one policy, or one per agent of a group with ``shared=False``. The
    grouped policies (:class:`GroupedActorCritic`, ``policies.q.GroupedQPolicy``,
    ``policies.sac.GroupedSACPolicy``) lay their units out with :meth:`_lay_out` and put the
    units' per-agent outputs back in slot order with :meth:`_slots`.
    """

    groups: list[AgentGroup]
    units: nn.ModuleList
    """The units (a subclass sets them from :meth:`_lay_out`'s list)."""
    unit_group: list[int]
    """Each unit's group (an index into ``groups``)."""
    n_agents: int
    unit_of_agent: Tensor
    """``[N]`` long: which unit acts for each slot."""
    train_mask: Tensor
    """``[N]`` bool: the slot's group is trained."""
    _inverse: Tensor

    def _lay_out(
        self, groups: list[AgentGroup], make: Callable[[AgentGroup, tuple[int, ...]], U]
    ) -> list[U]:
        """Build every unit with ``make(group, its agents)``, in group order.

        Raises:
            ValueError: the groups do not hold every agent slot ``0 .. N-1`` once.
        """
        slots = sorted(i for g in groups for i in g.agents)
        if slots != list(range(len(slots))):
            raise ValueError(f"groups must hold every agent slot once, got {slots}")
        self.groups, self.n_agents, self.unit_group = groups, len(slots), []
        units, agents = [], []
        for gi, g in enumerate(groups):
            for members in [g.agents] if g.shared else [(i,) for i in g.agents]:
                units.append(make(g, members))
                self.unit_group.append(gi)
                agents.append(torch.tensor(members, dtype=torch.long))
        unit_of_agent = torch.empty(self.n_agents, dtype=torch.long)
        for u, idx in enumerate(agents):
            unit_of_agent[idx] = u
            self.register_buffer(f"_agents_{u}", idx, persistent=False)
        self.register_buffer("unit_of_agent", unit_of_agent, persistent=False)
        # Units' outputs concatenated, then put back in slot order.
        self.register_buffer("_inverse", torch.argsort(torch.cat(agents)), persistent=False)
        train = torch.tensor([groups[self.unit_group[int(u)]].train for u in unit_of_agent])
        self.register_buffer("train_mask", train, persistent=False)
        return units

    def unit_agents(self, u: int) -> Tensor:
        """Agent slots of unit ``u``."""
        return getattr(self, f"_agents_{u}")  # type: ignore[no-any-return]

    def group_agents(self) -> dict[str, list[int]]:
        """Each group's agent slots, by name."""
        return {g.name: list(g.agents) for g in self.groups}

    def group_units(self, name: str) -> list[int]:
        """The units of group ``name``."""
        gi = [g.name for g in self.groups].index(name)
        return [u for u, i in enumerate(self.unit_group) if i == gi]

    def _rated(
        self, lr: float, params: Callable[[int], Iterable[nn.Parameter]]
    ) -> list[dict[str, Any]]:
        """Adam parameter groups: ``params(u)`` of every trained unit ``u``.

        Each at its group's rate (``base_lr``; ``lr`` where the group sets none).
        """
        out = []
        for u, gi in enumerate(self.unit_group):
            g = self.groups[gi]
            if g.train:
                rate = g.lr if g.lr is not None else lr
                out.append({"params": list(params(u)), "lr": rate, "base_lr": rate})
        return out

    def _slots(self, parts: list[Tensor], dim: int) -> Tensor:
        """The units' per-agent rows (concatenated along ``dim``, unit by unit) in slot order."""
        return torch.cat(parts, dim=dim).index_select(dim, self._inverse)


class GroupedActorCritic(GroupLayout, Policy):
    """A policy per agent group behind one ``Policy`` interface.

    Args:
        groups: the groups; together they hold every agent slot ``0 .. N-1`` once.
        action_kind: the env's action kind (every group shares it).
        action_dim: the env's widest action width (the width of continuous action tensors).

    Attributes:
        units: one :class:`ActorCritic` per shared group, or per agent of an unshared one.
        unit_of_agent: ``[N]`` long, which unit acts for each slot (value normalisation and
            advantage normalisation use one set of statistics per unit).
        train_mask: ``[N]`` bool, the slot's group is trained.
    """

    def __init__(self, groups: list[AgentGroup], action_kind: str, action_dim: int) -> None:
        super().__init__()
        self.action_kind, self.action_dim = action_kind, action_dim

        def unit(g: AgentGroup, members: tuple[int, ...]) -> ActorCritic:
            return ActorCritic(g.spec).requires_grad_(g.train)

        self._units: list[ActorCritic] = self._lay_out(groups, unit)  # typed
        self.units = nn.ModuleList(self._units)
        unit_of_agent = self.unit_of_agent
        # Past versions (self-play): a frozen copy of each unit of a group with past_share > 0.
        self.past = nn.ModuleDict()
        for u, unit in enumerate(self._units):
            if groups[self.unit_group[u]].past_share > 0:
                copy = ActorCritic(unit.spec)
                copy.load_state_dict(unit.state_dict())
                copy.requires_grad_(False)
                self.past[str(u)] = copy
        self.use_past = True
        norms = [u.value_norm for u in self._units if isinstance(u.value_norm, ValueNorm)]
        self.value_norm = GroupValueNorm(norms, unit_of_agent)
        self.input_keys = frozenset().union(*(u.input_keys for u in self._units))
        # One recurrent state per agent slot, as wide as the widest group's (``memory``).
        self.memory_size = max(u.memory_size for u in self._units)
        if len(self.past):
            self.input_keys |= {PAST}
        # Each unit's networks read its own agents' rows (mlp) or the whole graph.
        self._rows = [
            (ARCHITECTURES[g.spec.kind], ARCHITECTURES[g.spec.critic_kind or g.spec.kind])
            for g in (groups[i] for i in self.unit_group)
        ]
        self._mlp = ARCHITECTURES["mlp"]

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups: one per trained unit, at its group's rate (``base_lr``)."""
        return self._rated(lr, lambda u: self._units[u].parameters())

    def _view(self, batch: dict[str, Tensor], u: int, own_rows: bool) -> dict[str, Tensor]:
        """What unit ``u``'s actor or critic reads: its agents' rows at its own widths."""
        unit = self._units[u]
        return unit_view(batch, self.unit_agents(u), unit.spec, unit.memory_size, own_rows)

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Neighbour lists once for every unit (groups share the run's edge settings).

        With self-play, also which agents act with a past version (key ``past_agents``): in
        the last ``past_share`` of the sub-envs, the agents of that group.
        """
        for unit in self._units:
            batch = unit.prepare(batch)
        if not len(self.past) or not self.use_past or PAST in batch:
            return batch
        alive = batch["alive"]
        past = torch.zeros_like(alive, dtype=torch.bool)
        b = alive.shape[0]
        for g in self.groups:
            envs = round(g.past_share * b)
            if envs:
                past[b - envs :, list(g.agents)] = True
        return {**batch, PAST: past}

    @contextlib.contextmanager
    def current_only(self) -> Iterator[None]:
        """Act with every group's current weights (evaluation), not its past versions."""
        before, self.use_past = self.use_past, False
        try:
            yield
        finally:
            self.use_past = before

    def meta(self) -> dict[str, Any]:
        """Every group's settings, as ``policy_groups``, and the env's action space."""
        return {
            "policy_groups": [g.as_dict() for g in self.groups],
            "action_kind": self.action_kind,
            "action_dim": self.action_dim,
        }

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """Evaluation acts with every group's current weights (:meth:`current_only`)."""
        return self.current_only()

    def learn_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """``[..., N]`` bool: the samples a loss learns from.

        Live agents of trained groups, less those that acted with a past version of their group.
        """
        mask = batch["alive"] & self.train_mask
        if PAST in batch:
            mask = mask & ~batch[PAST]
        return mask

    def _past(self, u: int) -> ActorCritic:
        past = self.past[str(u)]
        assert isinstance(past, ActorCritic)
        return past

    def snapshot(self, name: str) -> dict[str, Tensor]:
        """A copy of group ``name``'s current weights (an opponent-pool entry)."""
        return {
            f"{j}.{k}": v.detach().clone()
            for j, u in enumerate(self.group_units(name))
            for k, v in self._units[u].state_dict().items()
        }

    def load_past(self, name: str, state: dict[str, Tensor]) -> None:
        """Let group ``name``'s past version act with ``state`` (a :meth:`snapshot`)."""
        for j, u in enumerate(self.group_units(name)):
            prefix = f"{j}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self._past(u).load_state_dict(own)

    def dist(self, batch: dict[str, Tensor]) -> GroupedDistribution:
        """Every group's distribution over its own agents, read as one ``[B, N]``."""
        return self._act(batch, states=False, values=False)[0]

    def step(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None]:
        """The distribution and, with memory, every slot's next state.

        A group without memory keeps zeros; an agent played by a past version gets that
        version's state.
        """
        if not self.memory_size:
            return self.dist(batch), None
        d, memory, _ = self._act(batch, states=True, values=False)
        return d, memory

    def step_value(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None, Tensor]:
        """See :meth:`Policy.step_value`; each group's critic runs once, on its own view."""
        d, memory, values = self._act(batch, states=bool(self.memory_size), values=True)
        assert values is not None
        return d, memory, values

    def _act(
        self, batch: dict[str, Tensor], states: bool, values: bool
    ) -> tuple[GroupedDistribution, Tensor | None, Tensor | None]:
        parts: list[Categorical | DiagGaussian] = []
        agents, memory, value = [], [], []
        for u, unit in enumerate(self._units):
            idx = self.unit_agents(u)
            d, m, v = self._unit_step(unit, batch, u, states, values)
            if PAST in batch and str(u) in self.past:
                past = batch[PAST].index_select(-1, idx)
                old, old_m, _ = self._unit_step(self._past(u), batch, u, states, False)
                d = _where(past, old, d)
                if m is not None and old_m is not None:
                    m = torch.where(past.unsqueeze(-1), old_m, m)
            parts.append(d)
            agents.append(idx)
            if states:
                memory.append(self._slot_state(batch, m, len(idx)))
            if v is not None:
                value.append(v)
        dist = GroupedDistribution(
            parts, agents, self.action_kind, self.action_dim, inverse=self._inverse
        )
        slots = self._slots(memory, -2) if states else None
        v_slots = self._slots(value, -1) if values else None
        return dist, slots, v_slots

    def _unit_step(
        self, unit: ActorCritic, batch: dict[str, Tensor], u: int, states: bool, values: bool
    ) -> tuple[Any, Tensor | None, Tensor | None]:
        """Unit ``u``'s distribution, next states and normalised values over its agents.

        The states (``states``) are the actor's, then a recurrent critic's; the values are
        computed only when ``values``.

        The actor and the critic each read their own view (a unit's own rows, or the whole
        graph for an entity network), so the critic runs once for its value and its state.
        """
        idx = self.unit_agents(u)
        own_actor, own_critic = (rows is self._mlp for rows in self._rows[u])
        view = self._view(batch, u, own_actor)
        d: Any
        d, m = unit.actor_step(view) if states else (unit.actor(view), None)
        d = d if own_actor else agent_rows(d, idx)
        m = None if m is None else _rows(m, idx, own_actor)
        critic = unit.critic
        v = None
        if values or (states and isinstance(critic, RecurrentCritic)):
            critic_view = view if own_critic == own_actor else self._critic_view(batch, u)
            if isinstance(critic, RecurrentCritic):
                v, critic_state = critic.step(critic_view)
                m = joined_state(m, _rows(critic_state, idx, own_critic))
            else:
                v = critic(critic_view)
            v = self._critic_rows(v, u)
        return d, m, v if values else None

    def _critic_view(self, batch: dict[str, Tensor], u: int) -> dict[str, Tensor]:
        """What unit ``u``'s critic reads: its agents' rows, or the whole graph."""
        return self._view(batch, u, self._rows[u][1] is self._mlp)

    def _critic_rows(self, v: Tensor, u: int) -> Tensor:
        """Unit ``u``'s critic values ``[B, n_u]``, its agents' own (the graph's otherwise)."""
        return v if self._rows[u][1] is self._mlp else v.index_select(-1, self.unit_agents(u))

    def _slot_state(self, batch: dict[str, Tensor], m: Tensor | None, n: int) -> Tensor:
        """A unit's next states ``[B, n, memory_size]`` from its agents' rows ``m``.

        Zero-padded to the widest group's width; zeros for a unit without memory.
        """
        if m is None:
            return zero_state(batch["alive"][..., :n], self.memory_size)
        return nn.functional.pad(m, (0, self.memory_size - m.shape[-1]))

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalised values ``[B, N]``, each agent's from its group's critic."""
        values = [self._critic_rows(unit.critic(self._critic_view(batch, u)), u)
                  for u, unit in enumerate(self._units)]  # fmt: skip
        return self._slots(values, -1)


def unit_view(
    batch: dict[str, Tensor], idx: Tensor, spec: PolicySpec, memory_size: int, own_rows: bool
) -> dict[str, Tensor]:
    """What a network of agents ``idx`` reads of ``batch``, at ``spec``'s own widths.

    Its agents' rows (``own_rows``: an MLP) or the whole graph (an entity network, whose
    caller keeps its agents' output rows), the action mask cut to its actions and the
    recurrent states to ``memory_size``.
    """
    view = dict(batch)
    if "action_mask" in batch:
        view["action_mask"] = batch["action_mask"][..., : spec.action_dim]
    if own_rows:
        for key, dim in _AGENT_DIM.items():
            if key in view:
                view[key] = view[key].index_select(dim, idx)
        view["obs"] = view["obs"][..., : spec.obs_dim]
    if MEMORY in view:
        view[MEMORY] = view[MEMORY][..., :memory_size]
    return view


def _rows(m: Tensor, idx: Tensor, own: bool) -> Tensor:
    """A unit's agents' rows of per-agent states ``[..., N, S]`` (as they are when ``own``)."""
    return m if own else m.index_select(-2, idx)


def _where(cond: Tensor, a: Any, b: Any) -> Categorical | DiagGaussian:
    """Per agent, distribution ``a`` where ``cond [..., N]`` holds, else ``b``."""
    c = cond.unsqueeze(-1)
    if isinstance(b, Categorical):
        return Categorical(torch.where(c, a.logits, b.logits))
    return DiagGaussian(torch.where(c, a.mean, b.mean), torch.where(c, a.log_std, b.log_std))


def policy_meta(model: Policy) -> dict[str, Any]:
    """What a checkpoint records to rebuild ``model``: its ``meta()``.

    ``policy_spec`` or ``policy_groups``, and ``q_policy`` for a value-decomposition policy or
    ``sac_policy`` for a soft actor-critic one.
    """
    return model.meta()


def policy_from_meta(meta: dict[str, Any], **spec_overrides: Any) -> Policy:
    """The (untrained) policy :func:`policy_meta` describes."""
    if "policy_groups" in meta:
        groups = [AgentGroup.from_dict(g) for g in meta["policy_groups"]]
        if "q_policy" in meta:
            from policies.q import GroupedQPolicy

            q = meta["q_policy"]
            return GroupedQPolicy(groups, q["mixer"], meta["action_dim"], q["mixer_embed"])
        if "sac_policy" in meta:
            from policies.sac import GroupedSACPolicy

            centralised = meta["sac_policy"]["centralised"]
            return GroupedSACPolicy(groups, centralised, meta["action_kind"], meta["action_dim"])
        return GroupedActorCritic(groups, meta["action_kind"], meta["action_dim"])
    spec = PolicySpec(**{**meta["policy_spec"], **spec_overrides})
    if "q_policy" in meta:
        from policies.q import QPolicy

        q = meta["q_policy"]  # acting never reads the mixer, which is tied to the team size
        return QPolicy(spec, q["mixer"], q["n_agents"], q["mixer_embed"])
    if "sac_policy" in meta:
        from policies.sac import SACPolicy

        return SACPolicy(spec, **meta["sac_policy"])
    return ActorCritic(spec)


def with_widths(spec: PolicySpec, obs_dim: int, action_dim: int, **overrides: Any) -> PolicySpec:
    """``spec`` resized to a group's own widths, with architecture ``overrides``."""
    return replace(spec, obs_dim=obs_dim, action_dim=action_dim, **overrides)
