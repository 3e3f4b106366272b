"""The algorithm seam: what a learning algorithm declares, and the registry that finds it.

A learner rank never names a concrete algorithm. It looks ``train.algorithm`` up here and gets
an :class:`AlgorithmSpec`: capability flags that preflight checks against the env before
anything starts, what acting must record per step, the batch layout it learns from, and
``build``, which returns the object the rank trains with (an :class:`Algorithm`: ``update``,
its checkpoint state, its update count). Self-play, world-model imagination, agent groups and
K learner ranks talk to that protocol only.

Adding an algorithm is one module that defines its spec, plus one line in :data:`ALGORITHMS`;
an algorithm outside shoal is named by its import path instead, ``train.algorithm=
my_package.my_module:SPEC`` (so Ray's learner processes import it too).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel
from torch import Tensor, nn

from agents.rollout import RolloutBatch
from policies.actor_critic import Policy, PolicySpec
from policies.groups import AgentGroup

#: What acting records per step today (``Policy.act``): an algorithm may ask for no more.
ACTING_OUTPUTS = frozenset({"logp", "value"})
#: Batch layouts: random time steps across envs, whole sequence chunks with their start
#: recurrent states (a policy with ``model.memory``: every step's entering state is in
#: ``batch.obs["memory"]``, ``policies.memory.chunk_keep`` says where acting kept it), replayed
#: transitions (the algorithm keeps each batch it is handed in its own replay and samples
#: transitions from it).
LAYOUTS = ("time_steps", "chunks", "transitions")
BUILT_LAYOUTS = frozenset({"time_steps", "chunks", "transitions"})


class Algorithm(Protocol):
    """What a learner rank trains with: built by an :class:`AlgorithmSpec`."""

    updates: int
    """Updates done so far (self-play counts its snapshots by it)."""

    def update(
        self, batch: RolloutBatch, lr_frac: float = 1.0, staleness: int = 0
    ) -> dict[str, float]:
        """Learn from one batch (this rank's shard; K ranks call it together).

        Args:
            batch: time-major ``[T, B, ...]`` in the spec's layout.
            lr_frac: multiplies the learning rate (linear decay).
            staleness: how many updates old the weights that acted were.

        Returns:
            Its statistics, named as the spec's ``metrics`` says; every value finite.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything but the model that a checkpoint must hold (optimisers, counts)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


Build = Callable[[Policy, BaseModel, nn.Module, Callable[[Tensor], Tensor] | None], Algorithm]
"""``build(model, train_config, train_model, all_reduce_mean)``: ``train_model`` is the module
to call in training (the DDP wrapper on K ranks), ``all_reduce_mean`` averages a tensor over
the ranks (``None`` on one), so global statistics make K ranks reproduce one."""
MakePolicy = Callable[[PolicySpec, int, BaseModel], Policy]
"""``policy(spec, n_agents, train_config)``: the policy an algorithm learns, when it is not the
actor-critic ``model`` describes (``spec``: ``model``'s architecture sized for the env)."""
MakeGroupedPolicy = Callable[[list[AgentGroup], int, BaseModel], Policy]
"""``grouped_policy(groups, action_dim, train_config)``: that policy over agent groups (each
group's spec at its own widths; ``action_dim``: the env's widest)."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """An algorithm's declaration; ``train.algorithm`` names one.

    Args:
        name: what ``train.algorithm`` says.
        build: see :data:`Build`.
        discrete, continuous: the action kinds it can learn.
        on_policy: learns from the batch just acted (off-policy algorithms replay).
        acting: what acting must record per step (a subset of :data:`ACTING_OUTPUTS`).
        layout: the batch layout it learns from (one of :data:`LAYOUTS`).
        metrics: the names its ``update`` returns, for dashboards and docs.
        memory: it trains policies with memory on whole chunks from their stored states
            (``model.memory`` is refused for an algorithm that does not).
        policy: builds the policy it learns (``None``: the actor-critic ``model`` describes).
        groups: it trains agent groups (``groups``; refused for an algorithm that does not).
            With its own ``policy``, ``grouped_policy`` builds the grouped one.
        grouped_policy: builds the policy it learns over agent groups.
        world_model: it learns from imagined batches (``world_model.enabled``).
    """

    name: str
    build: Build
    discrete: bool = True
    continuous: bool = True
    on_policy: bool = True
    acting: frozenset[str] = ACTING_OUTPUTS
    layout: str = "time_steps"
    metrics: tuple[str, ...] = ()
    memory: bool = False
    policy: MakePolicy | None = None
    groups: bool = True
    world_model: bool = True
    grouped_policy: MakeGroupedPolicy | None = None

    def check(
        self,
        action_kind: str,
        memory: bool = False,
        groups: bool = False,
        world_model: bool = False,
    ) -> None:
        """Refuse, in one line naming ``train.algorithm``, what this algorithm cannot learn.

        Args:
            action_kind: the env's.
            memory: the run's policy has memory (it must declare ``memory``).
            groups: the run has agent groups (it must declare ``groups``).
            world_model: the run imagines with a world model (it must declare
                ``world_model``).

        Raises:
            ValueError: an action kind it does not support, a policy with memory it cannot
                train, or a layout or acting output that shoal's rollouts do not build yet.
        """
        ok = self.discrete if action_kind == "discrete" else self.continuous
        if not ok:
            raise ValueError(
                f"train.algorithm={self.name} does not learn {action_kind} actions; choose "
                f"another algorithm ({', '.join(ALGORITHMS)}) or env.continuous_actions"
            )
        if memory and not self.memory:
            raise ValueError(
                f"train.algorithm={self.name} does not train policies with memory on "
                f"sequence chunks; use model.memory=none or train.algorithm=ppo"
            )
        grouped = self.groups and (self.policy is None or self.grouped_policy is not None)
        for asked, able, key in (
            (groups, grouped, "groups"),
            (world_model, self.world_model, "world_model"),
        ):
            if asked and not able:
                raise ValueError(
                    f"train.algorithm={self.name} does not train with {key} yet; remove "
                    f"{key} or use train.algorithm=ppo"
                )
        if self.layout not in BUILT_LAYOUTS or not self.acting <= ACTING_OUTPUTS:
            raise ValueError(
                f"train.algorithm={self.name} learns from {self.layout} batches acted with "
                f"{sorted(self.acting)}; shoal's rollouts give {sorted(BUILT_LAYOUTS)} with "
                f"{sorted(ACTING_OUTPUTS)}"
            )


def _ppo(
    model: Policy,
    cfg: BaseModel,
    train_model: nn.Module,
    all_reduce_mean: Callable[[Tensor], Tensor] | None,
) -> Algorithm:
    from agents.ppo import Learner, PPOConfig

    assert isinstance(cfg, PPOConfig)
    return Learner(model, cfg, train_model=train_model, all_reduce_mean=all_reduce_mean)


PPO = AlgorithmSpec(
    "ppo",
    _ppo,
    metrics=("policy_loss", "value_loss", "entropy", "approx_kl", "approx_kl_max", "clip_frac",
             "grad_norm", "behaviour_weight", "lr", "minibatches_done"),
    memory=True,
)  # fmt: skip
"""MAPPO / IPPO (``agents/ppo.py``): the critic the policy was built with decides which."""


def _value_decomposition(
    model: Policy,
    cfg: BaseModel,
    train_model: nn.Module,
    all_reduce_mean: Callable[[Tensor], Tensor] | None,
) -> Algorithm:
    from agents.value_decomposition import ValueDecomposition
    from policies.q import MixingPolicy

    assert isinstance(model, MixingPolicy)
    return ValueDecomposition(model, cfg, train_model, all_reduce_mean)


def _value_decomposition_spec(mixer: str) -> AlgorithmSpec:
    """QMIX or VDN, which differ only in the mixer (``QPolicy``, or ``GroupedQPolicy``)."""

    def mixing(cfg: BaseModel) -> tuple[int, float]:
        return int(getattr(cfg, "mixer_embed", 32)), float(getattr(cfg, "mixer_init_scale", 0.1))

    def policy(spec: PolicySpec, n_agents: int, cfg: BaseModel) -> Policy:
        from policies.q import QPolicy

        return QPolicy(spec, mixer, n_agents, *mixing(cfg))

    def grouped(groups: list[AgentGroup], action_dim: int, cfg: BaseModel) -> Policy:
        from policies.q import GroupedQPolicy

        return GroupedQPolicy(groups, mixer, action_dim, *mixing(cfg))

    return AlgorithmSpec(
        mixer, _value_decomposition, continuous=False, on_policy=False, layout="transitions",
        metrics=("q_loss", "q_taken", "q_target", "grad_norm", "epsilon", "replay_transitions",
                 "gradient_steps", "lr"),
        memory=True, policy=policy, world_model=False, grouped_policy=grouped,
    )  # fmt: skip


QMIX = _value_decomposition_spec("qmix")
"""QMIX (``agents/value_decomposition.py``): per-agent utilities, a monotonic mixer."""
VDN = _value_decomposition_spec("vdn")
"""VDN: per-agent utilities summed."""


def _soft_actor_critic(
    model: Policy,
    cfg: BaseModel,
    train_model: nn.Module,
    all_reduce_mean: Callable[[Tensor], Tensor] | None,
) -> Algorithm:
    from agents.soft_actor_critic import SoftActorCritic
    from policies.sac import GroupedSACPolicy, SACPolicy

    # gradients are averaged by the learner itself
    assert isinstance(model, (SACPolicy, GroupedSACPolicy))
    return SoftActorCritic(model, cfg, all_reduce_mean)


def _soft_actor_critic_spec(name: str) -> AlgorithmSpec:
    """MASAC or ISAC, which differ only in what the ``SACPolicy``'s critics read."""

    def policy(spec: PolicySpec, n_agents: int, cfg: BaseModel) -> Policy:
        from policies.sac import SACPolicy

        return SACPolicy(spec, n_agents, centralised=name == "masac")

    def grouped(groups: list[AgentGroup], action_dim: int, cfg: BaseModel) -> Policy:
        from policies.sac import GroupedSACPolicy

        kind = groups[0].spec.action_kind
        return GroupedSACPolicy(groups, name == "masac", kind, action_dim)

    return AlgorithmSpec(
        name, _soft_actor_critic, on_policy=False, layout="transitions",
        metrics=("q_loss", "actor_loss", "q_taken", "entropy", "grad_norm", "alpha",
                 "replay_transitions", "gradient_steps", "lr"),
        policy=policy, world_model=False, grouped_policy=grouped,
    )  # fmt: skip


MASAC = _soft_actor_critic_spec("masac")
"""MASAC (``agents/soft_actor_critic.py``): twin critics over the state and joint action."""
ISAC = _soft_actor_critic_spec("isac")
"""ISAC: each agent's twin critics read its own observation and action."""

#: Algorithms by name. One line each.
ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ppo": PPO, "qmix": QMIX, "vdn": VDN, "masac": MASAC, "isac": ISAC,
}  # fmt: skip


def algorithm_spec(name: str) -> AlgorithmSpec:
    """The spec ``train.algorithm`` names: a registered name or ``module:ATTRIBUTE``.

    Raises:
        ValueError: unknown name, a module that does not import, or an attribute that is not
            an :class:`AlgorithmSpec`; one line saying what is available.
    """
    if name in ALGORITHMS:
        return ALGORITHMS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise ValueError(
            f"unknown algorithm '{name}'; available: {', '.join(ALGORITHMS)} "
            "(or module:SPEC for one defined outside shoal)"
        )
    try:
        spec = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ValueError(f"cannot import algorithm module '{module}': {e}") from None
    except AttributeError:
        raise ValueError(f"module '{module}' has no '{attr}'") from None
    if not isinstance(spec, AlgorithmSpec):
        raise ValueError(f"'{name}' is a {type(spec).__name__}, not an AlgorithmSpec")
    return spec
