"""The scale benchmark's one-size measurement runs and reports what it says it does."""

from __future__ import annotations

import pytest

from benchmarks.scale import POLICIES, measure_one


def test_one_size_measures_collect_update_and_memory() -> None:
    res = measure_one("spread-gnn-swarm", n_agents=20, num_envs=2, iterations=1, threads=None)
    assert res["env_steps_per_s"] > 0
    assert res["agent_steps_per_s"] == pytest.approx(res["env_steps_per_s"] * 20)
    assert 0 < res["collect_share"] < 1 and res["peak_rss_mib"] > 0
    # A graph policy on kNN lists reads the entity graph and its lists, not mpe2's vectors.
    assert "neighbours" in res["input_keys"] and "obs" not in res["input_keys"]


def test_every_policy_names_a_preset_and_a_size_limit() -> None:
    from orchestrator.config import preset_names

    for preset, _, largest in POLICIES.values():
        assert preset in preset_names() and largest >= 24
