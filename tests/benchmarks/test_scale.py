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


@pytest.mark.parametrize("n_agents", [3, 6])
def test_the_scripted_assignment_is_a_yardstick_above_random(n_agents: int) -> None:
    from benchmarks.scale import _assignment, _eval

    scripted, rand = _assignment(n_agents, episodes=20), _eval(None, n_agents, episodes=20)
    # Matched agents driving to their landmarks close most of random's shortfall.
    assert scripted["team_return"] > rand["team_return"] + 10 * scripted["stderr"]
    assert scripted["per_agent"] == pytest.approx(scripted["team_return"] / n_agents)
