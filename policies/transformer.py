"""Entity transformer policies: self-attention over the set of entities, masks for padding.

Like the GNN, the transformer has no positional encoding over the entity axis, so it is
permutation-equivariant over agents and runs on any number of entities.
"""

from __future__ import annotations

from torch import Tensor, nn

from policies.entity import EntityActor, EntityCritic
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


class TransformerActor(EntityActor):
    """Per-agent actions from the agent tokens (the first ``N`` entities)."""

    def __init__(self, node_dim: int, action_kind: str, action_dim: int, **kw: int) -> None:
        enc = EntityTransformer(node_dim, **kw)
        super().__init__(enc, enc.hidden, action_kind, action_dim)


class TransformerCritic(EntityCritic):
    """Per-agent values from entity-transformer embeddings (see ``EntityCritic``)."""

    def __init__(self, node_dim: int, centralised: bool = True, **kw: int) -> None:
        enc = EntityTransformer(node_dim, **kw)
        super().__init__(enc, enc.hidden, centralised)
