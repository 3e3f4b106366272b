"""Training on Ray: rollout actors, a learner group, and a driver that relays metrics.

``run_distributed`` starts a small local Ray instance (dashboard on 127.0.0.1) or joins one,
starts ``rollout.num_workers`` named rollout actors (``shoal-rollout-<i>``) and a learner
group of ``learner.num_ranks`` named ranks (``shoal-learner-<r>``), then relays rank 0's
metric rows to the sinks (terminal, ``metrics.csv``, Redis run state, and whatever sinks the
caller adds, e.g. Ray metrics). Failures are handled at two levels:

* a rollout actor that dies is restarted by Ray and its batch re-collected by its rank; the
  restart is counted (``rollout_restarts``) in the metrics and checkpoints;
* a learner rank that fails takes the group down; the group restarts from the run's newest
  checkpoint up to ``learner.max_failures`` times. Failures no restart can fix (Redis gone
  for longer than ``redis.outage_timeout_s``, a rollout worker that keeps dying) end the run
  with a ``RuntimeError`` saying why.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from rich.console import Console

from agents.memory import RedisUnavailable
from orchestrator.checkpoint import list_checkpoints, resolve_checkpoint
from orchestrator.config import Config, config_to_yaml
from orchestrator.learner_group import (
    SESSION_COUNTERS,
    LearnerGroup,
    latest_checkpoint,
    wait_name_free,
)
from orchestrator.metrics import CSVSink, Metrics, MetricsSink, ProgressSink
from orchestrator.ray_metrics import RayMetricsSink
from orchestrator.rollout_actor import FatalRunError, RolloutActor, rollout_name
from orchestrator.runstate import RunStateSink, SharedMemory
from orchestrator.trainer import sigterm_as_interrupt

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 180.0


def required_cpus(cfg: Config) -> float:
    """Ray CPUs the run's actors reserve."""
    return (
        cfg.rollout.num_workers * cfg.rollout.cpus_per_worker
        + cfg.learner.num_ranks * cfg.learner.cpus_per_rank
    )


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens on it on loopback, else a free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    log.warning("Ray dashboard port %d is taken (another Ray?); using %d", preferred, port)
    return port


@contextmanager
def ray_session(cfg: Config, namespace: str) -> Iterator[str | None]:
    """Join ``ray.address``, or start a local instance sized for the run; shut down after.

    An already-initialised Ray (a notebook, a test) is used as it is and left running.

    Yields:
        The dashboard URL of a local instance, else ``None``.

    Raises:
        ValueError: if ``ray.num_cpus`` is too small for the configured actors.
    """
    if ray.is_initialized():
        yield None
        return
    dashboard: str | None = None
    common: dict[str, Any] = {"namespace": namespace, "log_to_driver": cfg.ray.log_to_driver}
    if cfg.ray.address:
        try:
            ray.init(address=cfg.ray.address, **common)
        except ConnectionError as err:
            raise RuntimeError(f"cannot join Ray at {cfg.ray.address!r}: {err}") from None
    else:
        need = required_cpus(cfg)
        num_cpus = cfg.ray.num_cpus or max(1, math.ceil(need))
        if num_cpus < need:
            raise ValueError(
                f"ray.num_cpus={num_cpus} but the run reserves {need:g} CPUs "
                f"({cfg.rollout.num_workers} x rollout.cpus_per_worker="
                f"{cfg.rollout.cpus_per_worker:g} + {cfg.learner.num_ranks} x "
                f"learner.cpus_per_rank={cfg.learner.cpus_per_rank:g}); raise ray.num_cpus or "
                "lower the per-actor CPUs"
            )
        port = _free_port(cfg.ray.dashboard_port) if cfg.ray.include_dashboard else None
        context = ray.init(
            num_cpus=num_cpus,
            include_dashboard=cfg.ray.include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=port,
            object_store_memory=cfg.ray.object_store_mb * 2**20,
            **common,
        )
        if cfg.ray.include_dashboard and context.dashboard_url:
            dashboard = f"http://{context.dashboard_url}"
    try:
        yield dashboard
    finally:
        ray.shutdown()


