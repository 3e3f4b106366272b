"""The rollout worker process, and a learner rank's handle on its rollout workers.

:class:`RolloutActor` is what runs in a rollout worker: a plain class around
:class:`agents.rollout.RolloutWorker` that the driver starts with ``ray.remote`` as
``shoal-rollout-<i>`` (``orchestrator.runtime.placement``). It pulls weights from Redis,
returns batches through the object store and appends a chunk of each to the Redis replay
stream. Ray restarts it when its process dies; the restarted actor starts a fresh episode
stream and pulls the current weights before its first batch.

:class:`ActorRollouts` runs in the learner rank: it requests batches from the rank's share of
the actors, re-collects the batch a dead worker lost, and counts restarts. It has the
interface of :class:`~orchestrator.runtime.learner.LocalRollouts`, the envs a rank steps
itself.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ray
import torch
from ray.exceptions import ActorDiedError, RayActorError, RayTaskError
from torch import Tensor

from agents.memory import RedisUnavailable, ReplayStream, RunState, WeightStore, connect
from agents.memory.replay import Chunk
from agents.replay import Replay
from agents.rollout import RolloutBatch, RolloutWorker
from orchestrator.config import Config
from orchestrator.runtime.loop import FatalRunError
from orchestrator.runtime.ray_metrics import RayMetricsSink
from orchestrator.runtime.world import world_keys

log = logging.getLogger(__name__)

# What a replay chunk keeps of the observations: a trained world model learns from the entity
# graph alone, so its chunks carry that instead (a third of the bytes).
REPLAY_FIELDS = ("obs", "state", "alive")
# What a replay chunk holds besides observation fields.
BATCH_FIELDS = ("actions", "rewards", "terminated", "truncated")
# A worker that dies this many times while one batch is owed is given up on.
MAX_DEATHS_PER_BATCH = 3


def rollout_name(index: int) -> str:
    """The Ray actor name of rollout worker ``index``."""
    return f"shoal-rollout-{index}"


def replay_chunk(
    batch: RolloutBatch, num_envs: int, fields: tuple[str, ...] = REPLAY_FIELDS
) -> dict[str, Tensor]:
    """The first ``num_envs`` sub-envs of a batch, time-major, as a replay-stream chunk.

    Shapes:
        - every entry: ``[T, num_envs, ...]`` (``obs``, ``state``, ``alive``, ``actions``,
          ``rewards``, ``terminated``, ``truncated``).
    """
    envs = slice(0, num_envs)
    chunk = {k: batch.obs[k][:, envs] for k in fields if k in batch.obs}
    chunk.update(
        actions=batch.actions[:, envs],
        rewards=batch.rewards[:, envs],
        terminated=batch.terminated[:, envs],
        truncated=batch.truncated[:, envs],
    )
    return chunk


def chunk_observations(chunk: dict[str, Tensor]) -> dict[str, Tensor]:
    """The observation fields of a replay chunk (everything but :data:`BATCH_FIELDS`)."""
    return {k: v for k, v in chunk.items() if k not in BATCH_FIELDS}


def refill_replay(
    stream: ReplayStream, names: list[str], replay: Replay, device: torch.device | None = None
) -> int:
    """Fill ``replay`` with the batches of rollout workers ``names`` the stream holds.

    The batches go to ``device`` (default the CPU), where the rank's replay lives. A batch is a
    round every one of those workers wrote an entry for, joined along the env axis in
    ``names``' order as the rank joins them; rounds go in oldest first. A round one of them
    never finished is skipped; a re-collected batch's entry replaces the lost one's.

    Returns:
        The transitions ``replay`` then holds.
    """
    index = {int(n.rsplit("-", 1)[1]): n for n in names}
    open_rounds: dict[int, dict[str, Chunk]] = {}
    last = "0-0"
    while entries := stream.tail(last, count=64):
        last = entries[-1][0]
        for _, chunk, meta in entries:
            name = index.get(int(meta.get("worker", -1)))
            if name is None or "alive" not in chunk or "actions" not in chunk:
                continue  # another rank's worker, or a chunk that is no batch
            round_ = int(meta.get("round", -1))
            parts = open_rounds.setdefault(round_, {})
            parts[name] = chunk
            if len(parts) < len(names):
                continue
            del open_rounds[round_]
            whole = [parts[n] for n in names]
            joined = {k: torch.cat([c[k] for c in whole], dim=1).to(device) for k in whole[0]}
            replay.add_steps(
                chunk_observations(joined),
                joined["actions"],
                joined["rewards"],
                joined["terminated"],
                joined["truncated"],
            )
    return replay.transitions


class RolloutActor:
    """One ``VecMultiAgentEnv`` and a policy copy, fed with weights from Redis.

    Calls to :meth:`collect` run one at a time even though the actor answers :meth:`info`
    concurrently; a collect left over from a learner that died finishes before the next.

    Args:
        cfg_data: the run config as a JSON-able dict.
        index: worker index (its name is ``shoal-rollout-<index>``).
        redis_url: the run's Redis.
        run_id: namespaces the Redis keys.
        seed: seeds the env and action sampling; a restarted actor derives a new one.
    """

    def __init__(
        self, cfg_data: dict[str, Any], index: int, redis_url: str, run_id: str, seed: int
    ) -> None:
        self.cfg = cfg = Config.model_validate(cfg_data)
        torch.set_num_threads(cfg.train.threads or 1)
        self.index, self.name = index, rollout_name(index)
        with warnings.catch_warnings():  # the property reads a deprecated attribute inside
            warnings.simplefilter("ignore")
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        if self.restarted:
            # Replaying the episodes the dead process already returned would bias the data.
            seed = seed + 7919 * (1 + os.getpid() % 10007)
            memory = cfg.uses_memory()
            fresh = ": its envs start new episodes, their memory from zeros" if memory else ""
            log.warning("%s restarted (pid %d)%s", self.name, os.getpid(), fresh)
        env = cfg.env.make(cfg.env.num_envs, seed, torch.device("cpu"))
        wm = cfg.world_model.enabled
        policy = cfg.build_policy(env)
        # What the world model is made of: batches carry it and the stream passes it on.
        keys = world_keys(cfg, env, policy) if wm else ()
        self.worker = RolloutWorker(
            env, policy, cfg.train.rollout_len, seed, extra_keys=frozenset(keys)
        )
        # A world model learns from the stream: it gets more of each batch than a sample.
        self.replay_envs = max(cfg.redis.replay_envs, cfg.world_model.stream_envs if wm else 0)
        self.replay_fields = ("alive", *keys) if wm else REPLAY_FIELDS
        # A replay learner's batches travel through the stream, whole.
        self.streams = cfg.streams_batches()
        self.version: int | None = None
        client = connect(redis_url, outage_timeout=cfg.redis.outage_timeout_s)
        self.client = client
        self.weights = WeightStore(client, run_id)
        self.state = RunState(client, run_id)
        self.replay = (
            ReplayStream(client, run_id, maxlen=cfg.replay_stream_entries())
            if cfg.redis.replay
            else None
        )
        self._lock = threading.Lock()
        self.metrics = RayMetricsSink(run_id, "rollout")
        # A restarted actor counts itself once, so the cluster-wide counter adds up restarts.
        self._metric_row: dict[str, float] = {"rollout_restarts": float(self.restarted)}

    def info(self) -> dict[str, Any]:
        """Where the actor runs: ``name``, ``pid``, ``node_id``, ``restarted``."""
        return {
            "name": self.name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "restarted": self.restarted,
        }

    def pid(self) -> int:
        """The actor's process id (tests kill it)."""
        return os.getpid()

    def _sync_weights(self, min_version: int) -> None:
        """Follow the latest published weights; wait until they are at least ``min_version``.

        The latest version is taken even when lower than ours: a restarted learner group
        publishes from its checkpoint and weights from the lost timeline must not linger.
        """
        deadline = time.monotonic() + self.cfg.rollout.collect_timeout_s
        while True:
            latest = self.weights.latest_version()
            if latest is not None and latest != self.version:
                # The fetched tensors live in a reused buffer: load_state_dict copies them.
                try:
                    version, state = self.weights.fetch(latest, reuse_buffer=True)
                except LookupError:
                    version, state = self.weights.fetch(reuse_buffer=True)
                self.worker.set_weights(state, version)
                self.version = version
            if self.version is not None and self.version >= min_version:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: weights version >= {min_version} did not appear in Redis "
                    f"within rollout.collect_timeout_s={self.cfg.rollout.collect_timeout_s:g} s "
                    f"(holding {self.version}, latest {latest})"
                )
            time.sleep(0.01)

    def collect(self, min_version: int, round_: int = -1) -> tuple[RolloutBatch, dict[str, Any]]:
        """One batch acted with weights of version ``min_version`` or newer.

        Args:
            min_version: the oldest weights the batch may be acted with.
            round_: the learner's count of the batch it asks for (tags the stream entry).

        Returns:
            ``(batch, stats)``; ``batch.weights_version`` is the version it acted with and
            ``stats`` holds ``worker``, ``weights_version``, ``fetch_s``, ``collect_s``,
            ``restarted`` (1.0 on a restarted actor) and ``pid``, for metrics. For a replay
            learner the observations and actions are in the replay stream instead, under the
            entry id ``stats["replay_entry"]``, and the batch holds none.
        """
        with self._lock:
            t0 = time.perf_counter()
            self._sync_weights(min_version)
            t1 = time.perf_counter()
            batch = self.worker.collect()
            t2 = time.perf_counter()
            entry: str | None = None
            if self.replay is not None:
                meta = {
                    "worker": self.index,
                    "weights_version": batch.weights_version,
                    "round": round_,
                    "pid": os.getpid(),
                }
                if self.streams:
                    whole = replay_chunk(batch, batch.rewards.shape[1], tuple(batch.obs))
                    entry = self.replay.append(whole, meta)
                    batch = replace(batch, obs={}, actions=batch.actions[:0])
                else:
                    envs = min(self.replay_envs, batch.rewards.shape[1])
                    self.replay.append(replay_chunk(batch, envs, self.replay_fields), meta)
            t_rtt = time.perf_counter()
            self.state.heartbeat(self.name)
            rtt_ms = (time.perf_counter() - t_rtt) * 1e3
            row = self._metric_row
            row["env_steps"] = row.get("env_steps", 0.0) + batch.env_steps
            row["weights_version"] = float(batch.weights_version)
            row["redis_rtt_ms"] = rtt_ms
            row["env_steps_per_s"] = batch.env_steps / max(t2 - t1, 1e-9)
            self.metrics.log(row)
            stats: dict[str, Any] = {
                "worker": float(self.index),
                "weights_version": float(batch.weights_version),
                "fetch_s": t1 - t0,
                "collect_s": t2 - t1,
                "restarted": float(self.restarted),
                "pid": float(os.getpid()),
            }
            if entry is not None:
                stats["replay_entry"] = entry
            return batch, stats


