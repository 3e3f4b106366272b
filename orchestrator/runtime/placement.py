"""Placing a run's actors on a Ray cluster (the driver process, when a run goes through Ray).

:func:`start_rollout_actors` starts ``rollout.num_workers`` named rollout actors
(``shoal-rollout-<i>``) spread over the cluster's nodes; :class:`LearnerGroup` reserves a
placement group for the ``learner.num_ranks`` learner actors (``shoal-learner-<r>``), starts
them and, for K > 1, forms their ``torch.distributed`` process group.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import GetTimeoutError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.config import Config
from orchestrator.runtime.learner import LearnerRank, learner_name
from orchestrator.runtime.rollout import RolloutActor, rollout_name
from orchestrator.runtime.world import WORLD_MODEL_ACTOR

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 180.0


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
        """Reserve a placement group, start the ranks and, for K > 1, form the process group.

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
        if k == 1:
            return self  # one rank learns alone: no process group to form
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


def start_world_model(
    cfg: Config, run_dir: Path, redis_url: str, run_id: str, namespace: str
) -> tuple[Any, Any]:
    """Start ``shoal-world-model`` and its training loop; Ray restarts it if it dies.

    Returns:
        ``(handle, ref)``: the actor and its running ``run`` call, retried on a restarted
        actor.

    Raises:
        RuntimeError: if the actor cannot be placed within the start-up timeout.
    """
    from orchestrator.runtime.world_actor import WorldModelActor

    wait_name_free(WORLD_MODEL_ACTOR, namespace)
    cls: Any = ray.remote(WorldModelActor)
    handle = cls.options(
        name=WORLD_MODEL_ACTOR,
        namespace=namespace,
        num_cpus=cfg.world_model.actor_cpus,
        max_restarts=cfg.rollout.max_restarts,
        max_task_retries=-1,  # the run() loop continues on the restarted process
        max_concurrency=2,  # info() and stop() are answered while run() loops
    ).remote(cfg.model_dump(mode="json"), str(run_dir), redis_url, run_id)
    try:
        ray.get(handle.info.remote(), timeout=STARTUP_TIMEOUT_S)
    except GetTimeoutError:
        ray.kill(handle, no_restart=True)
        raise RuntimeError(
            f"{WORLD_MODEL_ACTOR} ({cfg.world_model.actor_cpus:g} CPU) did not start within "
            f"{STARTUP_TIMEOUT_S:g} s (available: {ray.available_resources()}); lower "
            "world_model.actor_cpus or add nodes"
        ) from None
    return handle, handle.run.remote()
