"""Swarm sizes: a graph policy for 48 agents trains within a stated memory bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

# Forward and backward of actor and critic for 64 worlds of 48 agents and 48 landmarks
# (3072 agents). Measured: ~70 MiB with k-nearest neighbour lists or dense complete graphs;
# 1.2 GiB through PyG's per-edge message passing, the layout complete graphs of this size
# used to take.
BOUND_MIB = 200

_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import envs
    from policies import ActorCritic, PolicySpec
    edges = sys.argv[1]
    env = envs.make("spread", num_envs=64, n_agents=48, seed=0)
    env.restrict_observation(frozenset({"nodes", "node_pos", "node_mask", "alive"}))
    spec = PolicySpec("gnn", env.obs_dim, env.state_dim, env.node_dim, "discrete", 5,
                      hidden=32, heads=1, edges=edges, critic_kind="gnn")
    model = ActorCritic(spec)
    obs = env.reset().as_dict()
    assert obs["obs"].shape[-1] == 0  # the O(N^2) per-agent vectors were skipped
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dist, value = model(model.prepare(obs))
    (dist.entropy().sum() + value.sum()).backward()
    # (PyG builds lin_skip even without root_weight; nothing reads it.)
    grads = all(p.grad is not None for n, p in model.named_parameters() if "lin_skip" not in n)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mib": (after - before) / 1024, "grads": grads,
                      "layout": model.actor.encoder.layout(96)}))
    """
)


@pytest.mark.slow  # a memory probe at 48 agents
@pytest.mark.parametrize(("edges", "layout"), [("knn", "dense_lists"), ("complete", "dense")])
def test_gnn_at_48_agents_trains_within_the_memory_bound(edges: str, layout: str) -> None:
    # A fresh process: its peak resident memory is this forward and backward's alone.
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, edges], capture_output=True, text=True, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["layout"] == layout and res["grads"]
    assert res["mib"] < BOUND_MIB, f"{res['mib']:.0f} MiB for 3072 agents ({edges} edges)"
