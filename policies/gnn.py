"""Graph policies on torch-geometric: entities are nodes, edges come from positions.

Edges are rebuilt from ``node_pos`` on every call (complete, radius or k-nearest), so one set of
weights runs on any number of agents and entities, and every layer is permutation-equivariant
over nodes: reorder the agents and the per-agent outputs reorder the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import TransformerConv

from policies.entity import EntityActor, EntityCritic
from policies.mlp import mlp

EDGE_MODES = ("complete", "radius", "knn")


def build_adjacency(
    node_pos: Tensor, node_mask: Tensor, mode: str = "complete", radius: float = 1.0, k: int = 4
) -> Tensor:
    """Dense adjacency ``adj[b, i, j]`` = "node ``j`` sends to node ``i``".

    Args:
        node_pos: ``[B, E, P]`` positions.
        node_mask: ``[B, E]`` bool, ``False`` for padding (never connected).
        mode: ``"complete"``, ``"radius"`` (distance <= ``radius``) or ``"knn"`` (the ``k``
            nearest senders of each receiver).
        radius: cut-off for ``"radius"``.
        k: neighbours for ``"knn"``.

    Returns:
        ``adj [B, E, E]`` bool.
    """
    if mode not in EDGE_MODES:
        raise ValueError(f"edge mode {mode!r} is not one of {EDGE_MODES}")
    e = node_pos.shape[1]
    eye = torch.eye(e, dtype=torch.bool, device=node_pos.device)
    valid = node_mask.unsqueeze(2) & node_mask.unsqueeze(1) & ~eye
    if mode == "complete" or (mode == "knn" and k >= e - 1):
        return valid  # distances are only needed to prune edges
    dist = torch.cdist(node_pos, node_pos)  # [B, i, j]
    if mode == "radius":
        return valid & (dist <= radius)
    d = dist.masked_fill(~valid, float("inf"))
    kth = d.topk(k, dim=-1, largest=False).values[..., -1:]
    return valid & (d <= kth)


def build_edges(
    node_pos: Tensor, node_mask: Tensor, mode: str = "complete", radius: float = 1.0, k: int = 4
) -> tuple[Tensor, Tensor]:
    """Batched directed edges ``j -> i`` between valid, distinct nodes of each graph.

    Takes the arguments of ``build_adjacency``.

    Returns:
        ``edge_index [2, M]`` over the flattened ``B * E`` nodes (row 0 senders, row 1
        receivers) and ``edge_attr [M, P]`` (sender position relative to receiver).
    """
    valid = build_adjacency(node_pos, node_mask, mode, radius, k)
    e = node_pos.shape[1]
    bi, i, j = valid.nonzero(as_tuple=True)
    edge_index = torch.stack([bi * e + j, bi * e + i])
    return edge_index, node_pos[bi, j] - node_pos[bi, i]


def dense_transformer_conv(
    conv: TransformerConv, x: Tensor, adj: Tensor, pos: Tensor, bias: Tensor | None = None
) -> Tensor:
    """``conv`` (a PyG ``TransformerConv`` with ``edge_dim = P``) applied densely.

    Same weights, same result as ``conv(x, edge_index, edge_attr)`` on the edges of ``adj``
    with ``edge_attr = pos_j - pos_i``, but for small padded graphs: the edge embedding is
    linear in ``pos_j - pos_i``, so it folds into per-node terms and one ``[B, H, E, E]`` score
    tensor instead of ``[M, H, C]`` per-edge tensors. On CPU with a few entities per graph
    this is an order of magnitude faster than gather/scatter.

    Args:
        conv: the layer whose parameters are used.
        x: ``[B, E, F]`` node features.
        adj: ``[B, E, E]`` bool, receiver ``i`` x sender ``j``.
        pos: ``[B, E, P]`` node positions.
        bias: optional precomputed ``attention_bias(adj)``, shared across layers.

    Returns:
        ``[B, E, heads * out_channels]``.
    """
    b, e, _ = x.shape
    h, c = conv.heads, conv.out_channels
    hc = h * c
    # One matmul for query, key, value (and skip) instead of three or four.
    lins = [conv.lin_query, conv.lin_key, conv.lin_value]
    if conv.root_weight:
        lins.append(conv.lin_skip)
    weight = torch.cat([lin.weight for lin in lins])
    b_all = torch.cat([lin.bias for lin in lins])
    q, k, v, *skip = torch.nn.functional.linear(x, weight, b_all).split(hc, dim=-1)
    wp = torch.nn.functional.linear(pos, conv.lin_edge.weight)  # W_e pos, lin_edge has no bias
    kp, vp = k + wp, v + wp
    # Heads to the batch dim: [B*H, E, C] (a copy only when H > 1).
    q, kp, vp, wq = (
        t.view(b, e, h, c).transpose(1, 2).reshape(b * h, e, c) for t in (q, kp, vp, wp)
    )
    # q_i . (k_j + W(pos_j - pos_i)) = q_i . (k_j + W pos_j) - q_i . W pos_i
    scores = torch.baddbmm(-(q * wq).sum(-1, keepdim=True), q, kp.transpose(1, 2), alpha=1.0) * (
        1.0 / c**0.5
    )
    if bias is None:
        bias = attention_bias(adj)
    scores = scores.view(b, h, e, e) + bias.unsqueeze(1)
    alpha = torch.softmax(scores, dim=-1).view(b * h, e, e)
    # sum_j a_ij (v_j + W(pos_j - pos_i)) = a @ (v + W pos) - W pos_i, as the a_ij sum to 1.
    out = torch.bmm(alpha, vp) - wq
    out = out.view(b, h, e, c).transpose(1, 2).reshape(b, e, hc)
    # A receiver without senders gets zero from PyG; here softmax spread it over padding.
    out = out * adj.any(-1, keepdim=True)
    return out + skip[0] if skip else out


def attention_bias(adj: Tensor) -> Tensor:
    """Additive score mask: 0 on edges, a large negative elsewhere."""
    return torch.zeros(adj.shape, dtype=torch.float32, device=adj.device).masked_fill_(~adj, -1e9)


class GraphEncoder(nn.Module):
    """Node embeddings from attention message passing (PyG ``TransformerConv``).

    Args:
        node_dim: input node feature width ``F``.
        hidden: embedding width (divisible by ``heads``).
        layers: message-passing rounds.
        heads: attention heads.
        edges: edge construction, one of ``complete``, ``radius``, ``knn``.
        radius: cut-off for radius graphs.
        k: neighbours for knn graphs.
        pos_dim: width of positions (2 for planar worlds).
        dense: compute each layer densely (``dense_transformer_conv``) when a graph has at
            most this many nodes, else through PyG's sparse message passing.

    Shapes:
        - input: ``nodes [B, E, F]``, ``node_pos [B, E, P]``, ``node_mask [B, E]``.
        - output: ``[B, E, hidden]``; padded nodes get zeros.
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
        pos_dim: int = 2,
        dense: int = 32,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.hidden = hidden
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if edges not in EDGE_MODES:
            raise ValueError(f"edges={edges!r} is not one of {EDGE_MODES}")
        self.edges, self.radius, self.k = edges, radius, k
        self.embed = mlp(node_dim, hidden, 1)
        self.convs = nn.ModuleList(
            # No skip projection: the residual below already carries each node's own state.
            TransformerConv(
                hidden, hidden // heads, heads=heads, edge_dim=pos_dim, root_weight=False
            )
            for _ in range(layers)
        )

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Embeddings for every node."""
        nodes, pos, mask = batch["nodes"], batch["node_pos"], batch["node_mask"]
        b, e, _ = nodes.shape
        h = self.embed(nodes)
        if e <= self.dense:
            adj = build_adjacency(pos, mask, self.edges, self.radius, self.k)
            bias = attention_bias(adj)
            for conv in self.convs:
                # Residual keeps a node's own features when it has no neighbours.
                h = h + torch.relu(dense_transformer_conv(conv, h, adj, pos, bias))
            return h * mask.unsqueeze(-1)
        edge_index, edge_attr = build_edges(pos, mask, self.edges, self.radius, self.k)
        h = h.reshape(b * e, -1)
        for conv in self.convs:
            h = h + torch.relu(conv(h, edge_index, edge_attr))
        return h.reshape(b, e, -1) * mask.unsqueeze(-1)


class GNNActor(EntityActor):
    """Per-agent actions from ``GraphEncoder`` embeddings (agents are the first ``N`` nodes).

    Args:
        node_dim: node feature width.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: ``A``.
        **encoder: ``GraphEncoder`` options (hidden, layers, heads, edges, radius, k).
    """

    def __init__(self, node_dim: int, action_kind: str, action_dim: int, **encoder: object) -> None:
        enc = GraphEncoder(node_dim, **encoder)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, action_kind, action_dim)


class GNNCritic(EntityCritic):
    """Per-agent values from ``GraphEncoder`` embeddings (see ``EntityCritic``)."""

    def __init__(self, node_dim: int, centralised: bool = True, **encoder: object) -> None:
        enc = GraphEncoder(node_dim, **encoder)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, centralised)
