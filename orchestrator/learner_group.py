"""The learner group: K named Ray actors (``shoal-learner-<rank>``) training one DDP model.

Each rank owns ``M/K`` rollout workers (or, with ``rollout.num_workers=0``, steps its share of
the envs itself), learns on its shard with gradients all-reduced by DDP (gloo on CPU, NCCL on
CUDA), and runs :func:`orchestrator.trainer.run_loop` like an in-process run. Rank 0 alone
publishes weights to Redis, writes checkpoints and hands metric rows to the driver.

Why not Ray Train's ``TorchTrainer``: see ``docs/DESIGN.md`` (start-up cost, actor names).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from agents.memory import RedisUnavailable, RunState, WeightStore, connect
from agents.ppo import Learner
from agents.rollout import RolloutBatch, RolloutWorker
from orchestrator.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.config import Config, config_to_yaml
from orchestrator.metrics import Metrics
from orchestrator.rollout_actor import ActorRollouts, FatalRunError, LocalRollouts, rollout_name
from orchestrator.trainer import build_env, policy_spec, resolve_device, run_loop
from policies.actor_critic import ActorCritic

log = logging.getLogger(__name__)

# Stop reasons travel between ranks as an index into this tuple.
REASONS: tuple[str | None, ...] = (None, "time limit reached", "stop requested", "interrupted")
SESSION_COUNTERS = ("rollout_restarts", "batches_recollected", "learner_restarts")


def learner_name(rank: int) -> str:
    """The Ray actor name of learner ``rank``."""
    return f"shoal-learner-{rank}"


def latest_checkpoint(run_dir: Path, resume: str | Path | None) -> str | None:
    """Where a (re)started group continues from: the run's newest checkpoint, else ``resume``."""
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        return str(found[-1])
    return None if resume is None else str(resume)


class _RowQueue:
    """Metric rows waiting for the driver (a sink on rank 0)."""

    def __init__(self) -> None:
        self.rows: queue.SimpleQueue[dict[str, float]] = queue.SimpleQueue()

    def log(self, row: dict[str, float]) -> None:
        self.rows.put(dict(row))

    def close(self) -> None:
        pass


