"""The driver process on Ray: a Ray session, the run's actors, and a learner group kept alive.

:func:`train_on_ray` starts a small local Ray instance (dashboard on 127.0.0.1) or joins one,
starts the rollout actors and the learner group (``orchestrator.runtime.placement``), and
relays rank 0's metric rows to the driver's sinks (terminal, ``metrics.csv``, Redis run state,
Ray metrics). Failures are handled at two levels:

* a rollout actor that dies is restarted by Ray and its batch re-collected by its rank; the
  restart is counted (``rollout_restarts``) in the metrics and checkpoints;
* a learner rank that fails takes the group down; the group restarts from the run's newest
  checkpoint up to ``learner.max_failures`` times. Failures no restart can fix (Redis gone
  for longer than ``redis.outage_timeout_s``, a rollout worker that keeps dying) end the run
  with a ``RuntimeError`` saying why.
"""

from __future__ import annotations

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

from agents.memory import RedisUnavailable
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import checkpoint_counters, latest_checkpoint
from orchestrator.runtime.learner import learner_name
from orchestrator.runtime.loop import FatalRunError, sigterm_as_interrupt
from orchestrator.runtime.metrics import CSVSink, Metrics
from orchestrator.runtime.placement import (
    STARTUP_TIMEOUT_S,
    LearnerGroup,
    start_rollout_actors,
    start_world_model,
)
from orchestrator.runtime.ray_metrics import RayMetricsSink
from orchestrator.runtime.services import SharedMemory

log = logging.getLogger(__name__)


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

    An already-initialised Ray (a notebook, a test) is used as it is and left running. The
    run's CPU needs were checked against ``ray.num_cpus`` before (``driver.check_topology``).

    Yields:
        The dashboard URL of a local instance, else ``None``.
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
        num_cpus = cfg.ray.num_cpus or max(1, math.ceil(cfg.reserved_cpus()))
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


def train_on_ray(
    cfg: Config,
    run_dir: Path,
    resume: str | Path | None,
    memory: SharedMemory,
    metrics: Metrics,
    csv_sink: CSVSink,
    start: dict[str, Any],
) -> dict[str, Any]:
    """Train on Ray; returns what the learner rank's ``train`` returns.

    Args:
        cfg: the run config.
        run_dir: absolute run directory (shared storage on a multi-node cluster: rank 0
            writes checkpoints there).
        resume: a checkpoint or run directory to continue from.
        memory: the run's Redis (weights, replay stream, run state).
        metrics: the driver's sinks; rows relayed from rank 0 go there.
        csv_sink: the ``metrics.csv`` sink among them (trimmed when the group restarts).
        start: the counters the run starts from.

    Raises:
        RuntimeError: when the run cannot continue; the message says why.
    """
    assert memory.url is not None and memory.client is not None
    namespace = f"shoal-{memory.run_id}"
    client = memory.client
    previous_hook = client.on_reconnect
    client.on_reconnect = lambda: memory.state.set_status("running")
    try:
        with ray_session(cfg, namespace) as dashboard:
            # Rows come from learner rank 0 and are relayed here, once Ray is up.
            metrics.sinks.append(RayMetricsSink(memory.run_id, "learner"))
            workers: list[Any] = []
            world: tuple[Any, Any] | None = None
            try:
                workers, infos = start_rollout_actors(
                    cfg, memory.url, memory.run_id, namespace, int(start["iteration"])
                )
                if cfg.world_model.enabled and workers:
                    world = start_world_model(cfg, run_dir, memory.url, memory.run_id, namespace)
                memory.state.set_status(
                    "running", actors={i["name"]: i for i in infos}, dashboard=dashboard
                )
                with sigterm_as_interrupt():
                    return _supervise(cfg, run_dir, resume, memory, metrics, csv_sink, start)
            finally:
                if world is not None:
                    _stop_world_model(*world)
                for h in workers:
                    ray.kill(h, no_restart=True)
    except RedisUnavailable as err:  # the driver's own Redis calls
        raise RuntimeError(f"the run cannot continue: {err}") from None
    finally:
        client.on_reconnect = previous_hook


def _stop_world_model(handle: Any, ref: Any) -> None:
    """Let the world-model actor checkpoint and end its loop, then release it."""
    try:
        handle.stop.remote()
        ray.get(ref, timeout=60)
    except (RayActorError, RayTaskError, GetTimeoutError) as err:
        log.warning("the world-model actor did not stop cleanly: %s", str(err).splitlines()[0])
    ray.kill(handle, no_restart=True)


def _supervise(
    cfg: Config,
    run_dir: Path,
    resume: str | Path | None,
    memory: SharedMemory,
    metrics: Metrics,
    csv_sink: CSVSink,
    start: dict[str, Any],
) -> dict[str, Any]:
    """Start the learner group and restart it from the newest checkpoint after failures.

    The returned ``seconds`` count time in the training loop, failed attempts included, not
    time spent starting processes (as in-process).
    """
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
            learners = {learner_name(i["rank"]): i for i in group.infos}
            memory.state.set_status("running", learners=learners)
            restarts = int(start["learner_restarts"]) + failures
            refs = [h.train.remote(ckpt, remaining, restarts) for h in group.ranks]
            out = _watch(group, refs, metrics)
            return {**out, "seconds": lost + float(out["seconds"])}
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
            csv_sink.truncate(checkpoint_counters(latest_checkpoint(run_dir, resume))["env_steps"])
        finally:
            group.shutdown()
