"""A learned multi-agent world model over entity sets: one transition, an ensemble for doubt.

Each entity (agents first, then landmarks or obstacles, as every shoal env lays out its graph)
becomes a token of its features and, for agents, its action. Pre-norm transformer blocks mix the
tokens, so the agents' interactions (collisions, who covers which landmark) are learned inside
the transition, where MAMBA puts its attention block; there is no positional encoding, so
the model is permutation-equivariant over entities and runs with any number of them, like the
graph and transformer policies. Heads read, per entity, the change of its features; per agent,
its reward; per world, whether the episode continues.

An ensemble of ``members`` independent networks trained on different bootstrap samples gives
the model's uncertainty: where members disagree it does not know (Chua et al., 2018; MBPO).
The members' weights are stacked, so the ensemble runs as one batched computation rather than
``members`` small ones.

Inputs are ``symlog``-squashed and targets are predicted in units of their running scale
(DreamerV3's robustness recipe, kept to the two tricks a small vector task needs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def symlog(x: Tensor) -> Tensor:
    """``sign(x) log(1 + |x|)``: keeps large inputs from dominating without clipping them."""
    return torch.sign(x) * torch.log1p(x.abs())


def encode_actions(actions: Tensor, kind: str, dim: int, dtype: torch.dtype) -> Tensor:
    """Agents' actions as token features: one-hot of ``dim`` (discrete) or the vector itself."""
    if kind == "discrete":
        return F.one_hot(actions.long().clamp(min=0), dim).to(dtype)
    return actions.to(dtype)


class _EnsembleLinear(nn.Module):
    """``K`` independent linear maps applied at once: ``[K, M, I] -> [K, M, O]``."""

    def __init__(self, k: int, d_in: int, d_out: int) -> None:
        super().__init__()
        bound = d_in**-0.5  # nn.Linear's default initialisation, per member
        self.weight = nn.Parameter(torch.empty(k, d_in, d_out).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k, 1, d_out).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class _EnsembleNorm(nn.Module):
    """Layer norm with a gain and bias per member: ``[K, M, H]``."""

    def __init__(self, k: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, 1, hidden))
        self.bias = nn.Parameter(torch.zeros(k, 1, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:]) * self.weight + self.bias


