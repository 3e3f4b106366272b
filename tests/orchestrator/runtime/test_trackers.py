"""W&B (offline) and MLflow (file store) get the CSV's rows; a missing package is one line."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from orchestrator.cli.main import main as shoal
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.trackers import MLFLOW_RUN_FILE

TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "model.hidden=16",
    "run.progress=false",
    "redis.enabled=false",
    "run.log_every_s=0.001",
    "run.eval_every_s=null",
]


def _csv(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _records(path: Path) -> list[bytes]:
    """The records of a W&B ``.wandb`` file (a LevelDB log: 32 KiB blocks of chunks)."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            out.append(pending)
            pending = b""
    return out


def _wandb_history(run_dir: Path) -> list[dict[str, float]]:
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = []
    for raw in _records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
    return rows


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_an_offline_wandb_run_holds_the_csvs_rows(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("tag-mlp", [*TINY, "train.total_env_steps=480", "run.loggers=[wandb]"])
    run_training(cfg, run_dir)
    by_step = {int(r["env_steps"]): r for r in _wandb_history(run_dir)}
    rows = _csv(run_dir)
    assert sorted(by_step) == [int(float(r["env_steps"])) for r in rows]
    for row in rows:
        logged = by_step[int(float(row["env_steps"]))]
        for key in ("policy_loss", "value_loss", "return/adversary"):
            if row[key] and math.isfinite(float(row[key])):
                assert logged[key] == pytest.approx(float(row[key]), rel=1e-6), key


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed")
def test_mlflow_gets_the_csvs_rows_and_a_resume_continues_the_same_run(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "runs" / "run"
    run_dir.mkdir(parents=True)
    base = [*TINY, "run.loggers=[mlflow]", "run.experiment=trackers-test"]
    run_training(load_config("spread-mlp", [*base, "train.total_env_steps=320"]), run_dir)
    run_id = (run_dir / MLFLOW_RUN_FILE).read_text()
    latest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    run_training(
        load_config("spread-mlp", [*base, "train.total_env_steps=640"]), run_dir, str(latest)
    )
    assert (run_dir / MLFLOW_RUN_FILE).read_text() == run_id  # the same MLflow run, continued
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.total_env_steps"] == "320"
    history = {m.step: m.value for m in client.get_metric_history(run_id, "policy_loss")}
    rows = _csv(run_dir)
    assert max(history) == 640
    for row in rows:
        assert history[int(float(row["env_steps"]))] == pytest.approx(float(row["policy_loss"]))


def test_a_tracker_that_is_not_installed_is_one_line_and_nothing_starts(
    tmp_path, monkeypatch, capsys
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    args = ["run", "spread-mlp", "run.loggers=[mlflow]", f"run.dir={tmp_path / 'runs'}"]
    assert shoal(args) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: run.loggers: mlflow is not installed; pip install mlflow-skinny "
        "(or leave mlflow out of run.loggers)\n"
    )
    assert not (tmp_path / "runs").exists()


def test_an_unknown_tracker_names_the_ones_there_are(capsys) -> None:
    assert shoal(["run", "spread-mlp", "run.loggers=[neptune]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run.loggers") and "wandb" in err and err.count("\n") == 1, err
