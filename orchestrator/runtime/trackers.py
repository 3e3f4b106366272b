"""Experiment trackers beside ``metrics.csv`` and TensorBoard: Weights & Biases and MLflow.

``run.loggers=[wandb,mlflow]`` adds one metrics sink per tracker in the driver process, fed
the very rows the CSV gets (the one metrics call site). Both work with no network:

- ``wandb`` writes an offline run under ``RUN_DIR/wandb`` (``run.wandb_mode=offline``, the
  default; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads it later), or logs online to
  ``run.experiment`` as its project when ``run.wandb_mode=online``.
- ``mlflow`` logs to ``run.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else a file store
  ``mlruns/`` beside the run directory (``mlflow ui --backend-store-uri runs/mlruns``), in the
  experiment ``run.experiment``.

The resolved config is each tracker's parameters; a ``--resume`` continues the same tracked
run. A tracker that is not installed is a :class:`~orchestrator.config.ConfigError` from
:func:`check_trackers`, before anything starts.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError

#: What to ``pip install`` for each tracker.
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}
MLFLOW_RUN_FILE = "mlflow_run_id"


def check_trackers(loggers: Sequence[str]) -> None:
    """Every tracker in ``run.loggers`` can be imported.

    Raises:
        ConfigError: naming the tracker and the package to install.
    """
    for name in loggers:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(
                f"run.loggers: {name} is not installed; pip install {PACKAGES[name]} "
                f"(or leave {name} out of run.loggers)"
            )


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as ``section.key`` parameters (lists and mappings as text)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", cfg.model_dump(mode="json"))
    return out


def _scalars(row: dict[str, float]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class WandbSink:
    """A W&B run fed every metrics row, plotted against ``env_steps``.

    Args:
        cfg: the run's config (its parameters in W&B; ``run.experiment`` is the project).
        run_dir: the run directory; the W&B files go to ``run_dir/wandb`` and its name is the
            W&B run's id, so a ``--resume`` continues the same W&B run.
    """

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        run_id = re.sub(r"[^\w-]", "-", run_dir.name)[:64]
        try:
            self.run = wandb.init(
                project=cfg.run.experiment,
                name=run_dir.name,
                id=run_id,
                resume="allow",
                dir=str(run_dir),
                mode=cfg.run.wandb_mode,
                config=flat_config(cfg),
            )
        except Exception as e:  # login, network, a bad project name: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(f"run.loggers: wandb could not start a run: {first}") from None
        # Env steps are the x axis: a resumed run re-logs steps past its checkpoint without
        # W&B's rule that its own step only grows.
        self.run.define_metric("env_steps")
        self.run.define_metric("*", step_metric="env_steps")

    def log(self, row: dict[str, float]) -> None:
        """One W&B history row: every finite number of the metrics row."""
        self.run.log(_scalars(row))

    def close(self) -> None:
        """Finish the run (an offline run's files are then complete)."""
        self.run.finish()
        import wandb

        wandb.teardown()  # waits for the W&B service to write the run out


class MLflowSink:
    """An MLflow run fed every metrics row, one metric per column at its env step.

    Args:
        cfg: the run's config (its parameters; ``run.experiment`` is the experiment).
        run_dir: the run directory; ``run_dir/mlflow_run_id`` remembers the MLflow run so a
            ``--resume`` continues it.
    """

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        # MLflow 3 keeps a file store working only when asked; it is the no-server default.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        uri = cfg.run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
        uri = uri or (run_dir.resolve().parent / "mlruns").as_uri()
        try:
            self.client = MlflowClient(tracking_uri=uri)
            id_file = run_dir / MLFLOW_RUN_FILE
            if id_file.is_file():
                self.run_id = id_file.read_text().strip()
                self.client.update_run(self.run_id, status="RUNNING")
                return
            found = self.client.get_experiment_by_name(cfg.run.experiment)
            exp = (
                found.experiment_id if found else self.client.create_experiment(cfg.run.experiment)
            )
            self.run_id = self.client.create_run(exp, run_name=run_dir.name).info.run_id
            self._params(flat_config(cfg))
        except Exception as e:  # an unreachable server, a store it refuses: one line
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RuntimeError(
                f"run.loggers: mlflow could not start a run at {uri}: {first}"
            ) from None
        id_file.write_text(self.run_id)

    def _params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log(self, row: dict[str, float]) -> None:
        """Every finite number of the row as a metric at the row's env step."""
        from mlflow.entities import Metric

        step = int(row.get("env_steps", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _scalars(row).items() if k != "env_steps"]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Mark the run finished."""
        self.client.set_terminated(self.run_id)


def tracker_sinks(cfg: Config, run_dir: Path) -> list[Any]:
    """One sink per tracker named in ``run.loggers``."""
    kinds = {"wandb": WandbSink, "mlflow": MLflowSink}
    return [kinds[name](cfg, run_dir) for name in cfg.run.loggers]