class ActorRollouts:
    """A learner rank's rollout actors: request batches, re-collect lost ones, count restarts.

    With ``rollout.max_staleness >= 1`` the next batch is requested as soon as one arrives, so
    workers step envs while the learner updates and act with weights one version old.

    For a replay learner (``Config.streams_batches``) the workers put each batch's observations
    and actions in the Redis replay stream and return the rest; the rank reads its workers'
    entries back (one trip per batch) and, when it starts, refills its replay from the entries
    the stream still holds (:meth:`refill`).

    Args:
        cfg: the run config.
        names: the actors this rank drives.
        namespace: their Ray namespace.
        stream: the run's replay stream, when batches travel through it.
        first_round: the run's iteration counter (tags the batches asked for from here on).
    """

    def __init__(
        self,
        cfg: Config,
        names: list[str],
        namespace: str,
        stream: ReplayStream | None = None,
        first_round: int = 0,
    ) -> None:
        self.cfg = cfg
        self.names = names
        self.handles = {n: ray.get_actor(n, namespace=namespace) for n in names}
        self.stream = stream
        self.round = first_round
        # name -> (ref, min_version, submitted at, round)
        self.pending: dict[str, tuple[Any, int, float, int]] = {}
        self.pids: dict[str, float] = {}
        self._recollected = 0

    def submit(self, name: str, min_version: int, round_: int) -> None:
        """Ask ``name`` for batch ``round_``, acted with weights of at least ``min_version``."""
        ref: Any = self.handles[name].collect.remote(min_version, round_)
        self.pending[name] = (ref, min_version, time.monotonic(), round_)

    def next_batch(
        self, version: int, idle: Callable[[], None]
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """One batch from every worker, joined along the env axis.

        Args:
            version: the learner's current weights version.
            idle: called about every 0.2 s while waiting (rank 0 keeps Redis's weights fresh).

        Returns:
            ``(batch, stats)`` with ``rollout_restarts`` and ``batches_recollected`` of this
            call, and the slowest worker's ``collect_s`` and ``weights_fetch_s``.

        Raises:
            FatalRunError: if Redis stayed unreachable or a worker does not come back.
        """
        if not self.pending:
            for n in self.names:
                self.submit(n, version, self.round)
        results = self._gather(idle)
        self.pending.clear()
        self.round += 1
        if self.cfg.rollout.max_staleness >= 1:
            for n in self.names:
                self.submit(n, version + 1 - self.cfg.rollout.max_staleness, self.round)
        if self.stream is not None:
            results = self._from_stream(results)
        infos = [results[n][1] for n in self.names]
        restarts = 0
        for n, info in zip(self.names, infos, strict=True):
            # A new process behind a name is a restart, whether or not it cost a batch.
            if self.pids.get(n, info["pid"]) != info["pid"]:
                restarts += 1
                log.warning("%s was restarted (pid %d -> %d)", n, self.pids[n], info["pid"])
            self.pids[n] = info["pid"]
        stats = {
            "rollout_restarts": float(restarts),
            "batches_recollected": float(self._recollected),
            "collect_s": max(i["collect_s"] for i in infos),
            "weights_fetch_s": max(i["fetch_s"] for i in infos),
        }
        return RolloutBatch.concat_envs([results[n][0] for n in self.names]), stats

    def _from_stream(
        self, results: dict[str, tuple[RolloutBatch, dict[str, Any]]]
    ) -> dict[str, tuple[RolloutBatch, dict[str, Any]]]:
        """The batches whole again: their observations and actions read from the stream."""
        assert self.stream is not None
        ids = [results[n][1]["replay_entry"] for n in self.names]
        try:
            entries = self.stream.read(ids)
        except LookupError as err:
            raise FatalRunError(
                f"{err}: raise redis.replay_maxlen (now {self.cfg.redis.replay_maxlen}) to at "
                f"least 2 x rollout.num_workers ({2 * self.cfg.rollout.num_workers})"
            ) from None
        except RedisUnavailable as err:
            raise FatalRunError(str(err)) from None
        whole = {}
        for n, (chunk, _) in zip(self.names, entries, strict=True):
            batch, info = results[n]
            obs = chunk_observations(chunk)
            whole[n] = (replace(batch, obs=obs, actions=chunk["actions"]), info)
        return whole

    def refill(self, replay: Replay, device: torch.device | None = None) -> int:
        """Fill ``replay`` with this rank's batches the stream holds (:func:`refill_replay`)."""
        assert self.stream is not None
        try:
            return refill_replay(self.stream, self.names, replay, device)
        except RedisUnavailable as err:
            raise FatalRunError(str(err)) from None

    def _gather(self, idle: Callable[[], None]) -> dict[str, tuple[RolloutBatch, dict[str, Any]]]:
        """Wait for every pending batch, re-requesting those a dead worker lost."""
        results: dict[str, tuple[RolloutBatch, dict[str, Any]]] = {}
        lost_at: dict[str, float] = {}
        retry_at: dict[str, float] = {}
        backoff = dict.fromkeys(self.names, 0.2)
        deaths = dict.fromkeys(self.names, 0)
        timeout = self.cfg.rollout.collect_timeout_s
        while len(results) < len(self.names):
            waiting = {
                ref: n
                for n, (ref, *_) in self.pending.items()
                if n not in results and n not in retry_at
            }
            ready: list[Any] = []
            if waiting:
                ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0.2)
            else:
                time.sleep(0.05)
            idle()
            now = time.monotonic()
            for ref in ready:
                name = waiting[ref]
                try:
                    results[name] = ray.get(ref)
                except RayTaskError as err:
                    if isinstance(err.cause, RedisUnavailable):
                        raise FatalRunError(str(err.cause)) from None
                    raise
                except RayActorError as err:
                    # The batch died with the process. Ray restarts the actor, which refuses
                    # calls ("restarting") until it is back: retry with backoff.
                    if name not in lost_at:
                        lost_at[name] = now
                        log.warning("%s lost a batch (%s); re-collecting", name, type(err).__name__)
                    deaths[name] += isinstance(err, ActorDiedError)
                    if deaths[name] >= MAX_DEATHS_PER_BATCH or now - lost_at[name] > timeout:
                        raise FatalRunError(
                            f"rollout worker {name} did not come back ({deaths[name]} deaths, "
                            f"{now - lost_at[name]:.0f} s without a batch; rollout.max_restarts="
                            f"{self.cfg.rollout.max_restarts}, rollout.collect_timeout_s="
                            f"{timeout:g}): {str(err).splitlines()[0]}"
                        ) from None
                    retry_at[name] = now + backoff[name]
                    backoff[name] = min(2 * backoff[name], 5.0)
            for name, due in list(retry_at.items()):
                if now >= due:
                    del retry_at[name]
                    self.submit(name, self.pending[name][1], self.pending[name][3])
            for name, (ref, min_version, since, round_) in list(self.pending.items()):
                if name not in results and name not in retry_at and now - since > timeout:
                    # A hung worker is treated like a dead one: Ray restarts it.
                    log.warning("%s returned nothing in %g s; restarting it", name, timeout)
                    ray.kill(self.handles[name], no_restart=False)
                    self.pending[name] = (ref, min_version, now, round_)
        self._recollected = len(lost_at)
        return results
