"""Graph policies on torch-geometric: entities are nodes, edges come from positions.

Edges are rebuilt from ``node_pos`` on every call (complete, radius or k-nearest, see
``policies.edges``), so one set of weights runs on any number of agents and entities, and
every layer is permutation-equivariant over nodes: reorder the agents and the per-agent
outputs reorder the same way.

Each layer is PyG's ``TransformerConv`` (its parameters, its arithmetic), evaluated in the
layout that is cheapest for the graph at hand:

- ``dense``: ``[B, E, E]`` scores and a softmax over every sender the adjacency allows; the
  layout of complete graphs, whose cost is ``E²`` however it is stored;
- ``dense_lists``: k-nearest and radius graphs of up to ``LISTS_ABOVE`` nodes: the senders come
  from neighbour lists ``[B, E, K]``, the scores and the weighted sum from two dense matrix
  products, the softmax over the ``K`` listed senders only;
- ``lists``: larger k-nearest and radius graphs: keys and values gathered per listed sender,
  cost ``B · E · K``, proportional to the edges;
- ``pyg``: PyG's own gather/scatter message passing (the reference the others are tested
  against).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch_geometric.nn import TransformerConv

from policies.edges import (
    EDGE_MODES,
    LIST_LAYOUTS,
    batch_neighbours,
    build_adjacency,
    build_edges,
    gather_neighbours,
)
from policies.entity import EntityActor, EntityCritic
from policies.mlp import mlp

#: How a ``GraphEncoder`` evaluates its layers: chosen per call by ``"auto"``, or forced.
GRAPH_PATHS = ("auto", "dense", "dense_lists", "lists", "pyg")
#: ``"auto"`` evaluates k-nearest and radius graphs of more nodes than this with gathers
#: (``lists``), smaller ones with dense products (``dense_lists``). Measured on 2 CPU cores,
#: training ``spread-gnn-swarm`` at 1536 agents a step (k=4, hidden 32; agent-steps/s, dense
#: products against gathers): 33k against 25k at 48 nodes, 22-27k against 22-25k at 96 (a
#: tie within run-to-run noise), 17k against 25k at 192. BLAS products over ``E²`` pairs beat
#: memory-bound gathers over ``E · K`` edges until ``E`` is some 25 times ``K``.
LISTS_ABOVE = 96


def _project(
    conv: TransformerConv, x: Tensor, pos: Tensor, r: int
) -> tuple[Tensor, Tensor | None, Tensor, Tensor, Tensor]:
    """Queries (and skip) of the first ``r`` nodes; keys, values and ``W_e pos`` of all.

    Returns:
        ``q [B, r, HC]``, ``skip [B, r, HC]`` or ``None``, ``k``, ``v``, ``wp`` ``[B, E, HC]``.
    """
    lin = torch.nn.functional.linear
    hc = conv.heads * conv.out_channels
    sends = [conv.lin_key, conv.lin_value]
    receives = [conv.lin_query] + ([conv.lin_skip] if conv.root_weight else [])
    wp = lin(pos, conv.lin_edge.weight)  # lin_edge has no bias
    if r == x.shape[1]:  # one matmul for every projection
        lins = receives + sends
        q, *skip, k, v = lin(
            x, torch.cat([m.weight for m in lins]), torch.cat([m.bias for m in lins])
        ).split(hc, dim=-1)
    else:
        q, *skip = lin(
            x[:, :r], torch.cat([m.weight for m in receives]), torch.cat([m.bias for m in receives])
        ).split(hc, dim=-1)
        k, v = lin(
            x, torch.cat([m.weight for m in sends]), torch.cat([m.bias for m in sends])
        ).split(hc, dim=-1)
    return q, (skip[0] if skip else None), k, v, wp


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
    q, skip, k, v, wp = _project(conv, x, pos, e)
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
    return out + skip if skip is not None else out


def attention_bias(adj: Tensor) -> Tensor:
    """Additive score mask: 0 on edges, a large negative elsewhere."""
    return torch.zeros(adj.shape, dtype=torch.float32, device=adj.device).masked_fill_(~adj, -1e9)


def neighbour_transformer_conv(
    conv: TransformerConv, x: Tensor, neighbours: Tensor, pos: Tensor, receivers: int | None = None
) -> Tensor:
    """``conv`` (a PyG ``TransformerConv`` with ``edge_dim = P``) over neighbour lists.

    Same weights, same result as ``conv(x, edge_index, edge_attr)`` on the edges the lists
    hold, with ``edge_attr = pos_j - pos_i``; cost ``B · E · K`` instead of ``B · E²``. As in
    ``dense_transformer_conv``, the edge embedding folds into per-node terms, so one gather
    of keys and values per layer is all the per-edge work there is.

    Args:
        conv: the layer whose parameters are used.
        x: ``[B, E, F]`` node features.
        neighbours: ``[B, E, K]`` sender indices per receiver, ``-1`` for empty slots
            (``policies.edges.build_neighbours``).
        pos: ``[B, E, P]`` node positions.
        receivers: compute the output of the first ``R`` nodes only (all nodes still send):
            an actor reads its agents' rows of the last layer and nothing else.

    Returns:
        ``[B, R, heads * out_channels]`` (``R = E`` by default).
    """
    b, e, _ = x.shape
    r = e if receivers is None else receivers
    h, c = conv.heads, conv.out_channels
    hc = h * c
    kk = neighbours.shape[-1]
    q, skip, k, v, wp = _project(conv, x, pos, r)
    neighbours = neighbours[:, :r]
    # Keys and values of each receiver's senders: [B, R, K, H, C].
    kj, vj = (gather_neighbours(t, neighbours).view(b, r, kk, h, c) for t in (k + wp, v + wp))
    # q_i . (k_j + W(pos_j - pos_i)): the -q_i . W pos_i term is the same for every j and
    # cancels in the softmax.
    scores = (q.view(b, r, 1, h, c) * kj).sum(-1) * (1.0 / c**0.5)  # [B, R, K, H]
    valid = neighbours >= 0
    scores = scores.masked_fill(~valid.unsqueeze(-1), -1e9)
    alpha = torch.softmax(scores, dim=2)
    # sum_j a_ij (v_j + W(pos_j - pos_i)) = sum_j a_ij (v_j + W pos_j) - W pos_i.
    out = (alpha.unsqueeze(-1) * vj).sum(2).reshape(b, r, hc) - wp[:, :r]
    out = out * valid.any(-1, keepdim=True)  # no senders: zero, as PyG gives
    return out + skip if skip is not None else out


def dense_neighbour_transformer_conv(
    conv: TransformerConv, x: Tensor, neighbours: Tensor, pos: Tensor, receivers: int | None = None
) -> Tensor:
    """``neighbour_transformer_conv``'s result from dense matrix products.

    Every receiver's scores against every node come from one ``bmm`` (``[B·H, R, E]``); the
    ``K`` listed senders' scores are picked out of it, softmaxed, scattered back into a
    mostly-zero ``[B·H, R, E]`` weight matrix, and a second ``bmm`` sums the values. This
    does ``E / K`` times the arithmetic of gathering keys and values, but in BLAS instead of
    memory-bound ``[B, R, K, C]`` products, so it is the faster layout for graphs of up to
    ``LISTS_ABOVE`` nodes.

    Args:
        conv: the layer whose parameters are used.
        x: ``[B, E, F]`` node features.
        neighbours: ``[B, E, K]`` sender indices per receiver, ``-1`` for empty slots.
        pos: ``[B, E, P]`` node positions.
        receivers: compute the output of the first ``R`` nodes only.

    Returns:
        ``[B, R, heads * out_channels]`` (``R = E`` by default).
    """
    b, e, _ = x.shape
    r = e if receivers is None else receivers
    h, c = conv.heads, conv.out_channels
    q, skip, k, v, wp = _project(conv, x, pos, r)

    def per_head(t: Tensor) -> Tensor:  # [B, n, H*C] -> [B*H, n, C] (a copy only when H > 1)
        return t.view(b, -1, h, c).transpose(1, 2).reshape(b * h, -1, c)

    lists = neighbours[:, :r]
    valid = lists >= 0
    kk = lists.shape[-1]
    # Heads share the lists; an empty slot points at node 0 with a zero weight.
    index = lists.clamp(min=0).unsqueeze(1).expand(b, h, r, kk).reshape(b * h, r, kk)
    valid_h = valid.unsqueeze(1).expand(b, h, r, kk).reshape(b * h, r, kk)
    # q_i . (k_j + W pos_j); the -q_i . W pos_i term cancels in the softmax.
    scores = torch.bmm(per_head(q), per_head(k + wp).transpose(1, 2)).gather(2, index)
    scores = (scores * (1.0 / c**0.5)).masked_fill(~valid_h, -1e9)
    alpha = torch.softmax(scores, dim=-1) * valid_h
    # A sum, not an overwrite: empty slots add their zero to node 0's weight.
    weights = torch.zeros(b * h, r, e, dtype=alpha.dtype, device=alpha.device)
    weights = weights.scatter_add(2, index, alpha)
    # sum_j a_ij (v_j + W(pos_j - pos_i)) = sum_j a_ij (v_j + W pos_j) - W pos_i.
    out = torch.bmm(weights, per_head(v + wp)) - per_head(wp[:, :r])
    out = out.view(b, h, r, c).transpose(1, 2).reshape(b, r, h * c)
    out = out * valid.any(-1, keepdim=True)  # no senders: zero, as PyG gives
    return out + skip if skip is not None else out


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
        max_neighbours: cap on senders per receiver for radius graphs.
        pos_dim: width of positions (2 for planar worlds).
        path: ``"auto"`` (``dense`` for complete graphs; for k-nearest and radius graphs
            ``dense_lists`` up to ``LISTS_ABOVE`` nodes, ``lists`` beyond), or one of
            ``GRAPH_PATHS`` to force a layout; all compute the same.

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
        max_neighbours: int = 32,
        pos_dim: int = 2,
        path: str = "auto",
    ) -> None:
        super().__init__()
        self.hidden = hidden
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if edges not in EDGE_MODES:
            raise ValueError(f"edges={edges!r} is not one of {EDGE_MODES}")
        if path not in GRAPH_PATHS:
            raise ValueError(f"path={path!r} is not one of {GRAPH_PATHS}")
        self.edges, self.radius, self.k, self.max_neighbours = edges, radius, k, max_neighbours
        self.path = path
        self.embed = mlp(node_dim, hidden, 1)
        self.convs = nn.ModuleList(
            # No skip projection: the residual below already carries each node's own state.
            TransformerConv(
                hidden, hidden // heads, heads=heads, edge_dim=pos_dim, root_weight=False
            )
            for _ in range(layers)
        )

    def layout(self, num_nodes: int) -> str:
        """The layout ``forward`` uses for graphs of ``num_nodes`` nodes."""
        if self.path != "auto":
            return self.path
        if self.edges == "complete":
            return "dense"
        return "dense_lists" if num_nodes <= LISTS_ABOVE else "lists"

    def neighbours(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's neighbour lists, carried or freshly built.

        ``ActorCritic.prepare`` builds them once per step and rollouts store them.
        """
        return batch_neighbours(batch, self.edges, self.radius, self.k, self.max_neighbours)

    def forward(self, batch: dict[str, Tensor], first: int | None = None) -> Tensor:
        """Embeddings for every node, or for the first ``first`` nodes (``[B, first, hidden]``).

        With ``first``, the last layer is computed for those receivers only where the
        layout allows it (the neighbour-list layouts): what an actor reads of its agents.
        """
        out = self._forward(batch, first)
        return out if first is None else out[:, :first]

    def _forward(self, batch: dict[str, Tensor], first: int | None) -> Tensor:
        nodes, pos, mask = batch["nodes"], batch["node_pos"], batch["node_mask"]
        b, e, _ = nodes.shape
        h = self.embed(nodes)
        edges = (self.edges, self.radius, self.k, self.max_neighbours)
        layout = self.layout(e)
        if layout == "dense":
            adj = build_adjacency(pos, mask, *edges)
            bias = attention_bias(adj)
            for conv in self.convs:
                # Residual keeps a node's own features when it has no neighbours.
                h = h + torch.relu(dense_transformer_conv(conv, h, adj, pos, bias))
            return h * mask.unsqueeze(-1)
        if layout in LIST_LAYOUTS:
            layer = (
                neighbour_transformer_conv
                if layout == "lists"
                else dense_neighbour_transformer_conv
            )
            nbrs = self.neighbours(batch)
            last = len(self.convs) - 1
            for i, conv in enumerate(self.convs):
                r = first if i == last and first is not None else e
                h = h[:, :r] + torch.relu(layer(conv, h, nbrs, pos, r))
            return h * mask[:, : h.shape[1]].unsqueeze(-1)
        edge_index, edge_attr = build_edges(pos, mask, *edges)
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
        **encoder: ``GraphEncoder`` options (hidden, layers, heads, edges, radius, k,
            max_neighbours, path).
    """

    def __init__(self, node_dim: int, action_kind: str, action_dim: int, **encoder: object) -> None:
        enc = GraphEncoder(node_dim, **encoder)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, action_kind, action_dim)


class GNNCritic(EntityCritic):
    """Per-agent values from ``GraphEncoder`` embeddings (see ``EntityCritic``)."""

    def __init__(self, node_dim: int, centralised: bool = True, **encoder: object) -> None:
        enc = GraphEncoder(node_dim, **encoder)  # type: ignore[arg-type]
        super().__init__(enc, enc.hidden, centralised)
