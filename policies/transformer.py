"""Entity transformer policies: self-attention over the set of entities, masks for padding.

Like the GNN, the transformer has no positional encoding over the entity axis, so it is
permutation-equivariant over agents and runs on any number of entities.

Attention is full by default (``edges="complete"``). With ``edges="knn"`` or ``"radius"`` each
token attends to itself and its neighbours only (``policies.edges``), through the same
``nn.TransformerEncoderLayer`` parameters. Up to ``LOCAL_GATHER_ABOVE`` entities that is the
layer itself under an attention mask built from the neighbour lists (``dense_lists``: the
fused attention kernel, cost ``B · E²``); beyond, keys and values are gathered per neighbour
(``lists``: cost ``B · E · (K + 1)``), which is what lets a transformer policy act for a swarm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from policies.edges import EDGE_MODES, batch_neighbours, gather_neighbours, neighbours_to_adjacency
from policies.entity import EntityActor, EntityCritic
from policies.mlp import mlp

#: Local attention over more entities than this gathers keys and values per neighbour; up to
#: it, the fused attention kernel runs under a mask. Measured on 2 CPU cores (training at 1536
#: agents a step, k=4, the preset's widths; agent-steps/s, masked against gathered): 13.0k
#: against 10.8k at 6 entities, 18.3k against 11.7k at 48, 12.2k against 11.0k at 96, 9.9k
#: against 10.4k at 192.
LOCAL_GATHER_ABOVE = 96
#: How an ``EntityTransformer`` with local attention evaluates it: by size, or forced.
LOCAL_PATHS = ("auto", "dense_lists", "lists")


def neighbourhood_mask(neighbours: Tensor, heads: int) -> Tensor:
    """``attn_mask`` for ``nn.MultiheadAttention``: ``True`` where token ``i`` may not see ``j``.

    Each token sees itself and its listed neighbours.

    Args:
        neighbours: ``[B, E, K]`` indices, ``-1`` for empty slots.
        heads: attention heads (the mask is repeated per head, batch-major).

    Returns:
        ``[B * heads, E, E]`` bool.
    """
    b, e, _ = neighbours.shape
    eye = torch.eye(e, dtype=torch.bool, device=neighbours.device)
    hidden = ~(neighbours_to_adjacency(neighbours) | eye)
    return hidden.unsqueeze(1).expand(b, heads, e, e).reshape(b * heads, e, e)


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
        path: how local attention is evaluated: ``"auto"`` (by size, see
            ``LOCAL_GATHER_ABOVE``), ``"dense_lists"`` (masked fused attention) or ``"lists"``
            (gathered neighbours); both compute the same.

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
        path: str = "auto",
    ) -> None:
        super().__init__()
        if edges not in EDGE_MODES:
            raise ValueError(f"edges={edges!r} is not one of {EDGE_MODES}")
        if path not in LOCAL_PATHS:
            raise ValueError(f"path={path!r} is not one of {LOCAL_PATHS}")
        self.edges, self.radius, self.k, self.max_neighbours = edges, radius, k, max_neighbours
        self.path = path
        self.embed = mlp(node_dim, hidden, 1)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, dim_feedforward=2 * hidden, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.hidden = hidden

    def layout(self, num_nodes: int) -> str:
        """``"dense"`` (full attention), or for local attention ``"dense_lists"`` or ``"lists"``."""
        if self.edges == "complete":
            return "dense"
        if self.path != "auto":
            return self.path
        return "dense_lists" if num_nodes <= LOCAL_GATHER_ABOVE else "lists"

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
        if self.layout(h.shape[1]) == "dense_lists":
            heads = self.encoder.layers[0].self_attn.num_heads
            h = self.encoder(h, mask=neighbourhood_mask(nbrs, heads))
            return h * mask.unsqueeze(-1)
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
