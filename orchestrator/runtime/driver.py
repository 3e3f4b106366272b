"""The driver: the process ``shoal run`` starts, in every topology.

It checks that the run can start (:func:`preflight`), starts or joins the run's Redis, owns the
metric sinks (terminal, ``metrics.csv``, Redis run state) and the summary, and hosts the
learning: in-process it builds the one :class:`~orchestrator.runtime.learner.LearnerRank` and
calls its ``train``; on Ray it hands over to :func:`~orchestrator.runtime.ray_driver.
train_on_ray`, which starts the same class as actors and relays their rows to the same sinks.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console

from agents.algorithm import algorithm_spec
from envs import EnvError
from envs.registry import describe
from orchestrator.config import Config, ConfigError, config_to_yaml, redact_url
from orchestrator.config.groups import GroupError, check_inits
from orchestrator.runtime import storage, video, world
from orchestrator.runtime.checkpoint import checkpoint_counters, init_groups, list_checkpoints
from orchestrator.runtime.learner import LearnerRank
from orchestrator.runtime.loop import FatalRunError, redis_outage
from orchestrator.runtime.metrics import (
    CSVSink,
    Metrics,
    MetricsSink,
    ProgressSink,
    RunStateSink,
    TensorBoardSink,
)
from orchestrator.runtime.rundir import CONFIG_FILE, write_summary
from orchestrator.runtime.trackers import check_trackers, tracker_sinks

if TYPE_CHECKING:
    from orchestrator.runtime.services import SharedMemory

log = logging.getLogger(__name__)


def runs_on_ray(cfg: Config) -> bool:
    """True when the run goes through Ray: workers, several ranks, a cluster, or ``ray.force``."""
    topology = cfg.rollout.num_workers > 0 or cfg.learner.num_ranks > 1
    return topology or cfg.ray.address is not None or cfg.ray.force


def check_topology(cfg: Config) -> None:
    """Combinations a config section alone cannot rule out (``--ray``, ``--address`` come later).

    Raises:
        ConfigError: naming the keys.
    """
    if not runs_on_ray(cfg):
        return
    if not cfg.redis.enabled:
        raise ConfigError(
            "redis.enabled=false: runs on Ray (rollout.num_workers > 0, learner.num_ranks > 1, "
            "ray.address or --ray) keep weights and run state in Redis; remove "
            "redis.enabled=false"
        )
    workers = cfg.rollout.num_workers
    if workers and cfg.streams_batches():
        # A rank reads a batch's entries after its workers wrote them; two rounds may be
        # in the stream unread (with rollout.max_staleness=1).
        if cfg.redis.replay_maxlen < 2 * workers:
            raise ConfigError(
                f"redis.replay_maxlen={cfg.redis.replay_maxlen}: {cfg.train.algorithm}'s "
                f"batches travel through the replay stream, one entry per rollout worker; "
                f"raise it to at least {2 * workers} (2 x rollout.num_workers)"
            )
        kept = cfg.redis.replay_maxlen * cfg.train.rollout_len * cfg.env.num_envs
        if kept < cfg.train.replay_size:
            log.warning(
                "the replay stream keeps ~%d transitions (redis.replay_maxlen=%d entries), "
                "fewer than train.replay_size=%d: a restarted learner refills only those",
                kept, cfg.redis.replay_maxlen, cfg.train.replay_size,
            )  # fmt: skip
    need = cfg.reserved_cpus()
    world = ""
    if cfg.world_model.enabled and cfg.rollout.num_workers:
        world = f" + world_model.actor_cpus={cfg.world_model.actor_cpus:g}"
    if cfg.ray.address is None and cfg.ray.num_cpus is not None and cfg.ray.num_cpus < need:
        raise ConfigError(
            f"ray.num_cpus={cfg.ray.num_cpus} but the run reserves {need:g} CPUs "
            f"({cfg.rollout.num_workers} x rollout.cpus_per_worker="
            f"{cfg.rollout.cpus_per_worker:g} + {cfg.learner.num_ranks} x "
            f"learner.cpus_per_rank={cfg.learner.cpus_per_rank:g}{world}); raise "
            "ray.num_cpus or lower the per-actor CPUs"
        )


def check_services(cfg: Config, timeout_s: float = 5.0) -> None:
    """A Ray address or Redis URL the run is told to join must answer now, not after minutes.

    Ray keeps retrying an address where nothing listens, and a shared Redis that refuses the
    password would fail only once the run directory exists.

    Raises:
        ConfigError: naming the key, the address and what went wrong.
    """
    address = cfg.ray.address
    if address and address != "auto":  # an address means Ray; `auto` is found by Ray itself
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout_s).close()
        except (OSError, ValueError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(
                f"ray.address={address}: cannot connect ({reason or 'no answer'}); start the "
                "cluster (`ray start --head`) or give its address as host:port"
            ) from None
    if cfg.redis.enabled and cfg.redis.url:
        from agents.memory import connect

        try:
            with connect(cfg.redis.url, outage_timeout=timeout_s) as client:
                client.ping()
        except Exception as e:  # the client's own failure (refused, auth, TLS), as one line
            raise ConfigError(f"redis.url={redact_url(cfg.redis.url)}: {describe(e)}") from None


TENSORBOARD_DIR = "tensorboard"


def _tensorboard(log_dir: Path, purge_step: int | None) -> MetricsSink:
    """The run's TensorBoard sink, or none (with a warning) where tensorboardX is missing."""
    try:
        return TensorBoardSink(log_dir, purge_step)
    except ImportError:
        log.warning(
            "tensorboardX is not installed: no TensorBoard files (pip install tensorboardX)"
        )
        return Metrics([])


