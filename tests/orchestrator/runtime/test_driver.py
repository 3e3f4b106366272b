"""Choosing a run's path: what happens when Redis cannot be started."""

from __future__ import annotations

import logging

import pytest

from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.services import RedisServerError

TINY = ["env.num_envs=8", "train.rollout_len=10", "train.total_env_steps=200", "run.progress=false"]


@pytest.fixture
def no_redis_server(tmp_path, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # a machine where redis-server is not installed


@pytest.mark.usefixtures("no_redis_server")
def test_local_run_without_redis_server_trains_and_says_what_is_missing(tmp_path, caplog) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with caplog.at_level(logging.WARNING, logger="orchestrator.runtime.driver"):
        summary = run_training(load_config("spread-mlp", TINY), run_dir)
    assert summary["reason"] == "total_env_steps reached"
    assert (run_dir / "summary.json").is_file() and not (run_dir / ".redis.json").exists()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "redis-server is not installed" in warning and "redis.enabled=false" in warning
    assert "enabled: false" in (run_dir / "config.yaml").read_text()  # the record says so too


@pytest.mark.usefixtures("no_redis_server")
def test_distributed_run_without_redis_server_fails_before_starting_ray(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("spread-gnn", [*TINY, "rollout.num_workers=1"])
    with pytest.raises(RedisServerError, match=r"'redis-server' not found.*redis\.url="):
        run_training(cfg, run_dir)
