"""Value-decomposition policies: per-agent utilities, a mixer, ε-greedy acting (QMIX, VDN).

Each agent's utility ``Q_i(o_i, ·)`` is an actor kind's encoder (MLP, GNN or transformer from
``policies.actor_critic.ARCHITECTURES``, weights shared by every agent) followed by a linear
head with one output per action. A mixer turns the chosen utilities into the team's value:
:class:`VDNMixer` sums them (Sunehag et al., 2018); :class:`QMixer` mixes them with weights a
hypernetwork reads from the global state, kept non-negative so ``Q_tot`` is monotonic in every
agent's utility (Rashid et al., 2018) and each agent's greedy action is the team's.

With ``model.memory`` (``gru`` | ``lstm``) a recurrent core (``policies.memory.MemoryCore``,
shared by every agent) sits between the encoder and the utility head, as in PyMARL's RNN agent:
acting carries each agent's state through the episode (``batch["memory"]``), and training
unrolls it over chunks of replayed steps from the state stored at each chunk's first step
(``agents/value_decomposition.py``).

Acting is ε-greedy over the legal actions (``action_mask``); ``epsilon`` is a buffer, so it
travels to rollout workers with the weights, and the learner moves it along its schedule.
Evaluation (:meth:`QPolicy.evaluating`) acts greedily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policies.actor_critic import ARCHITECTURES, POLICY_KINDS, Policy, PolicySpec
from policies.distributions import Categorical
from policies.groups import AgentGroup, GroupLayout, unit_view
from policies.memory import KEEP, MEMORY, MemoryCore

#: The batch key a training pass reads the actions taken from (``QPolicy.forward``).
TAKEN = "taken_actions"
#: The smallest probability written as a logit (a legal action ε-greedy may still take).
_TINY = 1e-30


class Identity(nn.Module):
    """A value normaliser that changes nothing (utilities are learnt in reward units)."""

    def normalize(self, x: Tensor) -> Tensor:
        """``x``."""
        return x

    def denormalize(self, x: Tensor) -> Tensor:
        """``x``."""
        return x

    def update_from_moments(self, mean: Tensor, mean_sq: Tensor) -> None:
        """Nothing to fold in."""


class VDNMixer(nn.Module):
    """``Q_tot = Σ_i Q_i`` over the living agents."""

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        """``q [..., N]``, ``state [..., S]`` (unused) -> ``[...]``."""
        return q.sum(-1)


class QMixer(nn.Module):
    """QMIX's monotonic mixing network (``Q_tot`` never falls when a ``Q_i`` rises).

    A hypernetwork reads the global state and writes the mixing weights, taken in absolute
    value, and biases: ``Q_tot = w2ᵀ elu(W1ᵀ q + b1) + V(s)``. It is tied to the team size
    ``N`` it was built for.

    Every layer starts at PyTorch's default initialisation scaled by ``init_scale``, with zero
    bias (as JaxMARL's ``MIXER_INIT_SCALE``, which scales orthogonal weights; QR's rounding
    depends on the thread count, and ranks must start bit-identical). Unscaled, a state of raw
    features (LBF's grid coordinates reach 7) gives mixing weights near 1 over 32 units, so a
    fresh ``Q_tot`` is ~10 where returns are ~0.1 and every agent's utility noise reaches it
    amplified ~16×; the max in the targets then inflated ``Q_tot`` without bound.

    Args:
        n_agents: ``N``.
        state_dim: ``S``.
        embed: the mixing layer's width (PyMARL's ``mixing_embed_dim``).
        hyper_hidden: the hypernetworks' hidden width (PyMARL's ``hypernet_embed``).
        init_scale: the factor on every layer's initial weights.
    """

    def __init__(
        self,
        n_agents: int,
        state_dim: int,
        embed: int = 32,
        hyper_hidden: int = 64,
        init_scale: float = 0.1,
    ):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed

        def hyper(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(state_dim, hyper_hidden), nn.ReLU(), nn.Linear(hyper_hidden, out)
            )

        self.w1 = hyper(n_agents * embed)
        self.b1 = nn.Linear(state_dim, embed)
        self.w2 = hyper(embed)
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                with torch.no_grad():
                    layer.weight.mul_(init_scale)
                    layer.bias.zero_()

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        """``q [..., N]``, ``state [..., S]`` -> ``Q_tot [...]``."""
        lead = q.shape[:-1]
        s = state.reshape(-1, state.shape[-1])
        w1 = self.w1(s).abs().view(-1, self.n_agents, self.embed)
        hidden = F.elu(torch.bmm(q.reshape(-1, 1, self.n_agents), w1) + self.b1(s).unsqueeze(1))
        w2 = self.w2(s).abs().view(-1, self.embed, 1)
        out = torch.bmm(hidden, w2).view(-1) + self.v(s).view(-1)
        return out.view(lead)


MIXERS = ("qmix", "vdn")


class MixingPolicy(Policy):
    """Per-agent utilities mixed into the team's value; acts ε-greedily, evaluates greedily.

    What :class:`QPolicy` (one utility network for every agent) and :class:`GroupedQPolicy`
    (one per agent group) share: the mixer, ε-greedy acting and the training pass. A subclass
    computes the utilities (:meth:`step_utilities`, :meth:`utilities`, :meth:`state_after`)
    and calls :meth:`_mixing` last in its constructor (after its own layers, so a run's
    initial weights do not depend on this split).
    """

    epsilon: Tensor
    """The ε of ε-greedy acting (a buffer: it travels with the weights)."""
    memory_size: int
    mixer_kind: str
    n_agents: int
    mixer_embed: int

    def _mixing(
        self, mixer: str, n_agents: int, state_dim: int, mixer_embed: int, init_scale: float
    ) -> None:
        """Build the mixer over ``n_agents`` utilities and ε (1 until the learner moves it)."""
        self.mixer_kind, self.n_agents, self.mixer_embed = mixer, n_agents, mixer_embed
        self.mixer: nn.Module = (
            QMixer(n_agents, state_dim, mixer_embed, init_scale=init_scale)
            if mixer == "qmix"
            else VDNMixer()
        )
        self.value_norm = Identity()
        self.register_buffer("epsilon", torch.ones(()))

    def step_utilities(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """One step's utilities ``[B, N, A]`` and, with memory, the state after it."""
        raise NotImplementedError

    def utilities(self, batch: dict[str, Tensor]) -> Tensor:
        """Every agent's utility of every action ``[B, N, A]``; illegal ones ``-inf``.

        Given ``memory_keep`` (a policy with memory), of whole chunks: the encoder runs once
        over every step, the core step by step from each chunk's stored state, reset where
        ``memory_keep`` is false, exactly as acting reset it.
        """
        raise NotImplementedError

    def state_after(self, batch: dict[str, Tensor]) -> Tensor:
        """The state each of a sequence batch's chunks ends with ``[b, N, S]`` (burn-in)."""
        raise NotImplementedError

    def mix(self, chosen: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """``Q_tot [B]`` from the agents' chosen utilities ``[B, N]`` (dead agents add 0)."""
        chosen = chosen * batch["alive"].to(chosen.dtype)
        return self.mixer(chosen, batch["state"])  # type: ignore[no-any-return]

    def _explore(self, q: Tensor) -> Categorical:
        legal = q > float("-inf")
        greedy = F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
        uniform = legal.to(q.dtype) / legal.sum(-1, keepdim=True).clamp_min(1)
        eps = self.epsilon.to(q.dtype)
        probs = (1 - eps) * greedy + eps * uniform
        return Categorical(probs.clamp_min(_TINY).log(), probs > 0)

    def dist(self, batch: dict[str, Tensor]) -> Categorical:
        """ε-greedy over the legal actions ``[B, N]``."""
        return self._explore(self.utilities(batch))

    def step(self, batch: dict[str, Tensor]) -> tuple[Categorical, Tensor | None]:
        """ε-greedy over the legal actions and, with memory, the state after this step."""
        q, state = self.step_utilities(batch)
        return self._explore(q), state

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Each agent's greedy utility ``[B, N]`` (what rollouts record as its value)."""
        return _greedy(self.utilities(batch))

    def forward(self, batch: dict[str, Tensor]) -> tuple[Categorical, Tensor]:
        """``(ε-greedy distribution, greedy utilities [B, N])``.

        In training, with the actions taken in ``batch[TAKEN]`` (``[B, N]``), the second is
        ``Q_tot [B]`` of those actions instead (over whole chunks given ``memory_keep``).
        """
        q = self.utilities(batch)
        if TAKEN in batch:
            chosen = q.gather(-1, batch[TAKEN].long().unsqueeze(-1)).squeeze(-1)
            chosen = torch.where(torch.isfinite(chosen), chosen, torch.zeros_like(chosen))
            return self._explore(q.detach()), self.mix(chosen, batch)
        return self._explore(q), _greedy(q)

    @torch.no_grad()
    def act(
        self, batch: dict[str, Tensor], deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One forward for the action, its probability, the greedy utility and the state."""
        q, state = self.step_utilities(batch)
        d = self._explore(q)
        action = d.mode() if deterministic else d.sample()
        return action, d.log_prob(action), _greedy(q), state

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Act greedily inside (ε = 0); the schedule's ε is restored after."""
        kept = self.epsilon.clone()
        self.epsilon.zero_()
        try:
            yield
        finally:
            self.epsilon.copy_(kept)


class QPolicy(MixingPolicy):
    """Shared per-agent utilities with a mixer; acts ε-greedily, evaluates greedily.

    Args:
        spec: the encoder (``spec.kind``), its widths and the env's dimensions (discrete
            actions only) and ``spec.memory``.
        mixer: ``qmix`` or ``vdn``; ``None`` builds the utility network alone (no mixer and
            no ε: a unit of :class:`GroupedQPolicy`, which mixes and explores for it).
        n_agents: the team size QMIX's mixer is built for.
        mixer_embed: QMIX's mixing width.
        mixer_init_scale: the factor on QMIX's initial mixer weights (:class:`QMixer`).

    Shapes:
        - input: a batch dict (``Observation.as_dict()``, ``[B, N, ...]``); with memory, the
          state each agent enters the step with, ``memory [B, N, S]`` (zeros when absent).
        - :meth:`utilities`: ``[B, N, A]``, illegal actions at ``-inf``.
        - sequence (with memory): ``L`` steps of ``b`` chunks flattened time-major
          (``[L * b, ...]``), the chunks' first states ``memory [b, N, S]`` and
          ``memory_keep [L, b, N]`` (``policies.memory.chunk_keep``) -> ``[L * b, N, A]``.
    """

    def __init__(
        self,
        spec: PolicySpec,
        mixer: str | None,
        n_agents: int,
        mixer_embed: int = 32,
        mixer_init_scale: float = 0.1,
    ):
        super().__init__()
        if spec.kind not in ARCHITECTURES:
            raise ValueError(f"policy kind {spec.kind!r} is not one of {POLICY_KINDS}")
        if spec.action_kind != "discrete" or mixer not in (*MIXERS, None):
            raise ValueError(
                f"a {mixer} policy has discrete actions (got {spec.action_kind}); mixers: {MIXERS}"
            )
        self.spec = spec
        arch = ARCHITECTURES[spec.kind]
        encoder = arch.actor(spec)
        del encoder.head  # its features feed the utility head instead
        self.encoder = encoder
        self.core = (
            MemoryCore(spec.memory, spec.hidden, spec.memory_norm, spec.memory_out_norm)
            if spec.memory != "none"
            else None
        )
        self.memory_size = self.core.size if self.core is not None else 0
        self.q_head = nn.Linear(spec.hidden, spec.action_dim)
        if mixer is not None:
            self._mixing(mixer, n_agents, spec.state_dim, mixer_embed, mixer_init_scale)
        self.input_keys = frozenset(
            {"alive", "action_mask", "state"}
            | arch.inputs(spec)
            | ({MEMORY} if self.memory_size else set())
        )

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this policy."""
        return {
            "policy_spec": asdict(self.spec),
            "q_policy": {"mixer": self.mixer_kind, "n_agents": self.n_agents,
                         "mixer_embed": self.mixer_embed},
        }  # fmt: skip

    def _masked(self, h: Tensor, batch: dict[str, Tensor]) -> Tensor:
        q = self.q_head(h)
        mask = batch.get("action_mask")
        return q if mask is None else q.masked_fill(~mask.bool(), float("-inf"))

    def step_utilities(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """One step's utilities ``[B, N, A]`` and, with memory, the state after it."""
        h = self.encoder.features(batch)  # type: ignore[operator]
        if self.core is None:
            return self._masked(h, batch), None
        h, state = self.core.step(h, batch)
        return self._masked(h, batch), state

    def utilities(self, batch: dict[str, Tensor]) -> Tensor:
        """See :meth:`MixingPolicy.utilities`."""
        if self.core is None or KEEP not in batch:
            return self.step_utilities(batch)[0]
        return self._masked(self._unroll(batch)[0], batch)

    @torch.no_grad()
    def state_after(self, batch: dict[str, Tensor]) -> Tensor:
        """The state each of a sequence batch's chunks ends with ``[b, N, S]`` (burn-in)."""
        return self._unroll(batch)[1]

    def _unroll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The core's outputs over whole chunks ``[L * b, N, H]`` and the state after them."""
        assert self.core is not None
        return self.core.unroll(self.encoder.features(batch), batch)  # type: ignore[operator]


class GroupedQPolicy(GroupLayout, MixingPolicy):
    """Value decomposition over agent groups: a utility network per group, one mixer.

    Each group (or each agent of an unshared group) has its own :class:`QPolicy`'s utility
    network at the group's own widths, encoder and memory (``policies.groups.unit_view``: an
    MLP reads its agents' rows, an entity network the whole graph); its utilities are padded
    to the env's widest action width with ``-inf``, so a group never takes another's extra
    actions. One mixer over every agent turns them into the team's value: the groups are one
    team sharing one reward. Frozen groups and self-play pools belong to competitive setups,
    which a team value does not describe; they are refused.

    Args:
        groups: the groups; together they hold every agent slot ``0 .. N-1`` once.
        mixer: ``qmix`` or ``vdn``.
        action_dim: the env's widest action width.
        mixer_embed, mixer_init_scale: as :class:`QPolicy`'s.

    Raises:
        ValueError: a frozen group or one with a self-play pool, naming it.
    """

    def __init__(
        self,
        groups: list[AgentGroup],
        mixer: str,
        action_dim: int,
        mixer_embed: int = 32,
        mixer_init_scale: float = 0.1,
    ):
        super().__init__()
        for g in groups:
            if not g.train or g.past_share > 0:
                key = "train=false" if not g.train else "pool.size"
                raise ValueError(
                    f"groups.{g.name}.{key}: {mixer} learns one team's value over every "
                    "group, so it has no frozen groups or self-play pools; remove it or use "
                    "train.algorithm=ppo"
                )
        self.action_dim = action_dim
        self._units: list[QPolicy] = self._lay_out(  # typed
            groups, lambda g, members: QPolicy(g.spec, None, len(members))
        )
        self.units = nn.ModuleList(self._units)
        self._own = [ARCHITECTURES[u.spec.kind] is ARCHITECTURES["mlp"] for u in self._units]
        self.memory_size = max(u.memory_size for u in self._units)
        self.input_keys = frozenset().union(*(u.input_keys for u in self._units))
        spec = groups[0].spec
        self._mixing(mixer, self.n_agents, spec.state_dim, mixer_embed, mixer_init_scale)
        self.register_load_state_dict_pre_hook(_drop_unit_epsilons)

    def meta(self) -> dict[str, Any]:
        """Every group's settings (``policy_groups``), the action width and the mixer."""
        return {
            "policy_groups": [g.as_dict() for g in self.groups],
            "action_kind": "discrete",
            "action_dim": self.action_dim,
            "q_policy": {"mixer": self.mixer_kind, "n_agents": self.n_agents,
                         "mixer_embed": self.mixer_embed},
        }  # fmt: skip

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups: each unit at its group's rate, the mixer at ``lr``."""
        out = self._rated(lr, lambda u: self._units[u].parameters())
        mixer = list(self.mixer.parameters())
        return out + ([{"params": mixer, "lr": lr, "base_lr": lr}] if mixer else [])

    def _view(self, batch: dict[str, Tensor], u: int) -> dict[str, Tensor]:
        unit = self._units[u]
        return unit_view(batch, self.unit_agents(u), unit.spec, unit.memory_size, self._own[u])

    def _padded(self, parts: list[Tensor], fill: float, width: int) -> Tensor:
        """Units' per-agent rows ``[..., n_u, w_u]`` padded to ``width``, in slot order."""
        return self._slots([F.pad(p, (0, width - p.shape[-1]), value=fill) for p in parts], -2)

    def _rows(self, x: Tensor, u: int) -> Tensor:
        return x if self._own[u] else x.index_select(-2, self.unit_agents(u))

    def step_utilities(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """See :meth:`MixingPolicy.step_utilities`; a unit without memory keeps zeros."""
        qs, states = [], []
        for u, unit in enumerate(self._units):
            q, state = unit.step_utilities(self._view(batch, u))
            qs.append(self._rows(q, u))
            if state is None:
                state = q.new_zeros(*q.shape[:-1], 0)
            states.append(self._rows(state, u))
        q = self._padded(qs, float("-inf"), self.action_dim)
        return q, self._padded(states, 0.0, self.memory_size) if self.memory_size else None

    def utilities(self, batch: dict[str, Tensor]) -> Tensor:
        """See :meth:`MixingPolicy.utilities`."""
        qs = [self._rows(unit.utilities(self._view(batch, u)), u)
              for u, unit in enumerate(self._units)]  # fmt: skip
        return self._padded(qs, float("-inf"), self.action_dim)

    @torch.no_grad()
    def state_after(self, batch: dict[str, Tensor]) -> Tensor:
        """See :meth:`MixingPolicy.state_after`; a unit without memory keeps zeros."""
        states = []
        for u, unit in enumerate(self._units):
            view = self._view(batch, u)
            if unit.core is None:
                first = view[MEMORY]
                states.append(self._rows(first.new_zeros(*first.shape[:-1], 0), u))
            else:
                states.append(self._rows(unit.state_after(view), u))
        return self._padded(states, 0.0, self.memory_size)


def _drop_unit_epsilons(module: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Drop the ``units.<u>.epsilon`` that grouped checkpoints carried before units lost ε."""
    for key in [k for k in state if k.startswith(f"{prefix}units.") and k.endswith(".epsilon")]:
        del state[key]


def _greedy(q: Tensor) -> Tensor:
    """The best legal utility ``[..., N]`` of ``q [..., N, A]`` (finite for an agent with none)."""
    return q.amax(-1).clamp_min(-1e9)
