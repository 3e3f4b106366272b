"""A two-node Ray cluster on one machine: workers and learners land on both nodes and train.

Its own module: the test process joins this cluster, so it cannot share the Ray instance
of ``test_distributed.py``.
"""

from __future__ import annotations

import uuid

import pytest
import ray
from ray.cluster_utils import Cluster

from agents.memory import RunState, connect
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.services import RedisServer
from tests.orchestrator.runtime.test_distributed import TINY, assert_monotonic_progress, rows

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed, pytest.mark.redis]


def test_two_nodes_host_workers_and_learners_and_train(tmp_path, redis_server: RedisServer):
    assert not ray.is_initialized()
    node_args = {"num_cpus": 2, "object_store_memory": 100 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=node_args)
    try:
        cluster.add_node(num_cpus=2, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes(timeout=60)
        cfg = load_config(
            "spread-gnn",
            [
                *TINY,
                "rollout.num_workers=2",
                "learner.num_ranks=2",
                "rollout.cpus_per_worker=1",
                "learner.cpus_per_rank=1",
                "learner.placement=spread",
                "train.total_env_steps=1600",
                f"ray.address={cluster.address}",
                f"redis.url={redis_server.url}",
                f"run.storage={tmp_path / 'shared'}",  # a path every node mounts
            ],
        )
        run_dir = tmp_path / f"two-nodes-{uuid.uuid4().hex[:6]}"
        run_dir.mkdir()
        summary = run_training(cfg, run_dir)
        assert not ray.is_initialized()  # the run joined the cluster and left it
        nodes = {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["env_steps"] == 1600
    assert_monotonic_progress(rows(run_dir), max_staleness=1)
    client = connect(redis_server.url)
    try:
        state = RunState(client, run_dir.name).get()
    finally:
        client.close()
    rollout_nodes = {info["node_id"] for info in state["actors"].values()}
    learner_nodes = {info["node_id"] for info in state["learners"].values()}
    assert set(state["actors"]) == {"shoal-rollout-0", "shoal-rollout-1"}
    assert set(state["learners"]) == {"shoal-learner-0", "shoal-learner-1"}
    assert rollout_nodes == learner_nodes == nodes and len(nodes) == 2
    # The run is in run.storage too: rank 0's checkpoints (sent from its own process, on
    # whichever node it landed) and the driver's metrics.
    kept = tmp_path / "shared" / run_dir.name
    assert (kept / "metrics.csv").is_file() and (kept / "summary.json").is_file()
    assert (kept / "checkpoints" / "step-000000001600" / "meta.json").is_file()
    assert state["learners"]["shoal-learner-0"]["node_id"] in nodes