class _EnsembleBlock(nn.Module):
    """A pre-norm transformer block of every member: attention among a world's entities."""

    def __init__(self, k: int, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = _EnsembleNorm(k, hidden), _EnsembleNorm(k, hidden)
        self.qkv = _EnsembleLinear(k, hidden, 3 * hidden)
        self.out = _EnsembleLinear(k, hidden, hidden)
        self.ff1 = _EnsembleLinear(k, hidden, 2 * hidden)
        self.ff2 = _EnsembleLinear(k, 2 * hidden, hidden)

    def forward(self, x: Tensor, e: int, key_mask: Tensor) -> Tensor:
        """``x [K, B*E, H]``; ``key_mask [K*B, 1, 1, E]``, true where an entity exists."""
        k, m, h = x.shape
        b, d = m // e, h // self.heads
        qkv = self.qkv(self.norm1(x)).view(k * b, e, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=key_mask)
        x = x + self.out(att.transpose(1, 2).reshape(k, m, h))
        return x + self.ff2(F.relu(self.ff1(self.norm2(x))))


class EntityWorldModel(nn.Module):
    """An ensemble of entity-set transition models.

    Args:
        node_dim: ``F``, features per entity.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: ``A``: number of discrete actions, or the width of a continuous action.
        hidden: token width.
        layers: transformer layers per member.
        heads: attention heads.
        members: ensemble size.

    Shapes:
        - nodes: ``[B, E, F]`` with the ``N`` agents first; node_mask ``[B, E]`` bool.
        - actions: ``[B, N]`` long (discrete) or ``[B, N, A]`` float; alive ``[B, N]`` bool.
        - forward returns per member: normalised deltas ``[K, B, E, F]``, normalised
          rewards ``[K, B, N]`` and continuation logits ``[K, B]``.
    """

    delta_scale: Tensor
    reward_scale: Tensor

    def __init__(
        self,
        node_dim: int,
        action_kind: str,
        action_dim: int,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        members: int = 3,
    ) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.node_dim, self.action_kind, self.action_dim = node_dim, action_kind, action_dim
        self.hidden, self.layers, self.heads = hidden, layers, heads
        token_dim = node_dim + action_dim + 1  # features, action, "is an acting agent"
        self.members = members
        # Every member's weights in one tensor per layer, so the ensemble runs as one batch.
        self.embed = _EnsembleLinear(members, token_dim, hidden)
        self.blocks = nn.ModuleList(_EnsembleBlock(members, hidden, heads) for _ in range(layers))
        self.norm = _EnsembleNorm(members, hidden)
        self.delta = _EnsembleLinear(members, hidden, node_dim)
        self.reward = _EnsembleLinear(members, hidden, 1)
        self.cont = _EnsembleLinear(members, hidden, 1)
        # Most steps do not end an episode: start from "continues" (p = 0.95), so an untrained
        # model does not cut imagined branches short before it has seen a termination.
        nn.init.constant_(self.cont.bias, 3.0)
        # Targets are learned in units of their scale; the trainer keeps these up to date and
        # they travel with the weights.
        self.register_buffer("delta_scale", torch.ones(node_dim))
        self.register_buffer("reward_scale", torch.ones(()))

    def config(self) -> dict[str, Any]:
        """The constructor's arguments, JSON-able (a child process rebuilds the model)."""
        return {
            "node_dim": self.node_dim, "action_kind": self.action_kind,
            "action_dim": self.action_dim, "hidden": self.hidden, "layers": self.layers,
            "heads": self.heads, "members": self.members,
        }  # fmt: skip

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> EntityWorldModel:
        """The model :meth:`config` describes, freshly initialised."""
        return cls(**config)

    def tokens(self, nodes: Tensor, actions: Tensor, alive: Tensor) -> Tensor:
        """One token per entity: squashed features, the agent's action, an acting-agent flag."""
        b, e, _ = nodes.shape
        n = alive.shape[1]
        act = encode_actions(actions, self.action_kind, self.action_dim, nodes.dtype)
        act = act * alive.unsqueeze(-1).to(nodes.dtype)
        per_entity = torch.zeros(b, e, self.action_dim + 1, dtype=nodes.dtype, device=nodes.device)
        per_entity[:, :n, : self.action_dim] = act
        per_entity[:, :n, -1] = alive.to(nodes.dtype)
        return torch.cat([symlog(nodes), per_entity], dim=-1)

    def run_members(
        self, tokens: Tensor, node_mask: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Member ``k`` on its own worlds ``tokens[k]``: ``[K, B, E, T]``, masks ``[K, B, ...]``.

        Returns normalised deltas ``[K, B, E, F]``, rewards ``[K, B, N]``, continuation
        logits ``[K, B]`` (training gives each member its own bootstrap sample this way).
        """
        k, b, e, _ = tokens.shape
        n = alive.shape[-1]
        key_mask = node_mask.reshape(k * b, 1, 1, e)
        x = F.relu(self.embed(tokens.reshape(k, b * e, -1)))
        for block in self.blocks:
            x = block(x, e, key_mask)
        h = self.norm(x)
        delta = self.delta(h).view(k, b, e, -1)
        agents = h.view(k, b, e, -1)[:, :, :n]
        reward = self.reward(agents.reshape(k, b * n, -1)).view(k, b, n)
        weight = alive.unsqueeze(-1).to(h.dtype)
        pooled = (agents * weight).sum(2) / weight.sum(2).clamp(min=1.0)
        return delta, reward, self.cont(pooled).view(k, b)

    def forward(
        self, nodes: Tensor, node_mask: Tensor, actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every member's normalised prediction for the same worlds (see Shapes)."""
        k = self.members
        tokens = self.tokens(nodes, actions, alive)
        return self.run_members(
            tokens.expand(k, *tokens.shape),
            node_mask.expand(k, *node_mask.shape),
            alive.expand(k, *alive.shape),
        )

    @torch.no_grad()
    def predict(
        self,
        nodes: Tensor,
        node_mask: Tensor,
        actions: Tensor,
        alive: Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One imagined step: each world follows one member drawn at random (as MBPO does).

        Returns:
            ``(next_nodes [B, E, F], reward [B, N], continue_prob [B], disagreement [B])``;
            disagreement is the members' spread of predicted next features, in units of
            their scale, averaged over the world's entities.
        """
        delta, reward, cont = self(nodes, node_mask, actions, alive)
        k, b = delta.shape[:2]
        pick = torch.randint(k, (b,), generator=generator, device=nodes.device)
        rows = torch.arange(b, device=nodes.device)
        mask = node_mask.unsqueeze(-1).to(nodes.dtype)
        next_nodes = nodes + delta[pick, rows] * self.delta_scale * mask
        spread = delta.std(0).mean(-1) if k > 1 else torch.zeros_like(delta[0, ..., 0])
        disagreement = (spread * node_mask).sum(-1) / node_mask.sum(-1).clamp(min=1)
        return (
            next_nodes,
            reward[pick, rows] * self.reward_scale,
            torch.sigmoid(cont[pick, rows]),
            disagreement,
        )
