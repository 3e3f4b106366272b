"""TensorBoard files: TensorBoard's reader finds the CSV's scalars; a resume drops redone steps."""

from __future__ import annotations

import csv
import math

import pytest

from orchestrator.config import load_config
from orchestrator.runtime.checkpoint import list_checkpoints
from orchestrator.runtime.driver import run_training

TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "model.hidden=16",
    "run.progress=false",
    "redis.enabled=false",
    "run.log_every_s=0.001",
    "run.eval_every_s=null",
    "run.checkpoint_every_steps=160",
]


def _scalars(run_dir) -> dict[str, dict[int, float]]:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def test_event_files_hold_the_csvs_scalars(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("tag-mlp", [*TINY, "train.total_env_steps=480"]), run_dir)
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    scalars = _scalars(run_dir)
    assert {"episode_return", "return/adversary", "policy_loss", "env_steps_per_s"} <= set(scalars)
    _same_as_csv(scalars, rows, ("policy_loss", "value_loss", "return/agent"))


def _same_as_csv(scalars, rows, keys) -> None:  # noqa: ANN001
    for row in rows:
        step = int(float(row["env_steps"]))
        for key in keys:
            if row[key] and math.isfinite(float(row[key])):
                assert scalars[key][step] == pytest.approx(float(row[key]), rel=1e-6), key


def test_a_resumed_run_drops_the_steps_it_redoes(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("spread-mlp", [*TINY, "train.total_env_steps=480"]), run_dir)
    middle = list_checkpoints(run_dir / "checkpoints")[0]  # at 160: 240 to 480 are redone
    assert middle.name.endswith("160")
    cfg = load_config("spread-mlp", [*TINY, "train.total_env_steps=640"])
    run_training(cfg, run_dir, resume=str(middle))
    scalars = _scalars(run_dir)
    assert sorted(scalars["policy_loss"]) == list(range(80, 641, 80))  # each step once
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    _same_as_csv(scalars, rows, ("policy_loss", "value_loss"))  # the redone values, not the first