def check_group_inits(groups: dict[str, Any]) -> None:
    """Every ``groups.<name>.init`` exists (as a :class:`ConfigError`)."""
    try:
        check_inits(groups)
    except GroupError as e:
        raise ConfigError(str(e)) from None


def check_render(cfg: Config) -> None:
    """``run.render_format=mp4`` with videos on needs imageio-ffmpeg (as a :class:`ConfigError`)."""
    if cfg.run.render_every_s is None or cfg.run.render_format != "mp4":
        return
    try:
        video.require_ffmpeg("run.render_format=mp4", "run.render_format=gif")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def preflight(cfg: Config) -> dict[str, list[str]]:
    """Check, before anything starts, what would otherwise fail inside a process or an actor.

    Checks the topology and that the services to join answer, then builds one sub-env and the
    policy, acts once and steps once, so a misnamed env, a scenario argument the env rejects
    or a policy that does not fit the env is one line here instead of a library's traceback
    from a Ray actor.

    Returns:
        The agents by group, by name (one group ``team`` without ``groups``).

    Raises:
        ConfigError: an impossible combination, naming the keys.
        EnvError: the env cannot be built or stepped with this config.
    """
    check_topology(cfg)
    cfg.train.torch_device()
    check_trackers(cfg.run.loggers)
    check_group_inits(cfg.groups)
    check_services(cfg)
    check_render(cfg)
    if cfg.run.storage is not None:
        try:
            storage.check_storage(cfg.run.storage)
        except storage.StorageError as e:
            raise ConfigError(str(e)) from None
    env = cfg.env.make(1, cfg.train.seed, torch.device("cpu"))
    try:
        if cfg.run.render_every_s is not None:
            try:
                video.check_drawable(env, cfg.env.name)
            except video.CannotDraw as e:
                raise ConfigError(f"run.render_every_s: {e}") from None
        if cfg.world_model.enabled:
            world.check_env(cfg, env)
        try:
            algorithm_spec(cfg.train.algorithm).check(
                env.action_kind, cfg.uses_memory(), bool(cfg.groups), cfg.world_model.enabled
            )
        except ValueError as e:
            raise ConfigError(str(e)) from None
        policy = cfg.build_policy(env)
        inits = {name: g.init for name, g in cfg.groups.items() if g.init is not None}
        try:
            init_groups(policy, inits, "cpu")
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None
        obs = env.reset(seed=cfg.train.seed)
        with torch.no_grad():
            action = policy.act(obs.as_dict())[0]
        env.step(action)
        names = [a.name for a in env.agent_info()]
        slots = getattr(policy, "group_agents", lambda: {"team": range(len(names))})()
        return {group: [names[i] for i in agents] for group, agents in slots.items()}
    except (EnvError, ConfigError):
        raise
    except Exception as e:  # the env's or the policy's own failure, as one line
        log.debug("preflight of env %r failed", cfg.env.name, exc_info=True)
        raise EnvError(
            f"env '{cfg.env.name}' with model.kind={cfg.model.kind}: {describe(e)}"
        ) from e
    finally:
        env.close()


def _without_missing_redis(cfg: Config, on_ray: bool) -> Config:
    """A local run on a machine without ``redis-server`` trains without Redis, and says so."""
    if not cfg.redis.enabled or on_ray or cfg.redis.url is not None:
        return cfg
    try:
        from orchestrator.runtime.services import redis_server_installed
    except ImportError:  # no redis client package either (a bare GPU box)
        missing = "the redis Python package is not installed"
    else:
        if redis_server_installed():
            return cfg
        missing = "redis-server is not installed"
    # Redis serves status/stop and the replay stream here; the training needs none of it.
    log.warning(
        "%s, so this run trains without Redis and `shoal status` / `shoal stop` will not see "
        "it (Ctrl-C still checkpoints). Install it (`apt-get install redis-server`, `brew "
        "install redis`) or set redis.enabled=false to train without it quietly.",
        missing,
    )
    return cfg.model_copy(update={"redis": cfg.redis.model_copy(update={"enabled": False})})


def _shared_memory(cfg: Config, run_dir: Path, stack: ExitStack) -> SharedMemory:
    """Start or join the run's Redis (closed with ``stack``) and record the run there."""
    from orchestrator.runtime.services import SharedMemory

    mem = stack.enter_context(SharedMemory(cfg.redis, run_dir.name, run_dir))
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
    return mem


