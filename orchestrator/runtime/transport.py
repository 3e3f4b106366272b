"""What a learner rank exchanges with the rest of the run: batches in, weights out, stop votes.

Runs in the learner process (the ``shoal run`` process in-process, a ``shoal-learner-<r>`` Ray
actor otherwise). :class:`Transport` owns everything that crosses the process boundary, so
the rank's step reads as collect, learn, publish: where batches come from (the rank's own envs
or its share of the rollout actors), the weights published to Redis (and republished after a
Redis restart), the self-play pool's and world model's stores, ``shoal stop`` polled from
Redis, the stop agreement between ranks and the all-reduce of each iteration's sums.

Nothing here imports Ray or Redis at module level: the in-process path runs without them.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from agents.rollout import LocalRollouts, RolloutWorker
from orchestrator.config import Config
from orchestrator.runtime import world
from orchestrator.runtime.loop import redis_outage
from orchestrator.runtime.pool import POOL_PREFIX, SelfPlay
from policies.actor_critic import Policy

if TYPE_CHECKING:
    from agents.memory import RunState, WeightStore
    from agents.world_model import Practice
    from orchestrator.runtime.rollout import ActorRollouts

# Stop reasons travel between ranks as an index into this tuple.
REASONS: tuple[str | None, ...] = (None, "time limit reached", "stop requested", "interrupted")


class Transport:
    """One rank's links to Redis, the rollout source and the other ranks.

    Args:
        cfg: the run config.
        rank, world_size: this rank of ``K``.
        device: where the rank's tensors live (collectives run there).
        redis_url: the run's Redis; ``None`` without it (in-process). Only rank 0 connects.
        run_id: namespaces the Redis keys.
        namespace: Ray namespace of the run's rollout actors (``None`` without Ray).
    """

    def __init__(
        self,
        cfg: Config,
        rank: int,
        world_size: int,
        device: torch.device,
        redis_url: str | None,
        run_id: str,
        namespace: str | None,
    ) -> None:
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.redis_url, self.run_id, self.namespace = redis_url, run_id, namespace
        self.stop: str | None = None  # the driver's request (answered while the loop runs)
        self.version = 0  # of the weights last published
        self._model: nn.Module | None = None
        self._client: Any = None
        self._stream_client: Any = None  # any rank whose batches come through the stream
        self._weights: WeightStore | None = None
        self._state: RunState | None = None
        self._republish = threading.Event()
        self._last_publish_check = self._last_stop_poll = 0.0
        self.outage = redis_outage(self.uses_redis)

    @property
    def uses_redis(self) -> bool:
        """Rank 0 with a Redis URL: the one process of the group that talks to Redis."""
        return self.rank == 0 and self.redis_url is not None

    def open(self, model: nn.Module, practice: Practice | None, self_play: SelfPlay | None) -> None:
        """Connect (rank 0 with Redis), agree on the first version, publish the first weights.

        With Redis the world model's weights come from the ``shoal-world-model`` actor when
        rollout workers feed it, and the self-play pool lives in Redis too.
        """
        self._model = model
        if self.uses_redis:
            from agents.memory import RunState, WeightStore, connect

            assert self.redis_url is not None
            client = connect(self.redis_url, outage_timeout=self.cfg.redis.outage_timeout_s)
            # A restarted Redis lost the weights; republish from the loop, not from inside
            # the client call that noticed (it may hold the store's lock).
            client.on_reconnect = self._republish.set
            self._client = client
            self._weights = WeightStore(client, self.run_id)
            self._state = RunState(client, self.run_id)
        if practice is not None and self.cfg.rollout.num_workers > 0:
            # The shoal-world-model actor fits; rank 0 reads its weights from Redis.
            fit: world.ActorFit | None = None
            if self._client is not None:
                from agents.memory import WeightStore

                store = WeightStore(self._client, self.run_id, name=world.WORLD_MODEL_WEIGHTS)
                fit = world.ActorFit(store, practice.model)
            if self.world_size > 1:
                practice.fit_elsewhere(world.GroupFit(practice.model, fit, self.broadcast))
            elif fit is not None:
                practice.fit_elsewhere(fit)
        self.version = self._start_version()
        if self_play is not None:
            if self._client is not None:
                from agents.memory import WeightStore

                for name, pool in self_play.pools.items():
                    pool.store = WeightStore(
                        self._client, self.run_id, keep=pool.size, name=POOL_PREFIX + name
                    )
                    for v, state in sorted(pool.versions.items()):
                        pool.store.publish(state, v)  # a resumed run's pool, in Redis
            self_play.start(self.version)
        if self._weights is not None:
            self._weights.publish(model.state_dict(), self.version)

    def running(self) -> None:
        """Mark the run running in Redis: from here on a stop request checkpoints."""
        if self._state is not None:
            self._state.set_status("running")

    def close(self) -> None:
        """Close the Redis connections, if any."""
        for name in ("_client", "_stream_client"):
            client = getattr(self, name)
            if client is not None:
                client.close()
                setattr(self, name, None)

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

    # -- batches in, weights out ------------------------------------------------------------

    def rollouts(
        self, model: Policy, iteration: int, extra_keys: frozenset[str] = frozenset()
    ) -> LocalRollouts | ActorRollouts:
        """Where this rank's batches come from: its own envs, or its share of the actors.

        Args:
            model: the policy that acts in the rank's own envs.
            iteration: the run's iteration counter (a resumed run's envs get fresh seeds).
            extra_keys: observation fields batches carry beyond what the policy reads (those
                a world model learns from).
        """
        cfg, k = self.cfg, self.world_size
        m = cfg.rollout.num_workers
        if m == 0:
            b = cfg.env.num_envs // k
            seed = cfg.train.seed + 104729 * self.rank + iteration
            env = cfg.env.make(b, seed, self.device)
            return LocalRollouts(
                RolloutWorker(env, model, cfg.train.rollout_len, seed, extra_keys=extra_keys)
            )
        from orchestrator.runtime.rollout import ActorRollouts, rollout_name

        assert self.namespace is not None, "rollout workers are Ray actors: a namespace is needed"
        per_rank = m // k
        names = [rollout_name(i) for i in range(self.rank * per_rank, (self.rank + 1) * per_rank)]
        stream = None
        if self.redis_url is not None and cfg.streams_batches():
            # Every rank reads its own workers' batches from the stream.
            from agents.memory import ReplayStream, connect

            self._stream_client = connect(self.redis_url, outage_timeout=cfg.redis.outage_timeout_s)
            stream = ReplayStream(self._stream_client, self.run_id, cfg.replay_stream_entries())
        return ActorRollouts(cfg, names, self.namespace, stream, first_round=iteration)

    def advance(self) -> int:
        """The weights changed: their new version."""
        self.version += 1
        return self.version

    def publish(self) -> None:
        """Put the current weights in Redis under the current version (rank 0)."""
        if self._weights is not None:
            assert self._model is not None
            self._weights.publish(self._model.state_dict(), self.version)

    def idle(self) -> None:
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
            assert self._model is not None
            store.publish(self._model.state_dict(), self.version)

    # -- between ranks ----------------------------------------------------------------------

    def should_stop(self) -> str | None:
        """The driver's request, else ``shoal stop`` (Redis, polled twice a second)."""
        if self.stop is not None:
            return self.stop
        now = time.monotonic()
        if self._state is not None and now - self._last_stop_poll >= 0.5:
            self._last_stop_poll = now
            if self._state.stop_requested():
                return "stop requested"
        return None

    def agree(self, local: str | None) -> str | None:
        """Rank 0's stop reason, on every rank."""
        if self.world_size == 1:
            return local
        code = torch.tensor([REASONS.index(local) if self.rank == 0 else 0], device=self.device)
        dist.broadcast(code, src=0)
        return REASONS[int(code.item())]

    def broadcast(self, tensor: Tensor) -> None:
        """Rank 0's ``tensor`` on every rank, in place (through this rank's device)."""
        moved = tensor.to(self.device)
        dist.broadcast(moved, src=0)
        if moved is not tensor:
            tensor.copy_(moved)

    def all_agree(self, local: bool) -> bool:
        """Whether ``local`` is true on every rank."""
        if self.world_size == 1:
            return local
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0.5)

    def reduce(self, sums: list[float], staleness: int) -> tuple[list[float], float]:
        """The row's sums over all ranks, and the largest staleness of any rank's batch."""
        total = torch.tensor(sums, dtype=torch.float64, device=self.device)
        worst = torch.tensor([float(staleness)], dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(total)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return total.tolist(), float(worst.item())
