"""A learned multi-agent world model over entity sets: one transition, an ensemble for doubt.

Each entity (agents first, then landmarks or obstacles, as every shoal env lays out its graph)
becomes a token of its features and, for agents, its action. A transformer encoder mixes the
tokens, so the agents' interactions (collisions, who covers which landmark) are learned inside
the transition, where MAMBA puts its attention block; there is no positional encoding, so
the model is permutation-equivariant over entities and runs with any number of them, like the
graph and transformer policies. Heads read, per entity, the change of its features; per agent,
its reward; per world, whether the episode continues.

An ensemble of ``members`` independent networks trained on different bootstrap samples gives
the model's uncertainty: where members disagree it does not know (Chua et al., 2018; MBPO).

Inputs are ``symlog``-squashed and targets are predicted in units of their running scale
(DreamerV3's robustness recipe, kept to the two tricks a small vector task needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.mlp import mlp


def symlog(x: Tensor) -> Tensor:
    """``sign(x) log(1 + |x|)``: keeps large inputs from dominating without clipping them."""
    return torch.sign(x) * torch.log1p(x.abs())


class _Member(nn.Module):
    """One transition network of the ensemble."""

    def __init__(self, token_dim: int, node_dim: int, hidden: int, layers: int, heads: int):
        super().__init__()
        self.embed = mlp(token_dim, hidden, 1)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.delta = nn.Linear(hidden, node_dim)
        self.reward = nn.Linear(hidden, 1)
        self.cont = nn.Linear(hidden, 1)
        # Most steps do not end an episode: start from "continues" (p = 0.95), so an untrained
        # model does not cut imagined branches short before it has seen a termination.
        nn.init.constant_(self.cont.bias, 3.0)

    def forward(
        self, tokens: Tensor, node_mask: Tensor, n_agents: int, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        h = self.encoder(self.embed(tokens), src_key_padding_mask=~node_mask)
        agents = h[:, :n_agents]
        weight = alive.unsqueeze(-1).to(h.dtype)
        pooled = (agents * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        return self.delta(h), self.reward(agents).squeeze(-1), self.cont(pooled).squeeze(-1)


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
        token_dim = node_dim + action_dim + 1  # features, action, "is an acting agent"
        self.members = nn.ModuleList(
            _Member(token_dim, node_dim, hidden, layers, heads) for _ in range(members)
        )
        # Targets are learned in units of their scale; the trainer keeps these up to date and
        # they travel with the weights.
        self.register_buffer("delta_scale", torch.ones(node_dim))
        self.register_buffer("reward_scale", torch.ones(()))

    def tokens(self, nodes: Tensor, actions: Tensor, alive: Tensor) -> Tensor:
        """One token per entity: squashed features, the agent's action, an acting-agent flag."""
        b, e, _ = nodes.shape
        n = alive.shape[1]
        if self.action_kind == "discrete":
            act = F.one_hot(actions.long().clamp(min=0), self.action_dim).to(nodes.dtype)
        else:
            act = actions.to(nodes.dtype)
        act = act * alive.unsqueeze(-1).to(nodes.dtype)
        per_entity = torch.zeros(b, e, self.action_dim + 1, dtype=nodes.dtype, device=nodes.device)
        per_entity[:, :n, : self.action_dim] = act
        per_entity[:, :n, -1] = alive.to(nodes.dtype)
        return torch.cat([symlog(nodes), per_entity], dim=-1)

    def forward(
        self, nodes: Tensor, node_mask: Tensor, actions: Tensor, alive: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Every member's normalised prediction (see Shapes)."""
        tokens = self.tokens(nodes, actions, alive)
        n = alive.shape[1]
        outs = [m(tokens, node_mask, n, alive) for m in self.members]
        delta, reward, cont = (torch.stack(x) for x in zip(*outs, strict=True))
        return delta, reward, cont

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