def start_rollout_actors(
    cfg: Config, redis_url: str, run_id: str, namespace: str, iteration: int
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Start the named rollout actors, spread over the cluster's nodes.

    Returns:
        ``(handles, infos)``; each info holds ``name``, ``pid``, ``node_id``.

    Raises:
        RuntimeError: if the actors cannot be placed within the start-up timeout.
    """
    cls: Any = ray.remote(RolloutActor)
    data = cfg.model_dump(mode="json")
    handles: list[Any] = []
    for i in range(cfg.rollout.num_workers):
        wait_name_free(rollout_name(i), namespace)
        handles.append(
            cls.options(
                name=rollout_name(i),
                namespace=namespace,
                num_cpus=cfg.rollout.cpus_per_worker,
                max_restarts=cfg.rollout.max_restarts,
                max_task_retries=0,  # the rank decides what a lost batch means
                max_concurrency=2,
                scheduling_strategy="SPREAD",
            ).remote(data, i, redis_url, run_id, cfg.train.seed + 1000 * (i + 1) + iteration)
        )
    try:
        infos = ray.get([h.info.remote() for h in handles], timeout=STARTUP_TIMEOUT_S)
    except GetTimeoutError:
        for h in handles:
            ray.kill(h, no_restart=True)
        raise RuntimeError(
            f"{len(handles)} rollout workers x {cfg.rollout.cpus_per_worker:g} CPU did not start "
            f"within {STARTUP_TIMEOUT_S:g} s (available: {ray.available_resources()}); lower "
            "rollout.num_workers or rollout.cpus_per_worker, or add nodes"
        ) from None
    return handles, infos


class _GroupFailed(Exception):
    def __init__(self, message: str, fatal: bool, detail: str = "") -> None:
        super().__init__(message)
        self.fatal, self.detail = fatal, detail


_ERROR_LINE = re.compile(r"^\s*[\w.]*(Error|Exception)\b:?")


def _failure(err: BaseException) -> _GroupFailed:
    """Classify a learner failure; its message is one line naming the error."""
    cause = err.cause if isinstance(err, RayTaskError) else err
    if isinstance(cause, (FatalRunError, RedisUnavailable)):
        return _GroupFailed(str(cause).splitlines()[0], fatal=True)
    if isinstance(err, RayActorError):
        return _GroupFailed(f"a learner rank died: {str(err).splitlines()[0]}", False, str(err))
    # Ray's text is the remote traceback; the line naming the exception is the useful one.
    lines = [line.strip() for line in str(err).splitlines() if _ERROR_LINE.match(line)]
    summary = lines[-1] if lines else f"{type(cause).__name__}: {cause}"
    return _GroupFailed(summary[:500], fatal=False, detail=str(err))


def _relay(rank0: Any, metrics: Metrics) -> None:
    try:
        rows = ray.get(rank0.drain.remote(), timeout=60)
    except (RayActorError, GetTimeoutError) as err:
        raise _failure(err) from None
    for row in rows:
        try:
            metrics.log(row)
        except RedisUnavailable as err:
            raise _GroupFailed(str(err), fatal=True) from None


def _watch(group: LearnerGroup, refs: list[Any], metrics: Metrics) -> dict[str, Any]:
    """Relay metrics until every rank returns; the first failure ends the wait."""
    rank0 = group.ranks[0]
    pending, results = list(refs), {}
    interrupted = False
    while pending:
        try:
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0.3)
            for ref in ready:
                try:
                    results[ref] = ray.get(ref)
                except (RayTaskError, RayActorError) as err:
                    raise _failure(err) from None
            _relay(rank0, metrics)
        except KeyboardInterrupt:
            if interrupted:
                raise
            interrupted = True
            log.warning("interrupted: the learners checkpoint and stop (Ctrl-C again to abort)")
            rank0.request_stop.remote("interrupted")
    _relay(rank0, metrics)
    return results[refs[0]]


def _checkpoint_counters(path: str | Path | None) -> dict[str, Any]:
    counters: dict[str, Any] = {"env_steps": 0, "iteration": 0, "wall_time": 0.0}
    if path is not None:
        meta = json.loads((resolve_checkpoint(path) / "meta.json").read_text())
        counters.update(meta["counters"])
    for key in SESSION_COUNTERS:
        counters.setdefault(key, 0)
    return counters


def run_distributed(
    cfg: Config,
    run_dir: Path,
    resume: str | Path | None = None,
    console: Console | None = None,
    memory: SharedMemory | None = None,
    extra_sinks: list[MetricsSink] | None = None,
) -> dict[str, Any]:
    """Train on Ray; returns the same summary as ``LocalTrainer.train()``.

    Args:
        cfg: the run config.
        run_dir: where config, metrics and checkpoints go (shared storage on a multi-node
            cluster: rank 0 writes checkpoints there).
        resume: a checkpoint or run directory to continue from.
        console: rich console for the progress bar.
        memory: the run's Redis (weights, replay stream, run state); required.
        extra_sinks: more metric destinations (the place for Ray/Prometheus metrics).

    Raises:
        RuntimeError: when the run cannot continue; the message says why.
    """
    if memory is None or memory.url is None:
        raise ValueError("distributed runs need Redis: remove redis.enabled=false")
    run_dir = Path(run_dir).resolve()
    namespace = f"shoal-{memory.run_id}"
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    start = _checkpoint_counters(resume)
    csv_sink = CSVSink(run_dir / "metrics.csv")
    if resume is not None:
        csv_sink.truncate(start["env_steps"])
    # Destinations of every metric row; a ray.util.metrics sink belongs in extra_sinks.
    sinks: list[MetricsSink] = [csv_sink, RunStateSink(memory.state), *(extra_sinks or [])]
    if cfg.run.progress:
        sinks.append(ProgressSink(cfg.train.total_env_steps, start["env_steps"], console))
    metrics = Metrics(sinks)
    client = memory.client
    assert client is not None
    previous_hook = client.on_reconnect
    client.on_reconnect = lambda: memory.state.set_status("running")
    try:
        with ray_session(cfg, namespace) as dashboard:
            # Rows come from learner rank 0 and are relayed here, once Ray is up.
            metrics.sinks.append(RayMetricsSink(memory.run_id, "learner"))
            workers: list[Any] = []
            try:
                workers, infos = start_rollout_actors(
                    cfg, memory.url, memory.run_id, namespace, int(start["iteration"])
                )
                memory.state.set_status(
                    "running", actors={i["name"]: i for i in infos}, dashboard=dashboard
                )
                with sigterm_as_interrupt():
                    out, seconds = _train(cfg, run_dir, resume, memory, metrics, csv_sink, start)
            finally:
                for h in workers:
                    ray.kill(h, no_restart=True)
    except RedisUnavailable as err:  # the driver's own Redis calls
        raise RuntimeError(f"the run cannot continue: {err}") from None
    finally:
        metrics.close()
        client.on_reconnect = previous_hook
    counters = out["counters"]
    return {
        "reason": out["reason"],
        "counters": counters,
        "metrics": metrics.latest or out["metrics"],
        "checkpoint": out["checkpoint"],
        "run_dir": str(run_dir),
        "train_seconds": seconds,
        "steps_this_session": int(counters["env_steps"]) - int(start["env_steps"]),
        "checkpoints": [str(p) for p in list_checkpoints(run_dir / "checkpoints")],
    }


def _train(
    cfg: Config,
    run_dir: Path,
    resume: str | Path | None,
    memory: SharedMemory,
    metrics: Metrics,
    csv_sink: CSVSink,
    start: dict[str, Any],
) -> tuple[dict[str, Any], float]:
    """Start the learner group and restart it from the newest checkpoint after failures."""
    failures = 0
    t0 = time.monotonic()
    lost = 0.0  # seconds spent in attempts that failed
    limit = cfg.train.time_limit_s
    while True:
        ckpt = latest_checkpoint(run_dir, resume)
        remaining = None if limit is None else max(limit - (time.monotonic() - t0), 0.0)
        group = LearnerGroup(cfg, run_dir, memory.url, memory.run_id, f"shoal-{memory.run_id}")
        attempt_t0 = time.monotonic()
        try:
            try:
                group.start(timeout_s=STARTUP_TIMEOUT_S)
            except (RayActorError, RayTaskError, GetTimeoutError) as err:
                raise _failure(err) from None  # e.g. a rank died while the group formed
            learners = {f"shoal-learner-{i['rank']}": i for i in group.infos}
            memory.state.set_status("running", learners=learners)
            restarts = int(start["learner_restarts"]) + failures
            refs = [h.train.remote(ckpt, remaining, restarts) for h in group.ranks]
            out = _watch(group, refs, metrics)
            # Like the in-process path: time in the loop, not in starting processes.
            return out, lost + float(out["seconds"])
        except _GroupFailed as failed:
            lost += time.monotonic() - attempt_t0
            if failed.fatal:
                raise RuntimeError(f"the run cannot continue: {failed}") from None
            failures += 1
            if failures > cfg.learner.max_failures:
                raise RuntimeError(
                    f"the learner group failed {failures} times (learner.max_failures="
                    f"{cfg.learner.max_failures}); last failure: {failed}"
                ) from None
            log.warning(
                "learner group failed (%s); restart %d of %d from the last checkpoint",
                failed,
                failures,
                cfg.learner.max_failures,
            )
            log.debug("learner group failure:\n%s", failed.detail)
            # Rows past the checkpoint describe progress the restart will redo.
            csv_sink.truncate(_checkpoint_counters(latest_checkpoint(run_dir, resume))["env_steps"])
        finally:
            group.shutdown()