def _record_failure(mem: SharedMemory, error: BaseException) -> None:
    """Mark the run failed in Redis, without waiting out an outage that may be the failure."""
    import redis

    if mem.client is not None:
        mem.client.outage_timeout = min(mem.client.outage_timeout, 5.0)
    try:
        mem.state.set_status("failed", error=f"{type(error).__name__}: {error}")
    except redis.RedisError:
        log.warning("could not record the failure in Redis at %s", mem.address)


def run_training(
    cfg: Config,
    run_dir: str | Path,
    resume: str | Path | None = None,
    console: Console | None = None,
    extra_sinks: list[MetricsSink] | None = None,
) -> dict[str, Any]:
    """Train with ``cfg`` into ``run_dir`` (which exists); returns the run's summary.

    With Redis enabled (the default) run state, heartbeats and metrics are mirrored into it so
    ``shoal status`` / ``shoal stop`` work while the run is alive.

    Args:
        cfg: the run config.
        run_dir: where config, metrics, checkpoints and the summary go.
        resume: a checkpoint or run directory to continue from.
        console: rich console for the progress bar.
        extra_sinks: more metric destinations.

    Returns:
        ``reason``, ``counters``, ``metrics`` (the last row), ``checkpoint``, ``run_dir``,
        ``train_seconds``, ``steps_this_session`` and ``checkpoints``.

    Raises:
        RuntimeError: when the run cannot continue; the message says why.
    """
    check_topology(cfg)
    on_ray = runs_on_ray(cfg)
    cfg = _without_missing_redis(cfg, on_ray)
    run_dir = Path(run_dir)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    start = checkpoint_counters(resume)
    csv_sink = CSVSink(run_dir / "metrics.csv")
    if resume is not None:
        csv_sink.truncate(start["env_steps"])  # rows past the checkpoint will be redone
    sinks: list[MetricsSink] = [csv_sink, *(extra_sinks or [])]
    if cfg.run.tensorboard:
        # TensorBoard drops an earlier session's steps from ``purge`` on; the checkpoint's own
        # step was logged before the checkpoint was written and stays.
        purge = int(start["env_steps"]) + 1 if resume is not None else None
        sinks.append(_tensorboard(run_dir / TENSORBOARD_DIR, purge))
    if cfg.run.progress:
        sinks.append(ProgressSink(cfg.train.total_env_steps, start["env_steps"], console))
    sinks += tracker_sinks(cfg, run_dir)
    metrics = Metrics(sinks)
    fatal: tuple[type[BaseException], ...] = (FatalRunError, *redis_outage(cfg.redis.enabled))
    # metrics.csv, TensorBoard, videos and the summary; rank 0 sends its checkpoints itself.
    mirror, finished = None, False
    if cfg.run.storage is not None:
        loc = storage.open_location(cfg.run.storage).child(run_dir.name)
        mirror = storage.Mirror(run_dir, loc, checkpoints=False, files=True)
    try:
        with ExitStack() as stack:
            mem = _shared_memory(cfg, run_dir, stack) if cfg.redis.enabled else None
            if mem is not None:
                sinks.insert(1, RunStateSink(mem.state))
            try:
                if on_ray:
                    from orchestrator.runtime.ray_driver import train_on_ray

                    assert mem is not None
                    out = train_on_ray(
                        cfg, run_dir.resolve(), resume, mem, metrics, csv_sink, start
                    )
                else:  # a learner group of one, in this process
                    url = mem.url if mem is not None else None
                    rank = LearnerRank(cfg, 0, 1, run_dir, url, run_dir.name, metrics=metrics)
                    restarts = int(start["learner_restarts"])
                    out = rank.train(resume, cfg.train.time_limit_s, restarts)
            except BaseException as e:
                if mem is not None:
                    _record_failure(mem, e)
                raise
            finally:
                metrics.close()
            if mem is not None:
                mem.state.set_status("finished", reason=out["reason"])
        finished = True
    except fatal as err:
        raise RuntimeError(f"the run cannot continue: {err}") from None
    finally:
        if mirror is not None and not finished:
            mirror.close()  # what a failed run wrote is kept there too
    counters = out["counters"]
    summary = {
        "reason": out["reason"],
        "counters": counters,
        "metrics": metrics.latest,
        "checkpoint": out["checkpoint"],
        "run_dir": str(run_dir),
        "train_seconds": out["seconds"],
        "steps_this_session": int(counters["env_steps"]) - int(start["env_steps"]),
        "checkpoints": [str(p) for p in list_checkpoints(run_dir / "checkpoints")],
    }
    if mirror is not None:
        summary["storage"] = mirror.loc.uri
    write_summary(run_dir, summary)
    if mirror is not None:
        mirror.close()
        if mirror.error:
            log.warning("the run is in %s, but not all of it reached %s (%s)",
                        run_dir, summary["storage"], mirror.error)  # fmt: skip
    return summary
