"""A learned world model over what agents observe: one transition, an ensemble for doubt.

The entity model (``policies/world_model.py``) needs an env that can turn imagined entity
graphs back into observations; this one needs nothing from the env. Its world is the
observation itself, split by shape into per-agent fields (``[B, N, ...]``: each agent's
observation vector, its action mask), world fields (``[B, ...]``: the global state a
centralised critic reads, entity graphs that are not one node per agent) and fields that do
not change (integer types, entity masks).

Each agent becomes a token of its squashed fields, its action, an "alive" flag and its
group's one-hot; one more token carries the world fields. Pre-norm transformer blocks mix the
tokens, so agents' interactions are learned inside the transition, where MAMBA puts its
attention; agent tokens have no positional encoding, so the model is permutation-equivariant
among the agents of a group and, when it reads no world fields, runs with any number of them.
Heads read, per agent, the change of its fields, its reward, whether it goes on (termination)
and its next action mask; from the world token, the change of the world fields.

The global state is predicted, not rebuilt from imagined observations: the centralised critic
learned on the env's state, and a stand-in built another way would be a different input.

Uncertainty comes from an ensemble of ``members`` networks on bootstrap samples, as in the
entity model; inputs are ``symlog``-squashed and targets learned in units of their running
scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.world_model import (
    _EnsembleBlock,
    _EnsembleLinear,
    _EnsembleNorm,
    encode_actions,
    symlog,
)

#: Fields no world model predicts: derived by ``Policy.prepare`` or tracked by imagination.
NOT_MODELLED = frozenset({"alive"})


@dataclass(frozen=True)
class Field:
    """One observation field in the model's layout.

    ``kind``: ``agent`` (float ``[B, N, *shape]``), ``world`` (float ``[B, *shape]``),
    ``mask`` (the bool per-agent action mask), ``fixed`` (copied from the start state).
    """

    key: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def width(self) -> int:
        """Numbers per agent (``agent``, ``mask``) or per world (``world``)."""
        return math.prod(self.shape)


def layout(example: dict[str, Tensor], n_agents: int) -> tuple[Field, ...]:
    """The fields of an observation dict of one world (``[1, ...]`` tensors), sorted by key."""
    fields = []
    for key in sorted(example):
        if key in NOT_MODELLED:
            continue
        v = example[key]
        shape = tuple(v.shape[1:])
        per_agent = len(shape) >= 1 and shape[0] == n_agents
        if key == "action_mask":
            kind = "mask"
        elif not v.is_floating_point():
            kind = "fixed"
        elif per_agent:
            kind = "agent"
        else:
            kind = "world"
        fields.append(Field(key, kind, shape[1:] if kind in ("agent", "mask") else shape, v.dtype))
    return tuple(fields)


class ObservationWorldModel(nn.Module):
    """An ensemble of transition models over agents' observation tokens.

    Args:
        fields: the layout (:func:`layout`).
        n_agents: ``N`` the layout was taken at (only world fields depend on it).
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: ``A``.
        groups: each agent's group index (``None``: one group); tokens carry its one-hot.
        hidden, layers, heads, members: as the entity model's.
        reward_from: what the reward head reads: ``"transition"``, the agent's token after
            the transformer (its observation and action, mixed with the others'); ``"next"``,
            that and the agent's predicted next observation, as Dreamer reads reward off the
            next state. Rewards are mostly functions of where a step ends (distances,
            collisions, deliveries), which the head then reads instead of working it out.
    """

    group_of_agent: Tensor
    delta_scale: Tensor
    world_scale: Tensor
    reward_scale: Tensor

    def __init__(
        self,
        fields: tuple[Field, ...],
        n_agents: int,
        action_kind: str,
        action_dim: int,
        groups: list[int] | None = None,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        members: int = 3,
        reward_from: str = "transition",
    ) -> None:
        super().__init__()
        if reward_from not in ("transition", "next"):
            raise ValueError(f"reward_from must be 'transition' or 'next', not {reward_from!r}")
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.fields, self.n_agents = fields, n_agents
        self.hidden, self.layers, self.heads = hidden, layers, heads
        self.action_kind, self.action_dim, self.members = action_kind, action_dim, members
        self.reward_from = reward_from
        self.agent_fields = [f for f in fields if f.kind == "agent"]
        self.world_fields = [f for f in fields if f.kind == "world"]
        self.mask_field = next((f for f in fields if f.kind == "mask"), None)
        self.agent_dim = sum(f.width for f in self.agent_fields)
        self.world_dim = sum(f.width for f in self.world_fields)
        self.mask_dim = self.mask_field.width if self.mask_field else 0
        self.n_groups = (max(groups) + 1) if groups else 1
        self.register_buffer(
            "group_of_agent",
            torch.tensor(groups if groups else [0] * n_agents, dtype=torch.long),
            persistent=False,
        )
        token_dim = self.agent_dim + self.mask_dim + action_dim + 1 + self.n_groups
        self.embed = _EnsembleLinear(members, token_dim, hidden)
        self.world_embed = _EnsembleLinear(members, max(self.world_dim, 1), hidden)
        self.blocks = nn.ModuleList(_EnsembleBlock(members, hidden, heads) for _ in range(layers))
        self.norm = _EnsembleNorm(members, hidden)
        self.delta = _EnsembleLinear(members, hidden, max(self.agent_dim, 1))
        self.world_delta = _EnsembleLinear(members, hidden, max(self.world_dim, 1))
        if reward_from == "next":  # the token and the predicted next fields, through a layer
            self.reward_hidden = _EnsembleLinear(members, hidden + max(self.agent_dim, 1), hidden)
        self.reward = _EnsembleLinear(members, hidden, 1)
        self.cont = _EnsembleLinear(members, hidden, 1)
        self.mask = _EnsembleLinear(members, hidden, max(self.mask_dim, 1))
        nn.init.constant_(self.cont.bias, 3.0)  # start from "goes on", as the entity model
        nn.init.constant_(self.mask.bias, 3.0)  # and from "every action legal"
        self.register_buffer("delta_scale", torch.ones(max(self.agent_dim, 1)))
        self.register_buffer("world_scale", torch.ones(max(self.world_dim, 1)))
        self.register_buffer("reward_scale", torch.ones(()))

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-able (a child process rebuilds the model)."""
        return {
            "fields": [[f.key, f.kind, list(f.shape), str(f.dtype)] for f in self.fields],
            "n_agents": self.n_agents, "action_kind": self.action_kind,
            "action_dim": self.action_dim, "groups": self.group_of_agent.tolist(),
            "hidden": self.hidden, "layers": self.layers, "heads": self.heads,
            "members": self.members, "reward_from": self.reward_from,
        }  # fmt: skip

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ObservationWorldModel:
        """The model :meth:`config` describes, freshly initialised."""
        fields = tuple(
            Field(key, kind, tuple(shape), getattr(torch, dtype.removeprefix("torch.")))
            for key, kind, shape, dtype in config["fields"]
        )
        rest = {k: v for k, v in config.items() if k != "fields"}
        return cls(fields, **rest)

    @property
    def keys(self) -> frozenset[str]:
        """The observation fields a world is made of (what replay keeps of each step)."""
        return frozenset(f.key for f in self.fields)

    # -- packing ----------------------------------------------------------------------------

    def agent_vector(self, world: dict[str, Tensor], alive: Tensor) -> Tensor:
        """The per-agent float fields as one ``[..., N, D]`` vector (``alive``: ``[..., N]``)."""
        lead = alive.shape
        parts = [world[f.key].reshape(*lead, -1) for f in self.agent_fields]
        if not parts:
            return torch.zeros(*lead, 1, device=alive.device)
        return torch.cat(parts, -1)

    def world_vector(self, world: dict[str, Tensor], lead: tuple[int, ...]) -> Tensor:
        """The world float fields as one ``[..., W]`` vector (one zero where there are none)."""
        if not self.world_fields:
            any_t = next(iter(world.values()))
            return torch.zeros(*lead, 1, device=any_t.device)
        return torch.cat([world[f.key].reshape(*lead, -1) for f in self.world_fields], -1)

    @staticmethod
    def _unpack(vec: Tensor, fields: list[Field]) -> dict[str, Tensor]:
        """Undo :meth:`agent_vector` / :meth:`world_vector`: each field at its own shape."""
        out, at = {}, 0
        for f in fields:
            out[f.key] = vec[..., at : at + f.width].reshape(*vec.shape[:-1], *f.shape)
            at += f.width
        return out

    def tokens(self, agents: Tensor, mask: Tensor | None, actions: Tensor, alive: Tensor) -> Tensor:
        """Agent tokens ``[..., N, T]``: squashed fields, mask, action, alive, group one-hot."""
        dtype = agents.dtype
        act = encode_actions(actions, self.action_kind, self.action_dim, dtype)
        live = alive.unsqueeze(-1).to(dtype)
        if self.n_groups == 1:  # one group: any number of agents
            group = torch.ones(*alive.shape, 1, dtype=dtype, device=alive.device)
        else:
            group = F.one_hot(self.group_of_agent, self.n_groups).to(dtype)
            group = group.expand(*alive.shape, self.n_groups)
        parts = [symlog(agents) * live]
        if self.mask_field is not None:
            assert mask is not None
            parts.append(mask.flatten(-1).to(dtype))
        parts += [act * live, live, group]
        return torch.cat(parts, -1)

    # -- the network ------------------------------------------------------------------------

    def run_members(
        self, tokens: Tensor, world: Tensor, alive: Tensor, agents: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Member ``k`` on its own worlds: ``tokens [K, B, N, T]``, ``world [K, B, W]``.

        ``agents [K, B, N, D]``: the agents' fields unsquashed (:meth:`agent_vector`), which
        a ``"next"`` reward head adds its member's predicted change to.

        Returns normalised agent deltas ``[K, B, N, D]``, world deltas ``[K, B, W]``,
        normalised rewards ``[K, B, N]``, continuation logits ``[K, B, N]`` and mask logits
        ``[K, B, N, A]``.
        """
        k, b, n, _ = tokens.shape
        e = n + 1
        x_agents = self.embed(tokens.reshape(k, b * n, -1)).view(k, b, n, -1)
        x_world = self.world_embed(symlog(world)).view(k, b, 1, -1)
        x = F.relu(torch.cat([x_agents, x_world], 2)).reshape(k, b * e, -1)
        exists = torch.cat([alive, torch.ones_like(alive[..., :1])], -1)
        key_mask = exists.reshape(k * b, 1, 1, e)
        for block in self.blocks:
            x = block(x, e, key_mask)
        h = self.norm(x).view(k, b, e, -1)
        agent_h = h[:, :, :n].reshape(k, b * n, -1)
        world_h = h[:, :, n]
        delta = self.delta(agent_h)
        reward_in = agent_h
        if self.reward_from == "next":
            # The change is not taught through the reward: its own loss says what it is.
            nxt = agents.reshape(k, b * n, -1) + delta.detach() * self.delta_scale
            reward_in = F.relu(self.reward_hidden(torch.cat([agent_h, symlog(nxt)], -1)))
        return (
            delta.view(k, b, n, -1),
            self.world_delta(world_h),
            self.reward(reward_in).view(k, b, n),
            self.cont(agent_h).view(k, b, n),
            self.mask(agent_h).view(k, b, n, -1),
        )

    def forward(
        self, world: dict[str, Tensor], actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Every member's normalised prediction for the same worlds (see :meth:`run_members`)."""
        k = self.members
        mask = world.get(self.mask_field.key) if self.mask_field else None
        agents = self.agent_vector(world, alive)
        tokens = self.tokens(agents, mask, actions, alive)
        wv = self.world_vector(world, tuple(alive.shape[:-1]))
        return self.run_members(
            tokens.expand(k, *tokens.shape), wv.expand(k, *wv.shape),
            alive.expand(k, *alive.shape), agents.expand(k, *agents.shape),
        )  # fmt: skip

    @torch.no_grad()
    def predict(
        self,
        world: dict[str, Tensor],
        actions: Tensor,
        alive: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor]:
        """One imagined step: each world follows one member drawn at random.

        Returns:
            ``(next_world, reward [B, N], continue_prob [B, N], disagreement [B])``; the
            disagreement is the members' spread of predicted agent deltas in units of their
            scale, averaged over the world's living agents.
        """
        delta, wdelta, reward, cont, mask_logits = self(world, actions, alive)
        k, b = delta.shape[:2]
        device = alive.device
        pick = torch.randint(k, (b,), generator=generator, device=device)
        rows = torch.arange(b, device=device)
        live = alive.unsqueeze(-1).to(delta.dtype)
        nxt: dict[str, Tensor] = {}
        if self.agent_fields:
            cur = self.agent_vector(world, alive)
            nxt.update(
                self._unpack(cur + delta[pick, rows] * self.delta_scale * live, self.agent_fields)
            )
        if self.world_fields:
            cur_w = self.world_vector(world, (b,))
            nxt.update(
                self._unpack(cur_w + wdelta[pick, rows] * self.world_scale, self.world_fields)
            )
        if self.mask_field is not None:
            legal = mask_logits[pick, rows] > 0
            none = ~legal.any(-1, keepdim=True)  # an agent left without a legal action keeps its
            legal = torch.where(none, world[self.mask_field.key], legal)  # last mask
            nxt[self.mask_field.key] = legal.reshape(world[self.mask_field.key].shape)
        for f in self.fields:
            if f.kind == "fixed":
                nxt[f.key] = world[f.key]
        spread = delta.std(0).mean(-1) if k > 1 else torch.zeros_like(delta[0, ..., 0])
        alive_f = alive.to(spread.dtype)
        disagreement = (spread * alive_f).sum(-1) / alive_f.sum(-1).clamp(min=1)
        return (
            nxt,
            reward[pick, rows] * self.reward_scale,
            torch.sigmoid(cont[pick, rows]),
            disagreement,
        )
