"""Actor + critic + value normaliser in one module: what rollout workers and learners share."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from policies.distributions import Distribution
from policies.edges import LIST_LAYOUTS, NEIGHBOURS, build_neighbours
from policies.gnn import GNNActor, GNNCritic
from policies.memory import MEMORY, RecurrentActor, RecurrentCritic
from policies.mlp import MLPActor, MLPCritic
from policies.transformer import TransformerActor, TransformerCritic


class ValueNorm(nn.Module):
    """Running mean/std of value targets (debiased EMA), kept in buffers so it checkpoints.

    Critics predict normalised values; the learner normalises targets with these statistics
    and rollout workers de-normalise predictions with the same weights they act with.

    Args:
        beta: EMA decay per update.
        eps: variance floor.
    """

    mean: Tensor
    mean_sq: Tensor
    debias: Tensor

    def __init__(self, beta: float = 0.99999, eps: float = 1e-5) -> None:
        super().__init__()
        self.beta, self.eps = beta, eps
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("mean_sq", torch.zeros(()))
        self.register_buffer("debias", torch.zeros(()))

    def _stats(self) -> tuple[Tensor, Tensor]:
        d = self.debias.clamp(min=self.eps)
        mean = self.mean / d
        var = (self.mean_sq / d - mean.square()).clamp(min=1e-2)
        return mean, var.sqrt()

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Fold a batch of raw targets into the statistics."""
        self.update_from_moments(x.mean(), x.square().mean())

    @torch.no_grad()
    def update_from_moments(self, mean: Tensor, mean_sq: Tensor) -> None:
        """Fold a batch given by its first two moments (already reduced over ranks)."""
        b = self.beta
        self.mean.mul_(b).add_(mean * (1 - b))
        self.mean_sq.mul_(b).add_(mean_sq * (1 - b))
        self.debias.mul_(b).add_(1 - b)

    def normalize(self, x: Tensor) -> Tensor:
        """Raw -> normalised."""
        mean, std = self._stats()
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised -> raw."""
        mean, std = self._stats()
        return x * std + mean


class Normaliser(Protocol):
    """Value normalisation as learners and rollout workers use it (:class:`ValueNorm`)."""

    def normalize(self, x: Tensor) -> Tensor:
        """Raw -> normalised."""
        ...

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised -> raw."""
        ...

    def update_from_moments(self, mean: Tensor, mean_sq: Tensor) -> None:
        """Fold a batch's (all-rank) first two moments into the statistics."""
        ...


@dataclass
class PolicySpec:
    """Everything needed to rebuild a policy: env dimensions plus architecture choices."""

    kind: str
    obs_dim: int
    state_dim: int
    node_dim: int
    action_kind: str
    action_dim: int
    centralised: bool = True
    #: Critic architecture; ``None`` uses ``kind``. An MLP critic on the global state is the
    #: cheapest centralised critic but, unlike graph/transformer critics, is tied to N.
    critic_kind: str | None = None
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    #: Which entities exchange messages (``policies.edges``): GNN edges, and the
    #: transformer's attention neighbourhood (``complete`` = full attention).
    edges: str = "complete"
    radius: float = 1.0
    k: int = 4
    max_neighbours: int = 32
    #: A recurrent core after the actor's encoder (``policies.memory``): ``none``, ``gru``
    #: or ``lstm``.
    memory: str = "none"
    #: A recurrent core between the critic's encoder and its value head
    #: (``model.critic_memory``): ``none``, ``gru`` or ``lstm``.
    critic_memory: str = "none"
    #: Layer-normalise the recurrent cores' inputs (``model.memory_norm``).
    memory_norm: bool = False
    #: Layer-normalise the cores' outputs before the heads (``model.memory_out_norm``).
    memory_out_norm: bool = False
    #: The env's continuous action box (a squashed policy scales into it).
    action_low: float = -1.0
    action_high: float = 1.0


@dataclass(frozen=True)
class Architecture:
    """How one policy kind builds its actor and critic, and which observation fields it reads.

    ``alive`` and ``action_mask`` are read by every kind and are not listed.
    """

    actor: Callable[[PolicySpec], nn.Module]
    critic: Callable[[PolicySpec], nn.Module]
    inputs: Callable[[PolicySpec], frozenset[str]]


