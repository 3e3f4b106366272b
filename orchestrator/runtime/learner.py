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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from agents.algorithm import Algorithm, algorithm_spec
from agents.rollout import LocalRollouts, RolloutBatch, RolloutWorker
from orchestrator.config import Config, config_to_yaml
from orchestrator.runtime import process_group, world
from orchestrator.runtime.best import periodic_evaluation
from orchestrator.runtime.bookkeeping import iteration_row, local_sums, write_trace
from orchestrator.runtime.checkpoint import (
    fresh_counters,
    init_groups,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.runtime.loop import FatalRunError, redis_outage, run_loop
from orchestrator.runtime.metrics import Metrics
from orchestrator.runtime.pool import POOL_PREFIX, SelfPlay
from orchestrator.runtime.video import periodic_film
from policies.groups import GroupedActorCritic

if TYPE_CHECKING:
    from agents.memory import RunState, WeightStore
    from orchestrator.runtime.rollout import ActorRollouts

log = logging.getLogger(__name__)

# Stop reasons travel between ranks as an index into this tuple.
REASONS: tuple[str | None, ...] = (None, "time limit reached", "stop requested", "interrupted")


def learner_name(rank: int) -> str:
    """The Ray actor name of learner ``rank``."""
    return f"shoal-learner-{rank}"


def learner_threads(cfg: Config) -> int:
    """Torch threads of a learner rank.

    ``train.threads`` if set. Otherwise 1, so that ranks and rollout workers sharing a node do
    not oversubscribe it, except for a lone rank stepping its own envs (in-process, or hosted
    by Ray with ``shoal run --ray``): it takes every core it may run on.
    """
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.rollout.num_workers or cfg.learner.num_ranks > 1:
        return 1
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
    return len(affinity(0)) if affinity else os.cpu_count() or 1


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
        self._stop: str | None = None
        self._store: Any = None
        self._republish = threading.Event()
        self._weights: WeightStore | None = None  # rank 0 with Redis only
        self.self_play: SelfPlay | None = None  # groups with an opponent pool
        self._state: RunState | None = None
        self._last_publish_check = self._last_stop_poll = 0.0
        self.version = 0
        self.counters = fresh_counters()

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
            self.practice = world.build_practice(cfg, real, self.device)
        self.self_play = self._build_self_play()
        if ckpt is not None:
            self.learner.load_state_dict(ckpt["learner"])
            if self.self_play is not None and "pool" in ckpt["extra"]:
                self.self_play.load_state_dict(ckpt["extra"]["pool"])
            if self.practice is not None and "world_model" in ckpt["extra"]:
                world.load_state_dict(self.practice, ckpt["extra"]["world_model"])
            set_rng_state(ckpt["rng"])
            log.info("rank %d resumed from %s", self.rank, ckpt["path"])

    def _build_self_play(self) -> SelfPlay | None:
        pools = {
            name: (g.pool.size, g.pool.every)
            for name, g in self.cfg.groups.items()
            if g.pool.size > 0
        }
        if not pools:
            return None
        assert isinstance(self.model, GroupedActorCritic)
        return SelfPlay(self.model, pools, self.cfg.train.seed)

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current model, learner and counters (rank 0)."""
        extra: dict[str, Any] = {}
        if self.practice is not None:
            extra["world_model"] = world.state_dict(self.practice)
        if self.self_play is not None:
            extra["pool"] = self.self_play.state_dict()
        return save_checkpoint(
            self.run_dir / "checkpoints",
            model=self.model,
            learner_state=self.learner.state_dict(),
            counters=dict(self.counters),
            config_yaml=config_to_yaml(self.cfg),
            keep=self.cfg.run.keep_checkpoints,
            extra=extra or None,
        )

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
        """Ask the loop to stop at its next iteration with ``reason`` (one of ``REASONS``)."""
        self._stop = reason

    def _agree(self, local: str | None) -> str | None:
        if self.world_size == 1:
            return local
        code = torch.tensor([REASONS.index(local) if self.rank == 0 else 0], device=self.device)
        dist.broadcast(code, src=0)
        return REASONS[int(code.item())]

    def _start_version(self) -> int:
        """Rank 0 continues after the newest version in Redis; every rank learns it."""
        start = 0
        if self._weights is not None:
            latest = self._weights.latest_version()
            start = 0 if latest is None else latest + 1
        t = torch.tensor([start], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.broadcast(t, src=0)
        return int(t.item())

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
        counters = self.counters
        counters["learner_restarts"] = learner_restarts
        uses_redis = self.rank == 0 and self.redis_url is not None
        outage = redis_outage(uses_redis)
        client = None
        if uses_redis:
            from agents.memory import RunState, WeightStore, connect

            assert self.redis_url is not None
            client = connect(self.redis_url, outage_timeout=self.cfg.redis.outage_timeout_s)
            # A restarted Redis lost the weights; republish from the loop, not from inside
            # the client call that noticed (it may hold the store's lock).
            client.on_reconnect = self._republish.set
            self._weights = WeightStore(client, self.run_id)
            self._state = RunState(client, self.run_id)
            if self.practice is not None and self.cfg.rollout.num_workers > 0:
                store = WeightStore(client, self.run_id, name=world.WORLD_MODEL_WEIGHTS)
                self.practice.fit_elsewhere(world.ActorFit(store, self.practice.model))
        try:
            self.version = self._start_version()
            if self.self_play is not None:
                if client is not None:
                    for name, pool in self.self_play.pools.items():
                        pool.store = WeightStore(
                            client, self.run_id, keep=pool.size, name=POOL_PREFIX + name
                        )
                        for v, state in sorted(pool.versions.items()):
                            pool.store.publish(state, v)  # a resumed run's pool, in Redis
                self.self_play.start(self.version)
            if self._weights is not None:
                self._weights.publish(self.model.state_dict(), self.version)
            rollouts = self._rollouts()
            if self._state is not None:
                self._state.set_status("running")  # from here on a stop request checkpoints
            res = run_loop(
                self.cfg,
                counters,
                lambda lr_frac: self._step(rollouts, lr_frac),
                self.metrics if self.rank == 0 else Metrics([]),
                self.checkpoint if self.rank == 0 else None,
                should_stop=self._should_stop,
                agree=self._agree,
                time_limit_s=time_limit_s,
                evaluate=periodic_evaluation(self) if self.rank == 0 else None,
                film=periodic_film(self) if self.rank == 0 else None,
                fatal=(FatalRunError, *outage),
            )
        except outage as err:
            raise FatalRunError(str(err)) from None
        finally:
            if client is not None:
                client.close()
            if self.practice is not None:
                self.practice.close()
        return {
            "reason": res.reason,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None,
            "seconds": res.seconds,
            "start_steps": res.start_steps,
            "counters": dict(counters),
            "metrics": res.metrics,
        }

    def _idle(self) -> None:
        """While waiting for batches, make sure Redis holds the current weights (rank 0)."""
        now = time.monotonic()
        store = self._weights
        if store is None:
            return
        if now - self._last_publish_check < 1.0 and not self._republish.is_set():
            return
        self._last_publish_check = now
        latest = store.latest_version()
        if self._republish.is_set() or latest is None or latest < self.version:
            self._republish.clear()
            store.publish(self.model.state_dict(), self.version)

    def _should_stop(self) -> str | None:
        """The driver's request, else ``shoal stop`` (Redis, polled twice a second)."""
        if self._stop is not None:
            return self._stop
        now = time.monotonic()
        if self._state is not None and now - self._last_stop_poll >= 0.5:
            self._last_stop_poll = now
            if self._state.stop_requested():
                return "stop requested"
        return None

    def _rollouts(self) -> LocalRollouts | ActorRollouts:
        """Where this rank's batches come from: its own envs, or its share of the actors."""
        cfg, k = self.cfg, self.world_size
        m = cfg.rollout.num_workers
        if m == 0:
            b = cfg.env.num_envs // k
            seed = cfg.train.seed + 104729 * self.rank + int(self.counters["iteration"])
            env = cfg.env.make(b, seed, self.device)
            keys = world.WORLD_KEYS if self.practice is not None else frozenset()
            return LocalRollouts(
                RolloutWorker(env, self.model, cfg.train.rollout_len, seed, extra_keys=keys)
            )
        from orchestrator.runtime.rollout import ActorRollouts, rollout_name

        assert self.namespace is not None, "rollout workers are Ray actors: a namespace is needed"
        per_rank = m // k
        names = [rollout_name(i) for i in range(self.rank * per_rank, (self.rank + 1) * per_rank)]
        return ActorRollouts(cfg, names, self.namespace)

    def _step(
        self, rollouts: LocalRollouts | ActorRollouts, lr_frac: float
    ) -> tuple[int, dict[str, float]]:
        """Collect, learn, publish; statistics are summed (or maxed) over all ranks."""
        counters = self.counters
        batch, rstats = rollouts.next_batch(self.version, self._idle)
        staleness = self.version - batch.weights_version
        t0 = time.perf_counter()
        stats = self.learner.update(batch, lr_frac=lr_frac, staleness=staleness)
        trace = getattr(self.learner, "trace", None)
        if trace:
            write_trace(
                self.run_dir, trace, int(counters["env_steps"]) + batch.env_steps * self.world_size
            )
        if self.practice is not None:
            steps = int(self.counters["env_steps"])
            stats.update(world.practise(self.practice, self, batch, steps, lr_frac))
        update_s = time.perf_counter() - t0
        self.version += 1
        if self.self_play is not None:  # before publishing: workers act with the drawn past
            self.self_play.after_update(self.learner.updates, self.version)
            stats.update(self.self_play.stats(self.version))
        if self._weights is not None:
            self._weights.publish(self.model.state_dict(), self.version)
        local, groups = local_sums(self.model, batch, rstats)
        sums = torch.tensor(local, dtype=torch.float64, device=self.device)
        worst = torch.tensor([float(staleness)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        timings = {
            "weights_version": float(self.version),
            "weights_staleness": float(worst.item()),
            "collect_s": rstats.get("collect_s", math.nan),
            "update_s": update_s,
            "weights_fetch_s": rstats.get("weights_fetch_s", math.nan),
        }
        return iteration_row(sums.tolist(), groups, stats, counters, timings)
