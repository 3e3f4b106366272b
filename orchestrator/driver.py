"""Choose the execution path for a run and wrap it in the run's shared memory (Redis)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from orchestrator.config import Config
from orchestrator.runstate import RunStateSink, SharedMemory, write_summary
from orchestrator.services import redis_server_installed
from orchestrator.trainer import LocalTrainer

log = logging.getLogger(__name__)


def is_distributed(cfg: Config) -> bool:
    """True when the run goes through Ray: workers, several ranks, a cluster, or ``ray.force``."""
    topology = cfg.rollout.num_workers > 0 or cfg.learner.num_ranks > 1
    return topology or cfg.ray.address is not None or cfg.ray.force


def throttled(check: Callable[[], bool], every_s: float = 0.5) -> Callable[[], bool]:
    """Call ``check`` at most every ``every_s`` seconds; a true answer sticks."""
    last = [0.0, False]

    def wrapped() -> bool:
        now = time.monotonic()
        if not last[1] and now - float(last[0]) >= every_s:
            last[0], last[1] = now, bool(check())
        return bool(last[1])

    return wrapped


def _record_failure(mem: SharedMemory, error: BaseException) -> None:
    """Mark the run failed in Redis, without waiting out an outage that may be the failure."""
    if mem.client is not None:
        mem.client.outage_timeout = min(mem.client.outage_timeout, 5.0)
    try:
        mem.state.set_status("failed", error=f"{type(error).__name__}: {error}")
    except redis.RedisError:
        log.warning("could not record the failure in Redis at %s", mem.address)


def run_training(
    cfg: Config, run_dir: Path, resume: str | Path | None = None, console: Console | None = None
) -> dict[str, Any]:
    """Train with ``cfg`` into ``run_dir``; returns the trainer's summary.

    With Redis enabled (the default) run state, heartbeats and metrics are mirrored into it so
    ``shoal status`` / ``shoal stop`` work while the run is alive.
    """
    local = not is_distributed(cfg)
    if cfg.redis.enabled and local and cfg.redis.url is None and not redis_server_installed():
        # Redis serves status/stop and the replay stream here; the training needs none of it.
        log.warning(
            "redis-server is not installed, so this run trains without Redis and `shoal "
            "status` / `shoal stop` will not see it (Ctrl-C still checkpoints). Install it "
            "(`apt-get install redis-server`, `brew install redis`) or set "
            "redis.enabled=false to train without it quietly."
        )
        cfg = cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"enabled": False})})
    if not cfg.redis.enabled:
        if not local:
            raise ValueError("distributed runs need Redis: remove redis.enabled=false")
        summary = LocalTrainer(cfg, run_dir, resume=resume, console=console).train()
        write_summary(run_dir, summary)
        return summary
    with SharedMemory(cfg.redis, run_dir.name, run_dir) as mem:
        mem.state.set_status("starting", run_dir=str(run_dir.resolve()), pid=os.getpid())
        mem.state.set_config(
            {
                "preset": cfg.preset,
                "env": cfg.env.name,
                "n_agents": cfg.env.n_agents,
                "model": cfg.model.kind,
                "workers": cfg.rollout.num_workers,
                "ranks": cfg.learner.num_ranks,
            }
        )
        try:
            if is_distributed(cfg):
                from orchestrator.distributed import run_distributed

                summary = run_distributed(cfg, run_dir, resume=resume, console=console, memory=mem)
            else:
                trainer = LocalTrainer(
                    cfg,
                    run_dir,
                    resume=resume,
                    console=console,
                    extra_sinks=[RunStateSink(mem.state)],
                    should_stop=throttled(mem.state.stop_requested),
                )
                mem.state.set_status("running")
                summary = trainer.train()
        except BaseException as e:
            _record_failure(mem, e)
            raise
        mem.state.set_status("finished", reason=summary["reason"])
    write_summary(run_dir, summary)
    return summary
