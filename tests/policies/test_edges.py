"""Edge builders: neighbour lists hold exactly the edges of the dense adjacency."""

from __future__ import annotations

import pytest
import torch

import envs
import policies.edges as edges_mod
from policies.edges import (
    build_adjacency,
    build_edges,
    build_neighbours,
    gather_neighbours,
    list_width,
    neighbours_to_adjacency,
)


def _positions(b: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(b, e, 2, generator=g) * 2 - 1
    mask = torch.rand(b, e, generator=g) > 0.15
    return pos, mask


@pytest.mark.parametrize("e", [2, 5, 9, 16])
@pytest.mark.parametrize(
    ("mode", "k", "cap"),
    [
        ("knn", 1, 32),
        ("knn", 3, 32),
        ("knn", 20, 32),
        ("radius", 4, 32),
        ("radius", 4, 2),
        ("complete", 4, 32),
    ],  # fmt: skip
)
def test_neighbour_lists_equal_dense_adjacency(e: int, mode: str, k: int, cap: int) -> None:
    pos, mask = _positions(6, e, seed=e)
    adj = build_adjacency(pos, mask, mode, radius=0.8, k=k, max_neighbours=cap)
    nbrs = build_neighbours(pos, mask, mode, radius=0.8, k=k, max_neighbours=cap)
    assert nbrs.shape == (6, e, list_width(mode, e, k, cap))
    assert torch.equal(neighbours_to_adjacency(nbrs), adj)
    # And the sparse edge list PyG consumes holds the same edges.
    edge_index, _ = build_edges(pos, mask, mode, radius=0.8, k=k, max_neighbours=cap)
    dense_edges = torch.zeros(6 * e, 6 * e, dtype=torch.bool)
    dense_edges[edge_index[1], edge_index[0]] = True
    assert torch.equal(torch.block_diag(*adj.float()).bool(), dense_edges)


def test_lists_are_nearest_first_and_never_self_or_padding() -> None:
    pos, mask = _positions(4, 12, seed=1)
    nbrs = build_neighbours(pos, mask, "knn", k=4)
    d = torch.cdist(pos, pos)
    got = torch.where(nbrs >= 0, d.gather(2, nbrs.clamp(min=0)), torch.inf)
    assert torch.all(got[..., 1:] >= got[..., :-1])  # sorted by distance
    rows = torch.arange(12).view(1, 12, 1)
    assert not (nbrs == rows).any()
    senders_padded = ~mask.gather(1, nbrs.clamp(min=0).flatten(1)).view_as(nbrs)
    assert not ((nbrs >= 0) & senders_padded).any()
    assert (nbrs[~mask] == -1).all()


def test_chunked_build_equals_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Receivers are taken in chunks to bound memory; chunk edges change nothing."""
    pos, mask = _positions(3, 40, seed=2)
    whole = build_neighbours(pos, mask, "knn", k=5)
    monkeypatch.setattr(edges_mod, "_CHUNK_ELEMENTS", 3 * 40 * 7)  # 7 receivers a chunk
    assert torch.equal(build_neighbours(pos, mask, "knn", k=5), whole)


@pytest.mark.parametrize("n", [3, 6])
def test_lists_on_spread_worlds_equal_todays_knn_edges(n: int) -> None:
    obs = envs.make("spread", num_envs=64, n_agents=n, seed=n).reset()
    adj = build_adjacency(obs.node_pos, obs.node_mask, "knn", k=4)
    nbrs = build_neighbours(obs.node_pos, obs.node_mask, "knn", k=4)
    assert torch.equal(neighbours_to_adjacency(nbrs), adj)


def test_gather_reads_each_receivers_senders() -> None:
    x = torch.arange(2 * 4 * 1, dtype=torch.float32).view(2, 4, 1)
    nbrs = torch.tensor([[[1, 2], [0, -1], [3, 1], [2, 0]]] * 2)
    out = gather_neighbours(x, nbrs).squeeze(-1)
    assert out[1, 0].tolist() == [5.0, 6.0] and out[0, 2].tolist() == [3.0, 1.0]


def test_bad_mode_is_named() -> None:
    with pytest.raises(ValueError, match="'grid'"):
        build_neighbours(torch.zeros(1, 3, 2), torch.ones(1, 3, dtype=torch.bool), "grid")
