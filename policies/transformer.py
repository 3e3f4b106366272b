"""Entity transformer policies: self-attention over the set of entities, masks for padding.

Like the GNN, the transformer has no positional encoding over the entity axis, so it is
permutation-equivariant over agents and runs on any number of entities.

Attention is full by default (``edges="complete"``). With ``edges="knn"`` or ``"radius"`` each
token attends to itself and its neighbours only (``policies.edges``), through the same
``nn.TransformerEncoderLayer`` parameters: the cost falls from ``B · E²`` to ``B · E · (K + 1)``,
which is what lets a transformer policy act for a swarm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.edges import EDGE_MODES, batch_neighbours, gather_neighbours
from policies.entity import EntityActor, EntityCritic
from policies.mlp import mlp


def local_encoder_layer(layer: nn.TransformerEncoderLayer, x: Tensor, neighbours: Tensor) -> Tensor:
    """``layer`` (post-norm, no dropout) with each token attending to itself and its neighbours.

    Equals ``layer(x)`` under an attention mask that keeps, for token ``i``, itself and the
    senders ``neighbours[:, i]``.

    Args:
        layer: the encoder layer whose parameters are used.
        x: ``[B, E, D]`` tokens.
        neighbours: ``[B, E, K]`` indices, ``-1`` for empty slots.

    Returns:
        ``[B, E, D]``.
    """
    b, e, d = x.shape
    attn = layer.self_attn
    h = attn.num_heads
    c = d // h
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).split(d, dim=-1)
    kv = torch.cat([k, v], dim=-1)
    kv = torch.cat([kv.unsqueeze(2), gather_neighbours(kv, neighbours)], dim=2)  # self first
    kk = kv.shape[2]
    kj, vj = kv.view(b, e, kk, 2, h, c).unbind(3)
    scores = (q.view(b, e, 1, h, c) * kj).sum(-1) * (1.0 / c**0.5)  # [B, E, K+1, H]
    empty = F.pad(neighbours < 0, (1, 0))  # the self slot is never empty
    alpha = torch.softmax(scores.masked_fill(empty.unsqueeze(-1), float("-inf")), dim=2)
    out = attn.out_proj((alpha.unsqueeze(-1) * vj).sum(2).reshape(b, e, d))
    x = layer.norm1(x + out)
    return layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))  # type: ignore[operator]


class EntityTransformer(nn.Module):
    """``nn.TransformerEncoder`` over entity tokens.

    Args:
        node_dim: entity feature width ``F``.
        hidden: model width.
        layers: encoder layers.
        heads: attention heads.
        edges: ``"complete"`` (full attention) or ``"knn"``/``"radius"`` (local attention
            over each token's neighbours, built from ``node_pos``).
        radius: cut-off for ``"radius"``.
        k: neighbours for ``"knn"``.
        max_neighbours: cap on neighbours for ``"radius"``.

    Shapes:
        - input: ``nodes [B, E, F]``, ``node_mask [B, E]`` (and ``node_pos [B, E, P]`` for
          local attention).
        - output: ``[B, E, hidden]``; padded entities get zeros.
    """

    def __init__(
        self,
        node_dim: int,
        hidden: int = 64,
        layers: int = 2,
        heads: int = 2,
        edges: str = "complete",
        radius: float = 1.0,
        k: int = 4,
        max_neighbours: int = 32,
    ) -> None:
        super().__init__()
        if edges not in EDGE_MODES:
            raise ValueError(f"edges={edges!r} is not one of {EDGE_MODES}")
        self.edges, self.radius, self.k, self.max_neighbours = edges, radius, k, max_neighbours
        self.embed = mlp(node_dim, hidden, 1)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.hidden = hidden

    def layout(self, num_nodes: int) -> str:
        """``"dense"`` (full attention) or ``"lists"`` (local attention)."""
        return "dense" if self.edges == "complete" else "lists"

    def forward(self, batch: dict[str, Tensor], first: int | None = None) -> Tensor:
        """Embeddings for every entity (for the first ``first`` with ``first``)."""
        out = self._forward(batch)
        return out if first is None else out[:, :first]

    def _forward(self, batch: dict[str, Tensor]) -> Tensor:
        mask = batch["node_mask"]
        h = self.embed(batch["nodes"])
        if self.edges == "complete":
            h = self.encoder(h, src_key_padding_mask=~mask)
            return h * mask.unsqueeze(-1)
        nbrs = batch_neighbours(batch, self.edges, self.radius, self.k, self.max_neighbours)
        for layer in self.encoder.layers:
            h = local_encoder_layer(layer, h, nbrs)
        return h * mask.unsqueeze(-1)


class TransformerActor(EntityActor):
    """Per-agent actions from the agent tokens (the first ``N`` entities)."""

    def __init__(self, node_dim: int, action_kind: str, action_dim: int, **kw: object) -> None:
        enc = EntityTransformer(node_dim, **kw)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, action_kind, action_dim)


class TransformerCritic(EntityCritic):
    """Per-agent values from entity-transformer embeddings (see ``EntityCritic``)."""

    def __init__(self, node_dim: int, centralised: bool = True, **kw: object) -> None:
        enc = EntityTransformer(node_dim, **kw)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, centralised)
