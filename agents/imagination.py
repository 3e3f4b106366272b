"""Practising inside a world: imagined branches from real states, and open-loop checks.

:func:`imagine` rolls the *current* policy from real start states for ``H`` steps through a
:class:`Dynamics` (the learned model, or the true env for the oracle arm) and returns a
:class:`~agents.rollout.RolloutBatch` marked ``imagined``, which the learner consumes like
any other batch. :func:`open_loop` rolls the model alone from real states, for ``shoal
dream`` and the benchmarks' k-step errors. Runs wherever the learner does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from agents.rollout import RolloutBatch, StepLog
from envs.base import Observation, VecMultiAgentEnv
from policies.actor_critic import Policy
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


@torch.no_grad()
def imagine(
    policy: Policy,
    dynamics: Dynamics,
    observe: Observe,
    starts: dict[str, Tensor],
    horizon: int,
    max_disagreement: float | None = None,
    weights_version: int = 0,
) -> RolloutBatch:
    """Roll ``policy`` for ``horizon`` steps through ``dynamics`` from real ``starts``.

    Every world ends at the horizon as a truncation, so GAE bootstraps it from the critic. A
    world whose ensemble disagreement exceeds ``max_disagreement`` is cut there the same way
    and its later steps are masked (``alive`` false), so PPO learns only where the model knows.

    Args:
        policy: the current policy and critic.
        dynamics: what steps the worlds.
        observe: entity features to observations.
        starts: ``nodes``, ``node_mask`` and ``alive`` of ``B`` real states.
        horizon: ``H``.
        max_disagreement: cut worlds where the model is this unsure (``None``: never).
        weights_version: the policy version acting, recorded on the batch.

    Returns:
        A ``[H, B]`` batch with ``imagined=True`` and no finished episodes.
    """
    nodes, node_mask = starts["nodes"], starts["node_mask"]
    alive = starts["alive"].clone()
    b = nodes.shape[0]
    keys = policy.input_keys
    log = StepLog()
    obs = observe(nodes).as_dict()
    obs["alive"] = alive.clone()
    obs = policy.prepare(obs)
    action, logp, value = policy.act(obs)
    for t in range(horizon):
        seen = {k: v for k, v in obs.items() if k in keys}
        nxt, reward, cont, disagreement = dynamics.step(nodes, node_mask, action, alive)
        terminated = (cont < 0.5).unsqueeze(-1) & alive
        cut = torch.zeros(b, dtype=torch.bool, device=nodes.device)
        if max_disagreement is not None:
            cut = disagreement > max_disagreement
        truncated = cut | (t == horizon - 1)
        log.add(seen, action, logp, value, reward * alive, terminated, truncated)
        nodes = nxt
        obs = observe(nodes).as_dict()
        alive = alive & ~terminated & ~cut.unsqueeze(-1)  # later steps of cut worlds: masked
        obs["alive"] = alive.clone()
        obs = policy.prepare(obs)
        action, logp, value = policy.act(obs)
        log.bootstrap(value)
    empty = torch.zeros(0, device=nodes.device)
    return log.batch(empty, empty.long(), weights_version, imagined=True)


@torch.no_grad()
def open_loop(
    model: EntityWorldModel,
    nodes: Tensor,
    node_mask: Tensor,
    alive: Tensor,
    actions: list[Tensor],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The model's own rollout of given actions from ``nodes``: ``[len(actions) + 1, B, E, F]``.

    Nothing real is fed back after the start, so errors compound as they would in
    imagination; this is how k-step errors are measured.
    """
    out = [nodes]
    for a in actions:
        nodes, *_ = model.predict(nodes, node_mask, a, alive, generator)
        out.append(nodes)
    return torch.stack(out)


@torch.no_grad()
def open_loop_error(
    model: EntityWorldModel,
    batch: RolloutBatch,
    ks: list[int],
    worlds: int = 256,
    generator: torch.Generator | None = None,
) -> dict[int, float]:
    """The model's ``k``-step open-loop error on a real batch, for each ``k`` it can hold.

    From one step of up to ``worlds`` worlds whose episode runs on for ``max(ks)`` steps, the
    model replays the batch's actions alone; the error after ``k`` steps is the mean distance
    between predicted and real entity feature vectors (the env's own units).
    """
    nodes, mask = batch.obs["nodes"], batch.obs["node_mask"]
    t_len = nodes.shape[0]
    ks = [k for k in ks if k < t_len]
    if not ks:
        return {}
    k_max = max(ks)
    start = t_len - 1 - k_max
    ended = batch.truncated | batch.terminated.all(-1)  # [T, B]
    ok = (~ended[start : start + k_max].any(0)).nonzero().squeeze(-1)[:worlds]
    if ok.numel() == 0:
        return {}
    m = mask[start, ok]
    acts = [batch.actions[start + j, ok] for j in range(k_max)]
    pred = open_loop(model, nodes[start, ok], m, batch.obs["alive"][start, ok], acts, generator)
    weight = m.to(nodes.dtype)
    out = {}
    for k in ks:
        dist = (pred[k] - nodes[start + k, ok]).norm(dim=-1)
        out[k] = float((dist * weight).sum() / weight.sum().clamp(min=1))
    return out
