"""GNN and entity-transformer policies: agreement with PyG's layer in every layout,
equivariance, size independence."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import TransformerConv

import envs
from policies import ActorCritic, PolicySpec
from policies.edges import build_adjacency, build_edges, build_neighbours
from policies.gnn import (
    LISTS_ABOVE,
    GraphEncoder,
    dense_neighbour_transformer_conv,
    dense_transformer_conv,
    neighbour_transformer_conv,
)
from policies.transformer import EntityTransformer


def _graph(b: int = 4, e: int = 7, f: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, e, f, generator=g)
    pos = torch.randn(b, e, 2, generator=g)
    mask = torch.rand(b, e, generator=g) > 0.2
    return x, pos, mask


@pytest.mark.parametrize("root_weight", [True, False])
@pytest.mark.parametrize("mode", ["complete", "radius", "knn"])
def test_dense_path_equals_pyg_transformer_conv(mode: str, root_weight: bool) -> None:
    """The fast dense kernel must compute exactly what PyG's message passing computes."""
    torch.manual_seed(0)
    x, pos, mask = _graph()
    conv = TransformerConv(8, 6, heads=3, edge_dim=2, root_weight=root_weight)
    adj = build_adjacency(pos, mask, mode, radius=1.0, k=2)
    dense = dense_transformer_conv(conv, x, adj, pos)
    edge_index, edge_attr = build_edges(pos, mask, mode, radius=1.0, k=2)
    sparse = conv(x.reshape(-1, 8), edge_index, edge_attr).reshape(4, 7, 18)
    valid = mask.unsqueeze(-1)
    torch.testing.assert_close(dense * valid, sparse * valid, atol=1e-5, rtol=1e-5)
    # Gradients agree too: training on the dense path trains the PyG layer.
    params = list(conv.parameters())
    gd = torch.autograd.grad((dense * valid).square().sum(), params, allow_unused=True)
    gs = torch.autograd.grad((sparse * valid).square().sum(), params, allow_unused=True)
    for a, b in zip(gd, gs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_radius_and_knn_edges_respect_masks_and_degree() -> None:
    x, pos, mask = _graph(b=2, e=9)
    dist = (pos.unsqueeze(1) - pos.unsqueeze(2)).norm(dim=-1)
    adj = build_adjacency(pos, mask, "knn", k=3)
    assert not adj[~mask].any() and not adj.transpose(1, 2)[~mask].any()
    assert torch.all(adj.sum(-1) <= 3)
    adj = build_adjacency(pos, mask, "radius", radius=0.5)
    assert torch.all(dist[adj] <= 0.5)
    assert not adj.diagonal(dim1=1, dim2=2).any()


@pytest.mark.parametrize("layer", [neighbour_transformer_conv, dense_neighbour_transformer_conv])
@pytest.mark.parametrize("root_weight", [True, False])
@pytest.mark.parametrize("mode", ["knn", "radius"])
def test_neighbour_list_layouts_equal_pyg_transformer_conv(
    mode: str, root_weight: bool, layer
) -> None:
    """Both neighbour-list layouts (gathers; dense products) compute what PyG computes."""
    torch.manual_seed(0)
    x, pos, mask = _graph(b=4, e=9)
    conv = TransformerConv(8, 6, heads=3, edge_dim=2, root_weight=root_weight)
    nbrs = build_neighbours(pos, mask, mode, radius=1.0, k=3, max_neighbours=4)
    assert (nbrs < 0).all(-1).any()  # padded receivers: no senders at all
    assert (nbrs < 0).any() and not (nbrs < 0).all(-1).all()
    lists = layer(conv, x, nbrs, pos)
    edge_index, edge_attr = build_edges(pos, mask, mode, radius=1.0, k=3, max_neighbours=4)
    sparse = conv(x.reshape(-1, 8), edge_index, edge_attr).reshape(4, 9, 18)
    valid = mask.unsqueeze(-1)
    torch.testing.assert_close(lists * valid, sparse * valid, atol=1e-5, rtol=1e-5)
    # The first receivers alone, as an actor's last layer asks: the same rows.
    torch.testing.assert_close(layer(conv, x, nbrs, pos, 4), lists[:, :4], atol=1e-5, rtol=1e-5)
    params = list(conv.parameters())
    gl = torch.autograd.grad((lists * valid).square().sum(), params, allow_unused=True)
    gs = torch.autograd.grad((sparse * valid).square().sum(), params, allow_unused=True)
    for a, b in zip(gl, gs, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("edges", ["complete", "knn", "radius"])
def test_encoder_layouts_agree(edges: str) -> None:
    """Every layout of one encoder gives the same embeddings, so ``auto`` may pick any."""
    torch.manual_seed(3)
    x, pos, mask = _graph(b=3, e=10, f=5)
    batch = {"nodes": x, "node_pos": pos, "node_mask": mask}
    ref = GraphEncoder(5, hidden=16, layers=2, heads=2, edges=edges, k=3, path="pyg")
    for path in ("dense", "dense_lists", "lists", "auto"):
        enc = GraphEncoder(5, hidden=16, layers=2, heads=2, edges=edges, k=3, path=path)
        enc.load_state_dict(ref.state_dict())
        torch.testing.assert_close(enc(batch), ref(batch), atol=1e-5, rtol=1e-5)
        # An actor's view: the first rows only (lists skip the others in the last layer).
        torch.testing.assert_close(enc(batch, first=4), ref(batch)[:, :4], atol=1e-5, rtol=1e-5)


def test_auto_layout_is_dense_for_complete_graphs_and_lists_for_sparse_ones() -> None:
    assert GraphEncoder(5, edges="complete").layout(200) == "dense"
    assert GraphEncoder(5, edges="knn").layout(6) == "dense_lists"
    assert GraphEncoder(5, edges="radius").layout(LISTS_ABOVE) == "dense_lists"
    assert GraphEncoder(5, edges="knn").layout(LISTS_ABOVE + 1) == "lists"


@pytest.mark.parametrize("path", ["dense_lists", "lists"])
def test_transformer_local_attention_over_everyone_is_full_attention(path: str) -> None:
    torch.manual_seed(4)
    x, pos, mask = _graph(b=3, e=7, f=5)
    batch = {"nodes": x, "node_pos": pos, "node_mask": mask}
    full = EntityTransformer(5, hidden=16, layers=2, heads=2)
    local = EntityTransformer(5, hidden=16, layers=2, heads=2, edges="knn", k=6, path=path)
    local.load_state_dict(full.state_dict())
    valid = mask.unsqueeze(-1)
    torch.testing.assert_close(local(batch) * valid, full(batch) * valid, atol=1e-5, rtol=1e-5)
    # With fewer neighbours it is a different (local) function of the same weights.
    near = EntityTransformer(5, hidden=16, layers=2, heads=2, edges="knn", k=2, path=path)
    near.load_state_dict(full.state_dict())
    assert not torch.allclose(near(batch) * valid, full(batch) * valid, atol=1e-3)


@pytest.mark.parametrize("edges", ["knn", "radius"])
def test_transformer_local_attention_layouts_agree(edges: str) -> None:
    """Masked fused attention and gathered neighbours: the same values and gradients."""
    torch.manual_seed(6)
    x, pos, mask = _graph(b=3, e=12, f=5)
    batch = {"nodes": x, "node_pos": pos, "node_mask": mask}
    kw = {"hidden": 16, "layers": 2, "heads": 2, "edges": edges, "k": 3, "max_neighbours": 4}
    gathered = EntityTransformer(5, **kw, path="lists")  # type: ignore[arg-type]
    masked = EntityTransformer(5, **kw, path="dense_lists")  # type: ignore[arg-type]
    masked.load_state_dict(gathered.state_dict())
    a, b = gathered(batch), masked(batch)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(a.square().sum(), list(gathered.parameters()))
    gb = torch.autograd.grad(b.square().sum(), list(masked.parameters()))
    for p, q in zip(ga, gb, strict=True):
        torch.testing.assert_close(q, p, atol=1e-3, rtol=1e-4)
    assert EntityTransformer(5, edges="knn").layout(48) == "dense_lists"
    assert EntityTransformer(5, edges="knn").layout(1000) == "lists"


@pytest.mark.parametrize(
    ("kind", "edges", "path"),
    [
        ("gnn", "complete", "dense"),
        ("gnn", "complete", "pyg"),
        ("gnn", "knn", "dense_lists"),
        ("gnn", "knn", "lists"),
        ("transformer", "knn", "dense_lists"),
        ("transformer", "knn", "lists"),
    ],  # fmt: skip
)
def test_encoder_is_permutation_equivariant(kind: str, edges: str, path: str) -> None:
    torch.manual_seed(1)
    x, pos, mask = _graph(b=3, e=6, f=5)
    mask[:] = True
    if kind == "gnn":
        enc: torch.nn.Module = GraphEncoder(5, 16, 2, 2, edges=edges, k=3, path=path)
    else:
        enc = EntityTransformer(5, 16, 2, 2, edges=edges, k=3, path=path)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    out = enc({"nodes": x, "node_pos": pos, "node_mask": mask})
    out_p = enc({"nodes": x[:, perm], "node_pos": pos[:, perm], "node_mask": mask[:, perm]})
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gnn", "transformer"])
def test_policy_permutes_with_agents_and_runs_at_twice_the_agents(kind: str) -> None:
    torch.manual_seed(2)
    env3 = envs.make("spread", num_envs=5, n_agents=3, seed=3)
    obs = env3.reset().as_dict()
    spec = PolicySpec(kind, env3.obs_dim, 0, env3.node_dim, "discrete", 5, hidden=32)
    model = ActorCritic(spec)
    logits = model.dist(obs).logits
    values = model.value(obs)
    perm = torch.tensor([2, 0, 1])
    node_perm = torch.cat([perm, torch.arange(3, 6)])  # agents permuted, landmarks kept
    permuted = dict(obs)
    for key in ("nodes", "node_pos", "node_type", "node_mask"):
        permuted[key] = obs[key][:, node_perm]
    permuted["alive"] = obs["alive"][:, perm]
    torch.testing.assert_close(model.dist(permuted).logits, logits[:, perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(model.value(permuted), values[:, perm], atol=1e-5, rtol=0)
    # The same weights act with 6 agents and 6 landmarks.
    env6 = envs.make("spread", num_envs=5, n_agents=6, seed=3)
    action, logp, value, _ = model.act(env6.reset().as_dict())
    assert action.shape == (5, 6) and value.shape == (5, 6) and torch.isfinite(logp).all()


def test_prepared_neighbours_are_built_once_and_change_nothing() -> None:
    """``prepare`` adds the lists once for actor and critic; outputs are those without them."""
    torch.manual_seed(5)
    env = envs.make("spread", num_envs=4, n_agents=24, seed=0)
    obs = env.reset().as_dict()
    spec = PolicySpec("gnn", env.obs_dim, 0, env.node_dim, "discrete", 5, hidden=16, edges="knn")
    model = ActorCritic(spec)
    assert "neighbours" in model.input_keys and "state" not in model.input_keys
    prepared = model.prepare(obs)
    assert prepared["neighbours"].shape == (4, 48, 4) and model.prepare(prepared) is prepared
    torch.testing.assert_close(model.dist(prepared).logits, model.dist(obs).logits)
    torch.testing.assert_close(model.value(prepared), model.value(obs))
    # Small graphs read lists too; complete edges never do.
    small = envs.make("spread", num_envs=4, n_agents=3, seed=0).reset().as_dict()
    assert model.prepare(small)["neighbours"].shape == (4, 6, 4)
    spec = PolicySpec("gnn", env.obs_dim, 0, env.node_dim, "discrete", 5, hidden=16)
    assert "neighbours" not in ActorCritic(spec).prepare(obs)
