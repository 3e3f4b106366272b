"""What a run directory holds, and the files every process agrees on.

``runs/<id>/``: ``config.yaml`` (resolved, secrets redacted), ``metrics.csv``,
``checkpoints/step-*``, ``summary.json`` at the end, and ``.redis.json`` (mode 0600) while a
private Redis serves the run. ``RUN`` on the command line is the directory or the id.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.config import Config, ConfigError, RunConfig

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
# How `shoal status` / `shoal stop` reach a run's private redis-server from another terminal.
CONN_FILE = ".redis.json"


def new_run_dir(cfg: Config) -> Path:
    """``<run.dir>/<run.name or preset-timestamp>``, created."""
    name = cfg.run.name or f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.dir) / name
    suffix = 1
    while path.exists() and cfg.run.name is None:
        path = Path(cfg.run.dir) / f"{name}-{suffix}"
        suffix += 1
    return make_dir(path, "run.dir")


def make_dir(path: Path, key: str) -> Path:
    """Create ``path`` (and its parents), or say in one line which key to change.

    Raises:
        ConfigError: ``path`` cannot be created (no permission, a file in the way, a
            read-only or full disk), naming ``key``.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"{key}: cannot create '{path}' ({reason}); choose a directory you can write, "
            f"e.g. {key}=$HOME/runs"
        ) from None
    return path


def find_run(target: str, runs_dir: str | None = None) -> str:
    """``target`` if it exists, else ``runs_dir/target`` if that does.

    So commands that take a run directory also take the run id ``shoal status`` lists.
    ``runs_dir`` defaults to ``run.dir``'s default, ``runs``. A URI (``s3://bucket/p/RUN``, a
    run kept in ``run.storage``) is fetched into the local cache and that copy returned.
    """
    from orchestrator.runtime.storage import is_uri, local_copy

    if is_uri(target):
        return str(local_copy(target))
    if Path(target).exists():
        return target
    under = Path(runs_dir or RunConfig.model_fields["dir"].default) / target
    return str(under) if under.exists() else target


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``RUN_DIR/summary.json``: what ``shoal status`` shows after the run's Redis is gone."""
    keep = {k: v for k, v in summary.items() if k != "checkpoints"}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(keep, indent=2, default=str))
