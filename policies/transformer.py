"""Entity transformer policies: self-attention over the set of entities, masks for padding.

Like the GNN, the transformer has no positional encoding over the entity axis, so it is
permutation-equivariant over agents and runs on any number of entities.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.distributions import ActionHead, Distribution
from policies.mlp import mlp


class EntityTransformer(nn.Module):
    """``nn.TransformerEncoder`` over entity tokens.

    Args:
        node_dim: entity feature width ``F``.
        hidden: model width.
        layers: encoder layers.
        heads: attention heads.

    Shapes:
        - input: ``nodes [B, E, F]``, ``node_mask [B, E]``.
        - output: ``[B, E, hidden]``; padded entities get zeros.
    """

    def __init__(self, node_dim: int, hidden: int = 64, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.embed = mlp(node_dim, hidden, 1)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.hidden = hidden

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Embeddings for every entity."""
        mask = batch["node_mask"]
        h = self.encoder(self.embed(batch["nodes"]), src_key_padding_mask=~mask)
        return h * mask.unsqueeze(-1)


class TransformerActor(nn.Module):
    """Per-agent actions from the agent tokens (the first ``N`` entities)."""

    def __init__(self, node_dim: int, action_kind: str, action_dim: int, **kw: int) -> None:
        super().__init__()
        self.encoder = EntityTransformer(node_dim, **kw)
        self.head = ActionHead(self.encoder.hidden, action_kind, action_dim)

    def forward(self, batch: dict[str, Tensor]) -> Distribution:
        """Action distribution ``[B, N]``."""
        n = batch["alive"].shape[-1]
        return self.head(self.encoder(batch)[:, :n], batch.get("action_mask"))


class TransformerCritic(nn.Module):
    """Per-agent values; centralised critics add a pooled view of every entity."""

    def __init__(self, node_dim: int, centralised: bool = True, **kw: int) -> None:
        super().__init__()
        self.encoder = EntityTransformer(node_dim, **kw)
        h = self.encoder.hidden
        self.centralised = centralised
        self.out = mlp(h * (2 if centralised else 1), h, 1, 1)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Values ``[B, N]``."""
        n = batch["alive"].shape[-1]
        h = self.encoder(batch)
        x = h[:, :n]
        if self.centralised:
            m = batch["node_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
            x = torch.cat([x, pooled.unsqueeze(1).expand_as(x)], dim=-1)
        return self.out(x).squeeze(-1)
