"""GNN policies: agreement with PyG's sparse layer, equivariance, size independence."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import TransformerConv

import envs
from policies import ActorCritic, PolicySpec
from policies.gnn import GraphEncoder, build_adjacency, build_edges, dense_transformer_conv


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


@pytest.mark.parametrize("dense", [32, 0], ids=["dense", "sparse"])
def test_encoder_is_permutation_equivariant(dense: int) -> None:
    torch.manual_seed(1)
    x, pos, mask = _graph(b=3, e=6, f=5)
    mask[:] = True
    enc = GraphEncoder(5, hidden=16, layers=2, heads=2, dense=dense)
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
    action, logp, value = model.act(env6.reset().as_dict())
    assert action.shape == (5, 6) and value.shape == (5, 6) and torch.isfinite(logp).all()
