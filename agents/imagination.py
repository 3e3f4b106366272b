"""Practising inside a world: imagined branches from real states, and open-loop checks.

:func:`imagine` rolls the *current* policy from real start states for ``H`` steps through a
:class:`Dynamics` (the learned model, or the true env for the oracle arm) and returns a
:class:`~agents.rollout.RolloutBatch` marked ``imagined``, which the learner consumes like
any other batch. :func:`open_loop` rolls the model alone from real states, for ``shoal
dream`` and the benchmarks' k-step errors. Runs wherever the learner does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from agents.rollout import RolloutBatch, StepLog
from envs.base import Observation, VecMultiAgentEnv
from policies.actor_critic import Policy
from policies.memory import MEMORY, MemoryState
from policies.observation_model import ObservationWorldModel
from policies.world_model import EntityWorldModel

Observe = Callable[[Tensor], Observation]
"""Entity features ``[B, E, F]`` to what the agents would see (``env.observe_entities``)."""


class Dynamics(Protocol):
    """One imagined step of ``B`` worlds: the learned model, or the true env (oracle)."""

    def step(
        self, nodes: Tensor, node_mask: Tensor, actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(next_nodes, reward [B, N], continue_prob [B], disagreement [B])``."""
        ...


class LearnedDynamics:
    """The ensemble's prediction, one member drawn per world and step."""

    def __init__(self, model: EntityWorldModel, generator: torch.Generator | None = None):
        self.model, self.generator = model, generator

    def step(
        self, nodes: Tensor, node_mask: Tensor, actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """See :class:`Dynamics`."""
        return self.model.predict(nodes, node_mask, actions, alive, self.generator)


class EnvDynamics:
    """The true env as the model (the oracle arm): it must offer ``set_entities(nodes)``.

    Args:
        env: an env with as many worlds as imagination starts; it is re-placed in the given
            states before every step, so its own episode clock never runs out.
    """

    def __init__(self, env: VecMultiAgentEnv) -> None:
        if not hasattr(env, "set_entities"):
            raise ValueError(f"{type(env).__name__} cannot be put in a given state")
        self.env = env

    def step(
        self, nodes: Tensor, node_mask: Tensor, actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """See :class:`Dynamics`."""
        self.env.set_entities(nodes)  # type: ignore[attr-defined]
        res = self.env.step(actions)
        b = nodes.shape[0]
        cont = (~res.terminated.all(-1)).to(nodes.dtype)
        return res.final.nodes, res.reward, cont, torch.zeros(b, device=nodes.device)


@dataclass(frozen=True)
class Kept:
    """What replay keeps of each real step for a kind of world.

    Args:
        keys: observation fields a world is made of (kept at each step).
        next_keys: of those, the ones that change (kept at the next step too).
        agent_cont: agents' terminations one by one, not only the world's.
    """

    keys: tuple[str, ...]
    next_keys: tuple[str, ...]
    agent_cont: bool = False


#: Entity graphs: what the entity model and the oracle step.
ENTITY = Kept(("nodes", "node_mask"), ("nodes",))


class World(Protocol):
    """What imagination steps: the world's fields, how agents see them, one step of them."""

    kept: Kept
    """What a world is made of (replay keeps it)."""
    learned: bool
    """A learned model (scored on every new batch), not the true env."""

    def observe(self, world: dict[str, Tensor]) -> dict[str, Tensor]:
        """The observation dict the policy reads in these worlds (without ``alive``)."""
        ...

    def step(
        self, world: dict[str, Tensor], actions: Tensor, alive: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """``(next_world, reward [B, N], continue_prob [B] or [B, N], disagreement [B])``."""
        ...

    def distance(
        self, pred: dict[str, Tensor], real: dict[str, Tensor], alive: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Per-item distance of a predicted world from the real one, and the items' weights."""
        ...


class EntityWorld:
    """Worlds as entity graphs, stepped by the entity model or the true env (the oracle).

    Args:
        dynamics: :class:`LearnedDynamics` or :class:`EnvDynamics`.
        observe: entity graphs to observations (``env.observe_entities``).
    """

    kept = ENTITY

    def __init__(self, dynamics: Dynamics, observe: Observe) -> None:
        self.dynamics, self._observe = dynamics, observe
        self.learned = not isinstance(dynamics, EnvDynamics)

    def observe(self, world: dict[str, Tensor]) -> dict[str, Tensor]:
        """See :class:`World`."""
        return self._observe(world["nodes"]).as_dict()

    def step(
        self, world: dict[str, Tensor], actions: Tensor, alive: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """See :class:`World`."""
        nxt, reward, cont, doubt = self.dynamics.step(
            world["nodes"], world["node_mask"], actions, alive
        )
        return {"nodes": nxt, "node_mask": world["node_mask"]}, reward, cont, doubt

    def distance(
        self, pred: dict[str, Tensor], real: dict[str, Tensor], alive: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Entity feature vectors' distance (the env's own units), weighted by entity masks."""
        weight = real["node_mask"].to(pred["nodes"].dtype)
        return (pred["nodes"] - real["nodes"]).norm(dim=-1), weight


class ObservationWorld:
    """Worlds as what the agents observe, stepped by an :class:`ObservationWorldModel`."""

    learned = True

    def __init__(
        self, model: ObservationWorldModel, generator: torch.Generator | None = None
    ) -> None:
        self.model, self.generator = model, generator
        changing = tuple(f.key for f in model.fields if f.kind != "fixed")
        self.kept = Kept(tuple(f.key for f in model.fields), changing, agent_cont=True)

    def observe(self, world: dict[str, Tensor]) -> dict[str, Tensor]:
        """See :class:`World`: the world is the observation."""
        return dict(world)

    def step(
        self, world: dict[str, Tensor], actions: Tensor, alive: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """See :class:`World`."""
        return self.model.predict(world, actions, alive, self.generator)

    def distance(
        self, pred: dict[str, Tensor], real: dict[str, Tensor], alive: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Each agent's observation vector's distance, weighted by whether it lives."""
        p, r = self.model.agent_vector(pred, alive), self.model.agent_vector(real, alive)
        return (p - r).norm(dim=-1), alive.to(p.dtype)


def kept_for(model: EntityWorldModel | ObservationWorldModel) -> Kept:
    """What replay keeps for ``model``'s kind of world."""
    if isinstance(model, ObservationWorldModel):
        return ObservationWorld(model).kept
    return ENTITY


@torch.no_grad()
def imagine(
    policy: Policy,
    world: World,
    starts: dict[str, Tensor],
    horizon: int,
    max_disagreement: float | None = None,
    weights_version: int = 0,
) -> RolloutBatch:
    """Roll ``policy`` for ``horizon`` steps through ``world`` from real ``starts``.

    Every world ends at the horizon as a truncation, so GAE bootstraps it from the critic. A
    world whose ensemble disagreement exceeds ``max_disagreement`` is cut there the same way
    and its later steps are masked (``alive`` false), so PPO learns only where the model knows.
    An agent the model ends is terminated there and masked after, as a real one would be.

    Args:
        policy: the current policy and critic.
        world: what steps the worlds and how agents see them.
        starts: ``world.kept.keys`` and ``alive`` of ``B`` real states.
        horizon: ``H``.
        max_disagreement: cut worlds where the model is this unsure (``None``: never).
        weights_version: the policy version acting, recorded on the batch.

    Returns:
        A ``[H, B]`` batch with ``imagined=True`` and no finished episodes.
    """
    state = {k: starts[k] for k in world.kept.keys}
    alive = starts["alive"].clone()
    b, device = alive.shape[0], alive.device
    keys = policy.input_keys
    log = StepLog()
    obs = world.observe(state)
    obs["alive"] = alive.clone()
    memory = MemoryState(policy.memory_size)
    if MEMORY in starts:  # the real state the branch starts from, where the replay kept it
        memory.state = starts[MEMORY]
    obs = policy.prepare(memory.feed(obs))
    action, logp, value, carried = policy.act(obs)
    for t in range(horizon):
        seen = {k: v for k, v in obs.items() if k in keys}
        state, reward, cont, disagreement = world.step(state, action, alive)
        if cont.dim() == 1:
            cont = cont.unsqueeze(-1)
        terminated = (cont < 0.5) & alive
        cut = torch.zeros(b, dtype=torch.bool, device=device)
        if max_disagreement is not None:
            cut = disagreement > max_disagreement
        truncated = cut | (t == horizon - 1)
        log.add(seen, action, logp, value, reward * alive, terminated, truncated)
        obs = world.observe(state)
        alive = alive & ~terminated & ~cut.unsqueeze(-1)  # later steps of cut worlds: masked
        obs["alive"] = alive.clone()
        memory.advance(carried, torch.zeros_like(cut), alive)
        obs = policy.prepare(memory.feed(obs))
        action, logp, value, carried = policy.act(obs)
        log.bootstrap(value)
    empty = torch.zeros(0, device=device)
    return log.batch(empty, empty.long(), weights_version, imagined=True)


@torch.no_grad()
def open_loop(
    world: World, state: dict[str, Tensor], alive: Tensor, actions: list[Tensor]
) -> list[dict[str, Tensor]]:
    """The model's own rollout of given actions from ``state``: ``len(actions) + 1`` worlds.

    Nothing real is fed back after the start, so errors compound as they would in
    imagination; this is how k-step errors are measured.
    """
    out = [state]
    for a in actions:
        state, *_ = world.step(state, a, alive)
        out.append(state)
    return out


@torch.no_grad()
def open_loop_error(
    world: World, batch: RolloutBatch, ks: list[int], worlds: int = 256
) -> tuple[dict[int, float], dict[int, float]]:
    """The model's ``k``-step open-loop error on a real batch, and that of "repeat".

    Both for each ``k`` the batch can hold; "repeat" guesses the first world, unchanged.
    From one step of up to ``worlds`` worlds whose episode runs on for ``max(ks)`` steps, the
    model replays the batch's actions alone; the error after ``k`` steps is the mean distance
    between predicted and real worlds (``world.distance``: the env's own units).
    """
    t_len = batch.rewards.shape[0]
    ks = [k for k in ks if k < t_len]
    if not ks:
        return {}, {}
    k_max = max(ks)
    start = t_len - 1 - k_max
    ended = batch.truncated | batch.terminated.all(-1)  # [T, B]
    ok = (~ended[start : start + k_max].any(0)).nonzero().squeeze(-1)[:worlds]
    if ok.numel() == 0:
        return {}, {}
    alive = batch.obs["alive"][start, ok]
    state = {k: batch.obs[k][start, ok] for k in world.kept.keys}
    acts = [batch.actions[start + j, ok] for j in range(k_max)]
    states = open_loop(world, state, alive, acts)
    model: dict[int, float] = {}
    repeat: dict[int, float] = {}
    for k in ks:
        real = {key: batch.obs[key][start + k, ok] for key in world.kept.keys}
        for out, guess in ((model, states[k]), (repeat, state)):
            dist, weight = world.distance(guess, real, alive)
            out[k] = float((dist * weight).sum() / weight.sum().clamp(min=1))
    return model, repeat