class LearnerRank:
    """One rank of the learner group; ``ray.remote`` makes it the actor ``shoal-learner-<r>``.

    Lifecycle: :meth:`info` -> (rank 0) :meth:`open_store` -> :meth:`join` on every rank ->
    :meth:`train` (or :meth:`update` from tests). :meth:`drain` and :meth:`request_stop` are
    answered while :meth:`train` runs (the actor has two threads).

    Args:
        cfg_data: the run config as a JSON-able dict.
        rank: this rank.
        world_size: ``K``.
        run_dir: absolute path of the run directory (checkpoints go there).
        redis_url: the run's Redis.
        run_id: namespaces the Redis keys.
        namespace: Ray namespace holding the run's rollout actors.
    """

    def __init__(
        self,
        cfg_data: dict[str, Any],
        rank: int,
        world_size: int,
        run_dir: str,
        redis_url: str | None,
        run_id: str,
        namespace: str,
    ) -> None:
        self.cfg = Config.model_validate(cfg_data)
        torch.set_num_threads(learner_threads(self.cfg))
        self.rank, self.world_size = rank, world_size
        self.run_dir = Path(run_dir)
        self.redis_url, self.run_id, self.namespace = redis_url, run_id, namespace
        self.device = resolve_device(self.cfg.train.device)
        self._rows = _RowQueue()
        self._stop: str | None = None
        self._store: Any = None
        self._republish = threading.Event()
        self._weights: WeightStore | None = None  # rank 0 only
        self._state: RunState | None = None
        self._last_publish_check = self._last_stop_poll = 0.0
        self.version = 0

    # -- setup -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """``rank``, ``pid``, ``node_id`` and ``ip`` of this rank."""
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address(),
        }

    def open_store(self, host: str, loopback: bool) -> int:
        """Rank 0: start the rendezvous store on a free port and return the port."""
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        self._store = dist.TCPStore(
            host, 0, self.world_size, is_master=True, wait_for_workers=False,
            timeout=timedelta(seconds=120),
        )  # fmt: skip
        return int(self._store.port)

    def join(self, host: str, port: int, loopback: bool) -> None:
        """Join the process group (blocks until all ``K`` ranks have joined)."""
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        if self._store is None:
            self._store = dist.TCPStore(
                host, port, self.world_size, is_master=False, timeout=timedelta(seconds=120)
            )
        backend = self.cfg.learner.backend
        if backend == "auto":
            backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=self._store, rank=self.rank, world_size=self.world_size,
            timeout=timedelta(seconds=max(1800.0, 2 * self.cfg.rollout.collect_timeout_s)),
        )  # fmt: skip

    def _all_reduce_mean(self, t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / self.world_size

    def _build(self, resume: str | None) -> dict[str, Any]:
        """Model, DDP wrapper, learner and counters, from ``resume`` when given."""
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        probe = build_env(cfg, 1, cfg.train.seed, torch.device("cpu"))
        self.model = ActorCritic(policy_spec(cfg, probe)).to(self.device)
        counters: dict[str, Any] = {"env_steps": 0, "iteration": 0, "wall_time": 0.0}
        ckpt = load_checkpoint(resume, self.device) if resume else None
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            counters.update(ckpt["meta"]["counters"])
        for key in SESSION_COUNTERS:
            counters.setdefault(key, 0)
        # Buffers (the value normaliser) move identically on every rank from all-reduced
        # statistics, so only the initial sync is needed. A static graph lets DDP learn from
        # the first backward which parameters the loss never reaches (e.g. a skip projection
        # a layer creates but does not use): the policy returns a distribution object DDP
        # cannot search for tensors, so find_unused_parameters would misjudge the actor.
        self.ddp = DistributedDataParallel(
            self.model, forward_sync_buffers=False, static_graph=True
        )
        self.learner = Learner(
            self.model, cfg.train.ppo(), train_model=self.ddp, all_reduce_mean=self._all_reduce_mean
        )
        if ckpt is not None:
            self.learner.load_state_dict(ckpt["learner"])
            set_rng_state(ckpt["rng"])
            log.info("rank %d resumed from %s", self.rank, ckpt["path"])
        return counters

    # -- used by tests and benchmarks ------------------------------------------------------

    def setup_model(self, resume: str | None = None) -> None:
        """Build the model and learner without starting the loop."""
        self.counters = self._build(resume)

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One DDP update on this rank's shard (all ranks must call it together)."""
        return self.learner.update(batch)

    def state_dict(self) -> dict[str, Tensor]:
        """The model's weights, on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def time_updates(self, batch: RolloutBatch, n: int) -> dict[str, float]:
        """Seconds of ``n`` updates and of the gradient all-reduces inside them (benchmarks)."""
        spent = [0.0]

        # No annotations: DDP compares them to its classes, and postponed evaluation turns
        # them into strings.
        def timed_hook(state, bucket):  # type: ignore[no-untyped-def]
            t0 = time.perf_counter()
            tensor = bucket.buffer().div_(self.world_size)
            dist.all_reduce(tensor)
            spent[0] += time.perf_counter() - t0
            fut = torch.futures.Future()  # type: ignore[var-annotated]
            fut.set_result(tensor)
            return fut

        self.ddp.register_comm_hook(None, timed_hook)
        t0 = time.perf_counter()
        for _ in range(n):
            self.learner.update(batch)
        return {"update_s": time.perf_counter() - t0, "allreduce_s": spent[0]}

    # -- the training loop -----------------------------------------------------------------

    def drain(self) -> list[dict[str, float]]:
        """Metric rows logged since the last call (rank 0)."""
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

    def _start_version(self, store: WeightStore | None) -> int:
        """Rank 0 continues after the newest version in Redis; every rank learns it."""
        start = 0
        if store is not None:
            latest = store.latest_version()
            start = 0 if latest is None else latest + 1
        t = torch.tensor([start], dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            dist.broadcast(t, src=0)
        return int(t.item())

    def train(
        self, resume: str | None, time_limit_s: float | None, learner_restarts: int
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
        counters = self._build(resume)
        counters["learner_restarts"] = learner_restarts
        client = None
        if self.rank == 0:
            assert self.redis_url is not None, "rank 0 publishes weights: it needs Redis"
            client = connect(self.redis_url, outage_timeout=self.cfg.redis.outage_timeout_s)
            # A restarted Redis lost the weights; republish from the loop, not from inside
            # the client call that noticed (it may hold the store's lock).
            client.on_reconnect = self._republish.set
            self._weights = WeightStore(client, self.run_id)
            self._state = RunState(client, self.run_id)
        try:
            self.version = self._start_version(self._weights)
            if self._weights is not None:
                self._weights.publish(self.model.state_dict(), self.version)
            rollouts = self._rollouts(counters)
            res = run_loop(
                self.cfg,
                counters,
                lambda lr_frac: self._step(rollouts, counters, lr_frac),
                Metrics([self._rows] if self.rank == 0 else []),
                self._checkpoint_fn(counters) if self.rank == 0 else None,
                should_stop=self._should_stop,
                agree=self._agree,
                time_limit_s=time_limit_s,
            )
        except RedisUnavailable as err:
            raise FatalRunError(str(err)) from None
        finally:
            if client is not None:
                client.close()
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

    def _rollouts(self, counters: dict[str, Any]) -> LocalRollouts | ActorRollouts:
        cfg, k = self.cfg, self.world_size
        m = cfg.rollout.num_workers
        if m == 0:
            b = cfg.env.num_envs // k
            seed = cfg.train.seed + 104729 * self.rank + int(counters["iteration"])
            env = build_env(cfg, b, seed, self.device)
            return LocalRollouts(RolloutWorker(env, self.model, cfg.train.rollout_len, seed))
        per_rank = m // k
        names = [rollout_name(i) for i in range(self.rank * per_rank, (self.rank + 1) * per_rank)]
        return ActorRollouts(cfg, names, self.namespace)

    def _step(
        self, rollouts: LocalRollouts | ActorRollouts, counters: dict[str, Any], lr_frac: float
    ) -> tuple[int, dict[str, float]]:
        """Collect, learn, publish; statistics are summed (or maxed) over all ranks."""
        batch, rstats = rollouts.next_batch(self.version, self._idle)
        staleness = self.version - batch.weights_version
        t0 = time.perf_counter()
        stats = self.learner.update(batch, lr_frac=lr_frac, staleness=staleness)
        update_s = time.perf_counter() - t0
        self.version += 1
        if self._weights is not None:
            self._weights.publish(self.model.state_dict(), self.version)
        ep = batch.episode_returns
        sums = torch.tensor(
            [
                float(batch.env_steps),
                float(ep.sum()) if ep.numel() else 0.0,
                float(batch.episode_lengths.float().sum()) if ep.numel() else 0.0,
                float(ep.numel()),
                rstats["rollout_restarts"],
                rstats["batches_recollected"],
            ],
            dtype=torch.float64,
            device=self.device,
        )
        worst = torch.tensor([float(staleness)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        env_steps, ret_sum, len_sum, episodes, restarts, recollected = sums.tolist()
        counters["rollout_restarts"] += int(restarts)
        counters["batches_recollected"] += int(recollected)
        row = {
            "episode_return": ret_sum / episodes if episodes else math.nan,
            "episode_length": len_sum / episodes if episodes else math.nan,
            "episodes": episodes,
            **stats,
            "weights_version": float(self.version),
            "weights_staleness": float(worst.item()),
            "rollout_restarts": float(counters["rollout_restarts"]),
            "batches_recollected": float(counters["batches_recollected"]),
            "learner_restarts": float(counters["learner_restarts"]),
            "collect_s": rstats.get("collect_s", math.nan),
            "update_s": update_s,
            "weights_fetch_s": rstats.get("weights_fetch_s", math.nan),
        }
        return int(env_steps), row

    def _checkpoint_fn(self, counters: dict[str, Any]) -> Any:
        config_yaml = config_to_yaml(self.cfg)

        def checkpoint() -> Path:
            return save_checkpoint(
                self.run_dir / "checkpoints",
                model=self.model,
                learner_state=self.learner.state_dict(),
                counters=dict(counters),
                config_yaml=config_yaml,
                keep=self.cfg.run.keep_checkpoints,
            )

        return checkpoint


class LearnerGroup:
    """Driver side: place, start, rendezvous and stop the K learner actors.

    Args:
        cfg: the run config.
        run_dir: absolute run directory.
        redis_url: the run's Redis.
        run_id: namespaces Redis keys.
        namespace: Ray namespace of the run's actors.
    """

    def __init__(
        self, cfg: Config, run_dir: Path, redis_url: str | None, run_id: str, namespace: str
    ) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.redis_url, self.run_id, self.namespace = redis_url, run_id, namespace
        self.ranks: list[Any] = []
        self.infos: list[dict[str, Any]] = []
        self.pg: Any = None

    def bundle(self) -> dict[str, float]:
        """Resources of one rank."""
        out = {"CPU": self.cfg.learner.cpus_per_rank}
        if self.cfg.train.device.startswith("cuda") or (
            self.cfg.train.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0
        ):
            out["GPU"] = 1.0
        return out

    def start(self, timeout_s: float = 120.0) -> LearnerGroup:
        """Reserve a placement group, start the ranks and form the process group.

        Raises:
            RuntimeError: if the cluster cannot host the group within ``timeout_s``.
        """
        k, bundle = self.cfg.learner.num_ranks, self.bundle()
        strategy = "SPREAD" if self.cfg.learner.placement == "spread" else "PACK"
        self.pg = placement_group([dict(bundle)] * k, strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise RuntimeError(
                f"the learner group needs {k} x {bundle} but Ray could not reserve it in "
                f"{timeout_s:g} s (available: {ray.available_resources()}); lower "
                "learner.num_ranks or learner.cpus_per_rank, or add nodes"
            ) from None
        cls: Any = ray.remote(LearnerRank)
        data = self.cfg.model_dump(mode="json")
        for r in range(k):
            wait_name_free(learner_name(r), self.namespace)
            self.ranks.append(
                cls.options(
                    name=learner_name(r),
                    namespace=self.namespace,
                    num_cpus=bundle["CPU"],
                    num_gpus=bundle.get("GPU", 0),
                    max_concurrency=2,
                    max_restarts=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=self.pg, placement_group_bundle_index=r
                    ),
                ).remote(data, r, k, str(self.run_dir), self.redis_url, self.run_id, self.namespace)
            )
        self.infos = ray.get([h.info.remote() for h in self.ranks], timeout=timeout_s)
        loopback = len({i["node_id"] for i in self.infos}) == 1
        host = "127.0.0.1" if loopback else self.infos[0]["ip"]
        port = ray.get(self.ranks[0].open_store.remote(host, loopback), timeout=timeout_s)
        ray.get([h.join.remote(host, port, loopback) for h in self.ranks], timeout=timeout_s)
        return self

    def shutdown(self) -> None:
        """Kill the ranks and release their resources."""
        for h in self.ranks:
            try:
                ray.kill(h, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("learner already gone", exc_info=True)
        self.ranks = []
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def learner_threads(cfg: Config) -> int:
    """Torch threads of a learner rank.

    ``train.threads`` if set. Otherwise 1, so that ranks and rollout workers sharing a node do
    not oversubscribe it, except for a lone rank stepping its own envs (the in-process topology
    hosted by Ray, ``shoal run --ray``): it takes every core it may run on, as an in-process
    run does.
    """
    if cfg.train.threads:
        return cfg.train.threads
    if cfg.rollout.num_workers or cfg.learner.num_ranks > 1:
        return 1
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere all cores
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def wait_name_free(name: str, namespace: str, timeout_s: float = 30.0) -> None:
    """Wait until a killed actor's name can be taken again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Ray actor name {name!r} still taken after {timeout_s:g} s")
