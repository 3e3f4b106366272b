"""Replay learners trained end to end on the Relay toy (``tests/envs/toy_rllib.py``).

Relay: agent i earns 1 for action i; a2 leaves after step 2, so the best team return is 12
(5 + 5 + 2) and chance scores 4. Episodes end by a time limit, so a learner that treated the
limit as an end would bootstrap its last step wrongly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import load_config
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import preflight, run_training

RELAY = "rllib:tests.envs.toy_rllib:Relay"
RUN = ["redis.enabled=false", "run.progress=false", "run.tensorboard=false",
       "run.eval_every_s=null", "run.log_every_s=1e-9"]  # fmt: skip


def train_on_relay(
    tmp_path: Path, algorithm: str, steps: int, *overrides: str
) -> tuple[Path, dict[str, Any]]:
    """Train ``algorithm`` on Relay for ``steps`` env steps; its run directory and checkpoint."""
    cfg = load_config("spread-mlp", [
        *RUN, f"env.name={RELAY}", "env.num_envs=16", "train.rollout_len=10",
        f"train.algorithm={algorithm}", f"train.total_env_steps={steps}", "train.lr=0.003",
        "train.learning_starts=500", "train.replay_batch=256", "train.gamma=0.9",
        "model.hidden=32", *overrides,
    ])  # fmt: skip
    preflight(cfg)
    run_dir = tmp_path / algorithm
    run_dir.mkdir()
    summary = run_training(cfg, run_dir)
    assert summary["reason"] == "total_env_steps reached"
    return run_dir, load_checkpoint(run_dir)