def _entity(spec: PolicySpec) -> dict[str, Any]:
    return {"hidden": spec.hidden, "layers": spec.layers, "heads": spec.heads,
            "edges": spec.edges, "radius": spec.radius, "k": spec.k,
            "max_neighbours": spec.max_neighbours}  # fmt: skip


def _local(spec: PolicySpec) -> frozenset[str]:
    """Neighbour lists travel with the rollout when the edges are not complete."""
    return frozenset() if spec.edges == "complete" else frozenset({"node_pos", NEIGHBOURS})


# The one list of policy kinds: ``model.kind`` and ``model.critic_kind`` are validated
# against it, and a new architecture is one entry here.
ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        actor=lambda s: MLPActor(s.obs_dim, s.action_kind, s.action_dim, s.hidden, s.layers),
        critic=lambda s: MLPCritic(s.obs_dim, s.state_dim, s.centralised, s.hidden, s.layers),
        inputs=lambda s: frozenset({"obs", "state"}),
    ),
    "gnn": Architecture(
        actor=lambda s: GNNActor(s.node_dim, s.action_kind, s.action_dim, **_entity(s)),
        critic=lambda s: GNNCritic(s.node_dim, s.centralised, **_entity(s)),
        inputs=lambda s: frozenset({"nodes", "node_pos", "node_mask"}) | _local(s),
    ),
    "transformer": Architecture(
        actor=lambda s: TransformerActor(s.node_dim, s.action_kind, s.action_dim, **_entity(s)),
        critic=lambda s: TransformerCritic(s.node_dim, s.centralised, **_entity(s)),
        inputs=lambda s: frozenset({"nodes", "node_mask"}) | _local(s),
    ),
}
POLICY_KINDS = tuple(ARCHITECTURES)


