"""The learner process: :class:`LearnerRank`, one rank of the learner group, in every topology.

An in-process run (``shoal run`` with ``rollout.num_workers=0`` and one rank) is a learner
group of one, built in the ``shoal run`` process, without Ray or a process group. On Ray each
rank is the named actor ``shoal-learner-<r>``; K > 1 ranks form a ``torch.distributed`` group
(gloo on CPU, NCCL on CUDA) and learn one DDP model. Either way a rank builds the model, takes
batches from its own envs or from its share of the rollout actors (``orchestrator.runtime.
rollout``), runs :func:`~orchestrator.runtime.loop.run_loop`, and, as rank 0, alone writes
checkpoints, publishes weights to Redis and produces metric rows.

Nothing here imports Ray or Redis at module level: the in-process path runs without them.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from agents.algorithm import Algorithm, algorithm_spec
from agents.replay import Replay
from agents.rollout import LocalRollouts, RolloutBatch
from orchestrator.config import Config, config_to_yaml
from orchestrator.runtime import process_group, storage, world
from orchestrator.runtime.best import periodic_evaluation
from orchestrator.runtime.bookkeeping import (
    extra_state,
    iteration_row,
    local_sums,
    restore_extra,
    self_play_for,
    write_trace,
)
from orchestrator.runtime.checkpoint import (
    fresh_counters,
    init_groups,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.runtime.loop import FatalRunError, run_loop
from orchestrator.runtime.metrics import Metrics
from orchestrator.runtime.pool import SelfPlay
from orchestrator.runtime.transport import Transport
from orchestrator.runtime.video import periodic_film

if TYPE_CHECKING:
    from orchestrator.runtime.rollout import ActorRollouts

log = logging.getLogger(__name__)


def learner_name(rank: int) -> str:
    """The Ray actor name of learner ``rank``."""
    return f"shoal-learner-{rank}"


def learner_threads(cfg: Config) -> int:
    """Torch threads of a learner rank.

    ``train.threads`` if set. Otherwise 1, so that ranks and rollout workers sharing a node do
    not oversubscribe it, except for a lone rank stepping its own envs (in-process, or hosted
    by Ray with ``shoal run --ray``): it takes every core it may run on, less the one its
    world model's fit process takes (``world_model.fit_process``). That child fits while the
    rank imagines; a rank whose threads wait on a core the fit holds imagines several times
    slower (measured on 2 cores: 3x).
    """
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.rollout.num_workers or cfg.learner.num_ranks > 1:
        return 1
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    wm = cfg.world_model
    fits_beside = wm.enabled and wm.fit_process and not wm.oracle  # the oracle fits nothing
    return max(cores - 1, 1) if fits_beside else cores


class _RowQueue:
    """Metric rows waiting for the driver to :meth:`LearnerRank.drain` them (rank 0 on Ray)."""

    def __init__(self) -> None:
        self.rows: queue.SimpleQueue[dict[str, float]] = queue.SimpleQueue()

    def log(self, row: dict[str, float]) -> None:
        self.rows.put(dict(row))

    def close(self) -> None:
        pass


class LearnerRank:
    """One rank of the learner group; ``ray.remote`` makes it the actor ``shoal-learner-<r>``.

    Lifecycle on Ray: :meth:`info` -> (rank 0) :meth:`open_store` -> :meth:`join` on every
    rank (K > 1) -> :meth:`train`. :meth:`drain` and :meth:`request_stop` are answered while
    :meth:`train` runs (the actor has two threads). In-process: construct, :meth:`train`.

    Args:
        cfg: the run config (a JSON-able dict when it comes through Ray).
        rank: this rank.
        world_size: ``K``.
        run_dir: absolute path of the run directory (checkpoints go there).
        redis_url: the run's Redis; ``None`` trains without it (in-process only).
        run_id: namespaces the Redis keys.
        namespace: Ray namespace holding the run's rollout actors (``None`` without Ray).
        metrics: where rank 0's metric rows go; by default a queue the driver drains.
    """

    def __init__(
        self,
        cfg: Config | dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        run_dir: str | Path = ".",
        redis_url: str | None = None,
        run_id: str = "run",
        namespace: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
        torch.set_num_threads(learner_threads(self.cfg))
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(run_dir)
        self.redis_url, self.run_id, self.namespace = redis_url, run_id, namespace
        self.device = self.cfg.train.torch_device()
        self._rows = _RowQueue()
        self.metrics = Metrics([self._rows]) if metrics is None else metrics
        self._store: Any = None
        self.transport = Transport(
            self.cfg, rank, world_size, self.device, redis_url, run_id, namespace
        )
        self.self_play: SelfPlay | None = None  # groups with an opponent pool
        self.counters = fresh_counters()
        self.mirror: storage.Mirror | None = None  # rank 0 with run.storage: the uploads

    # -- forming the group (Ray, K > 1) -----------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``rank``, ``pid``, ``node_id`` and ``ip`` of this rank (an actor's)."""
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }

    def open_store(self, host: str, loopback: bool) -> int:
        """Rank 0: start the rendezvous store on a free port and return the port."""
        self._store = process_group.open_store(host, 0, self.world_size, loopback)
        return int(self._store.port)

    def join(self, host: str, port: int, loopback: bool) -> None:
        """Join the process group (blocks until all ``K`` ranks have joined)."""
        if self._store is None:
            self._store = process_group.open_store(host, port, self.world_size, loopback)
        timeout_s = max(1800.0, 2 * self.cfg.rollout.collect_timeout_s)
        process_group.init_group(
            self._store, self.rank, self.world_size, self.cfg.learner.backend, self.device,
            timeout_s,
        )  # fmt: skip

    # -- model, learner, checkpoints --------------------------------------------------------

    def setup_model(self, resume: str | Path | None = None) -> None:
        """Model, (DDP wrapper,) learner and counters, from the checkpoint ``resume`` if given."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        probe = cfg.env.make(1, cfg.train.seed, torch.device("cpu"))
        self.model = cfg.build_policy(probe).to(self.device)
        probe.close()
        self.counters = fresh_counters()
        ckpt = load_checkpoint(resume, self.device) if resume else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.counters.update(ckpt["meta"]["counters"])
        else:
            inits = {name: g.init for name, g in cfg.groups.items() if g.init is not None}
            init_groups(self.model, inits, self.device)
        train_model: torch.nn.Module = self.model
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None
        if self.world_size > 1:
            # Buffers (the value normaliser) move identically on every rank from all-reduced
            # statistics, so only the initial sync is needed. A static graph lets DDP learn
            # from the first backward which parameters the loss never reaches (e.g. a skip
            # projection a layer creates but does not use): the policy returns a distribution
            # object DDP cannot search for tensors, so find_unused_parameters would misjudge
            # the actor.
            train_model = DistributedDataParallel(
                self.model, forward_sync_buffers=False, static_graph=True
            )
            all_reduce_mean = process_group.all_reduce_mean
        self.train_model = train_model
        spec = algorithm_spec(cfg.train.algorithm)
        self.learner: Algorithm = spec.build(self.model, cfg.train, train_model, all_reduce_mean)
        if cfg.run.update_log and self.rank == 0 and hasattr(self.learner, "trace"):
            self.learner.trace = []
        self.practice = None
        if cfg.world_model.enabled:
            real = cfg.train.rollout_len * (cfg.env.num_envs // self.world_size)
            self.practice = world.build_practice(
                cfg, real, self.device, self.model, all_reduce_mean, self.world_size
            )
        self.self_play = self_play_for(self.cfg, self.model)
        if ckpt is not None:
            self.learner.load_state_dict(ckpt["learner"])
            restore_extra(ckpt["extra"], self.practice, self.self_play)
            set_rng_state(ckpt["rng"])
            log.info("rank %d resumed from %s", self.rank, ckpt["path"])

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current model, learner and counters (rank 0).

        With ``run.storage`` it is uploaded in the background; training goes on meanwhile.
        """
        path = save_checkpoint(
            self.run_dir / "checkpoints",
            model=self.model,
            learner_state=self.learner.state_dict(),
            counters=dict(self.counters),
            config_yaml=config_to_yaml(self.cfg),
            keep=self.cfg.run.keep_checkpoints,
            extra=extra_state(self.practice, self.self_play) or None,
        )
        if self.mirror is not None:
            self.mirror.push()
        return path

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One update on this rank's shard (with K > 1 all ranks must call it together)."""
        return self.learner.update(batch)

    def state_dict(self) -> dict[str, Tensor]:
        """The model's weights, on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def time_updates(self, batch: RolloutBatch, n: int) -> dict[str, float]:
        """Seconds of ``n`` updates and of the gradient all-reduces inside them (benchmarks)."""
        spent = [0.0]
        if isinstance(self.train_model, DistributedDataParallel):
            self.train_model.register_comm_hook(None, process_group.timed_all_reduce_hook(spent))
        t0 = time.perf_counter()
        for _ in range(n):
            self.learner.update(batch)
        return {"update_s": time.perf_counter() - t0, "allreduce_s": spent[0]}

    # -- the training loop -----------------------------------------------------------------

    def drain(self) -> list[dict[str, float]]:
        """Metric rows logged since the last call (rank 0 on Ray)."""
        rows = []
        while True:
            try:
                rows.append(self._rows.rows.get_nowait())
            except queue.Empty:
                return rows

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at its next iteration with ``reason`` (a ``transport.REASONS``)."""
        self.transport.stop = reason

    def train(
        self,
        resume: str | Path | None = None,
        time_limit_s: float | None = None,
        learner_restarts: int = 0,
    ) -> dict[str, Any]:
        """Run the training loop on this rank until every rank agrees to stop.

        Args:
            resume: checkpoint to continue from (``None``: fresh).
            time_limit_s: seconds left of ``train.time_limit_s``.
            learner_restarts: group restarts so far, recorded in the counters.

        Returns:
            ``reason``, ``checkpoint``, ``seconds``, ``start_steps``, ``counters``, ``metrics``.

        Raises:
            FatalRunError: if Redis stays unreachable or a rollout worker is lost for good.
        """
        self.setup_model(resume)
        counters, transport = self.counters, self.transport
        counters["learner_restarts"] = learner_restarts
        lead = self.rank == 0
        if lead and self.cfg.run.storage is not None:
            loc = storage.open_location(self.cfg.run.storage).child(self.run_dir.name)
            self.mirror = storage.Mirror(self.run_dir, loc, checkpoints=True, files=False)
        try:
            transport.open(self.model, self.practice, self.self_play)
            kept = self.practice.buffer.kept.keys if self.practice is not None else ()
            rollouts = transport.rollouts(self.model, int(counters["iteration"]), frozenset(kept))
            self._refill_replay(rollouts)
            transport.running()
            res = run_loop(
                self.cfg,
                counters,
                lambda lr_frac: self._step(rollouts, lr_frac),
                self.metrics if lead else Metrics([]),
                self.checkpoint if lead else None,
                should_stop=transport.should_stop,
                agree=transport.agree,
                time_limit_s=time_limit_s,
                evaluate=periodic_evaluation(self) if lead else None,
                film=periodic_film(self) if lead else None,
                fatal=(FatalRunError, *transport.outage),
            )
        except transport.outage as err:
            raise FatalRunError(str(err)) from None
        finally:
            transport.close()
            if self.practice is not None:
                self.practice.close()
            if self.mirror is not None:  # the last checkpoints reach storage before we return
                self.mirror.close()
                self.mirror = None
        return {
            "reason": res.reason,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None,
            "seconds": res.seconds,
            "start_steps": res.start_steps,
            "counters": dict(counters),
            "metrics": res.metrics,
        }

    def _refill_replay(self, rollouts: LocalRollouts | ActorRollouts) -> None:
        """Refill a replay learner's replay from the Redis replay stream, where batches came.

        The stream holds every batch up to the moment a failed group died, the checkpoint's
        replay (one rank only) what it held when written: the fuller one is kept.
        """
        replay = getattr(self.learner, "replay", None)
        if getattr(rollouts, "stream", None) is None or not isinstance(replay, Replay):
            return
        fresh = Replay(replay.capacity_steps, replay.keys)
        held = rollouts.refill(fresh, self.device)  # type: ignore[union-attr]
        if held > replay.transitions:
            log.info(
                "rank %d refilled its replay from the Redis stream: %d transitions (%d before)",
                self.rank, held, replay.transitions,
            )  # fmt: skip
            self.learner.replay = fresh  # type: ignore[attr-defined]

    def _step(
        self, rollouts: LocalRollouts | ActorRollouts, lr_frac: float
    ) -> tuple[int, dict[str, float]]:
        """Collect, learn (and practise), publish; the row's sums are over all ranks."""
        counters, transport = self.counters, self.transport
        batch, rstats = rollouts.next_batch(transport.version, transport.idle)
        staleness = transport.version - batch.weights_version
        t0 = time.perf_counter()
        stats = self.learner.update(batch, lr_frac=lr_frac, staleness=staleness)
        trace = getattr(self.learner, "trace", None)
        if trace:
            write_trace(
                self.run_dir, trace, int(counters["env_steps"]) + batch.env_steps * self.world_size
            )
        if self.practice is not None:
            stats.update(
                world.practise(
                    self.practice, self.model, self.learner, transport.version, batch,
                    int(counters["env_steps"]), lr_frac, transport.all_agree,
                )
            )  # fmt: skip
        update_s = time.perf_counter() - t0
        version = transport.advance()
        if self.self_play is not None:  # before publishing: workers act with the drawn past
            self.self_play.after_update(self.learner.updates, version)
            stats.update(self.self_play.stats(version))
        transport.publish()
        local, groups = local_sums(self.model, batch, rstats)
        sums, worst = transport.reduce(local, staleness)
        timings = {
            "weights_version": float(version),
            "weights_staleness": worst,
            "collect_s": rstats.get("collect_s", math.nan),
            "update_s": update_s,
            "weights_fetch_s": rstats.get("weights_fetch_s", math.nan),
        }
        return iteration_row(sums, groups, stats, counters, timings)
