"""Run state against a real Redis: status, config, metrics, heartbeats and the stop flag."""

from __future__ import annotations

import time

import pytest

from agents.memory import RunState, connect, list_runs
from tests.agents.memory.helpers import redis_test, run_id


@redis_test
def test_run_state_round_trip_and_stop_request(client, redis_server) -> None:
    run = run_id()
    state = RunState(client, run)
    with pytest.raises(LookupError):
        state.get()
    state.set_status("starting")
    started = state.get()["started"]
    state.set_config({"preset": "spread-gnn", "n_agents": 3})
    state.set_status("running", iteration=12, env_steps=4096)
    state.set_metrics({"return": -1.5, "loss": 0.25})
    state.heartbeat("shoal-rollout-0")
    state.heartbeat("shoal-learner-0")
    got = state.get()
    assert got["run_id"] == run and got["status"] == "running"
    assert got["started"] == started <= got["updated"] <= time.time()
    assert got["config"] == {"preset": "spread-gnn", "n_agents": 3}
    assert got["metrics"] == {"return": -1.5, "loss": 0.25}
    assert got["iteration"] == 12 and got["env_steps"] == 4096
    assert set(got["heartbeats"]) == {"shoal-rollout-0", "shoal-learner-0"}
    assert all(abs(t - time.time()) < 60 for t in got["heartbeats"].values())
    assert got["stop_requested"] is False and state.stop_requested() is False
    with connect(redis_server.url) as other:  # `shoal stop` runs in another process
        RunState(other, run).request_stop()
        assert run in list_runs(other)
    assert state.stop_requested() is True and state.get()["stop_requested"] is True
    with pytest.raises(ValueError, match="reserved"):
        state.set_status("running", metrics={})