class Policy(nn.Module):
    """What rollout workers and learners need of a policy, whatever is inside it.

    :class:`ActorCritic` (one policy every agent shares) and
    :class:`policies.groups.GroupedActorCritic` (a policy per agent group) implement it.
    Subclasses set ``input_keys`` and ``value_norm`` and implement ``dist`` and ``value``.
    """

    input_keys: frozenset[str]
    value_norm: Normaliser
    #: Width of each agent's recurrent state (``batch["memory"]``); 0 for a policy without.
    memory_size: int = 0

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` plus what every forward of it would otherwise derive again."""
        return batch

    def dist(self, batch: dict[str, Tensor]) -> Distribution:
        """Action distribution ``[B, N]``."""
        raise NotImplementedError

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalised values ``[B, N]`` (what the critic is trained on)."""
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None]:
        """Action distribution ``[B, N]`` and the recurrent state after this step.

        The state is ``None`` without memory; a policy with memory reads ``batch["memory"]``
        (zeros when absent).
        """
        return self.dist(batch), None

    def forward(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor]:
        """Training pass: ``(action distribution, normalised values)``.

        Learners call this (through ``DistributedDataParallel`` when K > 1) so gradient
        all-reduce covers actor and critic in one backward. With memory the batch may be
        whole chunks (``policies.memory.RecurrentActor.sequence``).
        """
        return self.dist(batch), self.value(batch)

    @torch.no_grad()
    def act(
        self, batch: dict[str, Tensor], deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Sample actions; return ``(action, log_prob, raw value, next memory or None)``."""
        d, memory, value = self.step_value(self.prepare(batch))
        action = d.mode() if deterministic else d.sample()
        return action, d.log_prob(action), self.value_norm.denormalize(value), memory

    def step_value(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None, Tensor]:
        """:meth:`step` and the normalised values of one step (what acting needs of it)."""
        d, memory = self.step(batch)
        return d, memory, self.value(batch)

    @torch.no_grad()
    def raw_value(self, batch: dict[str, Tensor]) -> Tensor:
        """De-normalised values ``[B, N]`` for bootstrapping."""
        return self.value_norm.denormalize(self.value(self.prepare(batch)))

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this policy.

        ``policies.groups.policy_from_meta`` reads it back.
        """
        raise NotImplementedError

    def evaluating(self) -> contextlib.AbstractContextManager[None]:
        """Inside, act as evaluation should.

        Agent groups act with their current weights (never a self-play past version),
        value-decomposition policies greedily.
        """
        return contextlib.nullcontext()


class ActorCritic(Policy):
    """A policy and its critic, shared by every agent.

    Args:
        spec: dimensions and architecture.

    Shapes:
        - input: a batch dict as produced by ``envs.Observation.as_dict()`` (``[B, N, ...]``).
        - output: actions ``[B, N]`` (or ``[B, N, A]``), log-probs and values ``[B, N]``.
    """

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__()
        critic_kind = spec.critic_kind or spec.kind
        for kind in (spec.kind, critic_kind):
            if kind not in ARCHITECTURES:
                raise ValueError(f"policy kind {kind!r} is not one of {POLICY_KINDS}")
        self.spec = spec
        actor, critic = ARCHITECTURES[spec.kind], ARCHITECTURES[critic_kind]
        self.actor = actor.actor(spec)
        if spec.memory != "none":
            self.actor = RecurrentActor(
                self.actor, spec.memory, spec.hidden, spec.memory_norm, spec.memory_out_norm
            )
            self.memory_size = self.actor.core.size
        self.critic = critic.critic(spec)
        if spec.critic_memory != "none":  # its state follows the actor's in ``memory``
            self.critic = RecurrentCritic(
                self.critic, spec.critic_memory, spec.hidden, self.memory_size,
                spec.memory_norm, spec.memory_out_norm,
            )  # fmt: skip
            self.memory_size += self.critic.core.size
        self.value_norm = ValueNorm()
        self.input_keys = frozenset(
            {"alive", "action_mask"}
            | actor.inputs(spec)
            | critic.inputs(spec)
            | ({MEMORY} if self.memory_size else set())
        )
        # Entity encoders say which layout they use at a size (``layout(num_nodes)``).
        base = getattr(self.actor, "actor", self.actor)  # inside a memory core
        base_critic = getattr(self.critic, "critic", self.critic)
        self._layouts: list[Callable[[int], str]] = [
            enc.layout
            for enc in (getattr(base, "encoder", None), getattr(base_critic, "encoder", None))
            if enc is not None and hasattr(enc, "layout")
        ]

    def prepare(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` plus what every forward of it would otherwise derive again.

        For k-nearest and radius edges at sizes where an encoder reads neighbour lists, the
        lists are built once here, shared by actor and critic, and (rollout workers keep
        every key in ``input_keys``) stored with the rollout, so training's epochs over the
        batch never rebuild them. Returns ``batch`` itself when there is nothing to add.
        """
        if NEIGHBOURS in batch or NEIGHBOURS not in self.input_keys:
            return batch
        e = batch["node_pos"].shape[1]
        if not any(layout(e) in LIST_LAYOUTS for layout in self._layouts):
            return batch
        s = self.spec
        nbrs = build_neighbours(
            batch["node_pos"], batch["node_mask"], s.edges, s.radius, s.k, s.max_neighbours
        )
        return {**batch, NEIGHBOURS: nbrs}

    def meta(self) -> dict[str, Any]:
        """Its :class:`PolicySpec`, as ``policy_spec``."""
        return {"policy_spec": asdict(self.spec)}

    def dist(self, batch: dict[str, Tensor]) -> Distribution:
        """Action distribution ``[B, N]``."""
        return self.actor(batch)  # type: ignore[no-any-return]

    def step(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None]:
        """Action distribution and, with memory, the next recurrent state.

        The state is the actor's and then the critic's (each where it has memory).
        """
        d, state = self.actor_step(batch)
        if isinstance(self.critic, RecurrentCritic):
            state = joined_state(state, self.critic.step(batch)[1])
        return d, state

    def actor_step(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None]:
        """The actor's distribution and, with actor memory, its next state."""
        if isinstance(self.actor, RecurrentActor):
            return self.actor.step(batch)
        return self.actor(batch), None

    def step_value(self, batch: dict[str, Tensor]) -> tuple[Distribution, Tensor | None, Tensor]:
        """See :meth:`Policy.step_value`; a recurrent critic runs once for value and state."""
        if not isinstance(self.critic, RecurrentCritic):
            return super().step_value(batch)
        d, state = self.actor_step(batch)
        value, critic_state = self.critic.step(batch)
        return d, joined_state(state, critic_state), value

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Normalised values ``[B, N]`` (what the critic is trained on)."""
        return self.critic(batch)  # type: ignore[no-any-return]


def joined_state(actor_state: Tensor | None, critic_state: Tensor) -> Tensor:
    """One ``memory`` row per agent: the actor's state, then the critic's."""
    return critic_state if actor_state is None else torch.cat([actor_state, critic_state], -1)
