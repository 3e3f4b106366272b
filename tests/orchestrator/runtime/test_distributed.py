"""The Ray topology against a real Ray instance and real redis-servers.

One Ray instance serves the whole module (4 logical CPUs on whatever cores the machine has);
every run uses tiny envs and models, every wait has a timeout, and only processes these
tests started are ever killed, by PID.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import ray
import torch

from agents.algorithm import algorithm_spec
from agents.imagination import EntityWorld, LearnedDynamics, imagine
from agents.memory import ReplayStream, RunState, WeightStore, connect
from agents.rollout import RolloutBatch, RolloutWorker
from agents.world_model import TransitionBuffer
from orchestrator.cli.evaluate import evaluate
from orchestrator.cli.status import connect_for
from orchestrator.config import Config, load_config
from orchestrator.runtime.checkpoint import list_checkpoints, load_checkpoint
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.placement import LearnerGroup
from orchestrator.runtime.services import RedisServer
from policies.groups import policy_from_meta, policy_meta
from policies.world_model import EntityWorldModel

# Every run starts or uses a redis-server (the learner-group equality test alone does not).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.distributed, pytest.mark.redis]

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "model.hidden=16",
    "run.progress=false",
    "run.log_every_s=0.001",
    "ray.log_to_driver=false",
    "ray.include_dashboard=false",
    "rollout.cpus_per_worker=0.5",
    "learner.cpus_per_rank=0.5",
]
RUN_TIMEOUT = 240.0
ENTITIES = frozenset({"nodes", "node_mask"})  # what the world model's replay keeps


@pytest.fixture(scope="module")
def ray_instance() -> Iterator[str]:
    """A Ray instance shared by the module; yields its GCS address."""
    assert not ray.is_initialized()
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=200 * 2**20,
        namespace="shoal-tests",
    )
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def tiny(*overrides: str) -> Config:
    return load_config("spread-gnn", [*TINY, *overrides])


def new_run_dir(tmp_path: Path, stem: str) -> Path:
    run_dir = tmp_path / f"{stem}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir()
    return run_dir


def rows(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        # A cell is empty where a row did not measure its column (eval_return between evals).
        return [{k: float(v or "nan") for k, v in r.items()} for r in csv.DictReader(fh)]


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


class Background:
    """``run_training`` in a thread; ``result()`` re-raises what it raised."""

    #: Runs not yet stopped; ``stop_background_runs`` ends them after each test.
    live: ClassVar[list[Background]] = []

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.out: dict[str, Any] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, run_dir), daemon=True)
        self.thread.start()
        Background.live.append(self)

    def _run(self, cfg: Config, run_dir: Path) -> None:
        try:
            self.out = run_training(cfg, run_dir)
        except BaseException as e:  # noqa: BLE001 - surfaced by result()
            self.error = e

    def result(self, timeout: float = RUN_TIMEOUT) -> dict[str, Any]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"run did not finish within {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.out

    def stop(self, timeout: float = RUN_TIMEOUT) -> None:
        """Ask the run to checkpoint and exit, as ``shoal stop`` does, and wait for it."""
        if self.thread.is_alive():
            with contextlib.suppress(Exception):  # its Redis may be what the test stopped
                client, run_id = connect_for(str(self.run_dir), self.cfg.redis.url)
                if client is not None:
                    try:
                        RunState(client, run_id).request_stop()
                    finally:
                        client.close()
        self.thread.join(timeout)


@pytest.fixture(autouse=True)
def stop_background_runs() -> Iterator[None]:
    """End the runs a test started, passed or failed.

    A test that fails mid-run would otherwise leave its run training through the next tests
    and, once the module's Ray instance shuts down under it, abort the whole session.
    """
    yield
    while Background.live:
        Background.live.pop().stop()


def assert_monotonic_progress(table: list[dict[str, float]], max_staleness: int) -> None:
    steps = [r["env_steps"] for r in table]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert all(0 <= r["weights_staleness"] <= max_staleness for r in table)
    assert all(r["collect_s"] >= 0 and r["update_s"] > 0 for r in table)


# -- the learner group: DDP over real processes -------------------------------------------


# Agent groups: GNN predators at their own rate, MLP prey at their own widths.
GROUPED = ["env.name=tag", "groups.adversary.lr=0.001", "groups.agent.model.kind=mlp"]
QMIX = ["train.algorithm=qmix", "train.learning_starts=0", "train.replay_batch=64",
        "train.updates_per_batch=2"]  # fmt: skip
QMIX_MEMORY = [*QMIX, "model.memory=gru", "train.chunk_len=4"]
MASAC = ["train.algorithm=masac", "env.continuous_actions=true", "train.learning_starts=0",
         "train.replay_batch=64", "train.updates_per_batch=2"]  # fmt: skip
# Replay learners over the same groups: a utility network, or an actor and critics, per group.
QMIX_GROUPS = [*QMIX, *GROUPED]
MASAC_GROUPS = [*MASAC[:1], *MASAC[2:], *GROUPED]


def _imagined(env: Any, source: Any, worker: RolloutWorker) -> list[RolloutBatch]:
    """Batches a world model dreamed: 16 branches of 10 steps from real start states."""
    buffer = TransitionBuffer(capacity=1000)
    buffer.add(worker.collect())
    torch.manual_seed(6)
    model = EntityWorldModel(env.node_dim, "discrete", env.action_dim, hidden=16)
    dream = EntityWorld(LearnedDynamics(model), env.observe_entities)
    gen = torch.Generator().manual_seed(0)
    return [imagine(source, dream, buffer.sample(16, gen), 10) for _ in range(3)]


@pytest.mark.parametrize(
    "grouping",
    [
        [],
        GROUPED,
        ["imagined"],
        ["model.memory=gru", "model.critic_memory=gru"],
        QMIX,
        QMIX_MEMORY,
        MASAC,
        QMIX_GROUPS,
        MASAC_GROUPS,
    ],  # fmt: skip
    ids=[
        "shared",
        "groups",
        "imagined",
        "memory",
        "qmix",
        "qmix-memory",
        "masac",
        "qmix-groups",
        "masac-groups",
    ],  # fmt: skip
)
def test_two_ranks_end_with_the_weights_of_one_rank(ray_instance, tmp_path, grouping) -> None:
    # With a world model each rank imagines from its own shard's start states: its imagined
    # updates are all-reduced like real ones, so K=2 learns what K=1 learns from both. With
    # memory (actor and critic), minibatches are chunks cut along time, whole on each rank's
    # envs. QMIX ranks draw the same replayed transitions (with memory: chunks) and each
    # learns from those on its own envs; MASAC's ranks too, averaging each loss's gradients
    # (critics, actor, temperature) themselves.
    dreamed = grouping == ["imagined"]
    cfg = tiny("train.epochs=2", "train.minibatches=2", *([] if dreamed else grouping))
    env = cfg.env.make(8, seed=5, device=torch.device("cpu"))
    torch.manual_seed(5)
    source = cfg.build_policy(env)
    worker = RolloutWorker(
        env, source, rollout_len=10, seed=5, extra_keys=ENTITIES if dreamed else frozenset()
    )
    batches = _imagined(env, source, worker) if dreamed else [worker.collect() for _ in range(3)]
    assert all(b.imagined == dreamed for b in batches)

    groups = {}
    for k in (1, 2):
        kcfg = cfg.model_copy(deep=True)
        kcfg.learner.num_ranks = k
        group = LearnerGroup(kcfg, tmp_path, None, f"eq{k}", f"shoal-eq{k}-{uuid.uuid4().hex[:6]}")
        groups[k] = group.start(timeout_s=120)
    try:
        for group in groups.values():
            ray.get([h.setup_model.remote() for h in group.ranks], timeout=60)
        init = ray.get(groups[1].ranks[0].state_dict.remote(), timeout=60)
        init2 = ray.get(groups[2].ranks[1].state_dict.remote(), timeout=60)
        for name, value in init.items():
            assert torch.equal(value, init2[name]), name
        for batch in batches:
            ray.get(groups[1].ranks[0].update.remote(batch), timeout=60)
            shards = batch.split_envs(2)
            ray.get(
                [h.update.remote(s) for h, s in zip(groups[2].ranks, shards, strict=True)],
                timeout=60,
            )
        one = ray.get(groups[1].ranks[0].state_dict.remote(), timeout=60)
        two = [ray.get(h.state_dict.remote(), timeout=60) for h in groups[2].ranks]
    finally:
        for group in groups.values():
            group.shutdown()

    assert set(one) == set(two[0])
    marker = {id(QMIX): "mixer.v.0.weight", id(QMIX_MEMORY): "core.cell.weight_hh",
              id(MASAC): "critics.1.mlp.0.weight", id(QMIX_GROUPS): "units.1.q_head.weight",
              id(MASAC_GROUPS): "units.1.critics.1.mlp.0.weight"}  # fmt: skip
    assert any(k.endswith(marker.get(id(grouping), "value_norm.debias")) for k in one)
    for name, value in one.items():
        for replica in two:
            torch.testing.assert_close(replica[name], value, atol=1e-6, rtol=0, msg=name)
    moved = max((one[n] - init[n]).abs().max().item() for n in one if one[n].is_floating_point())
    assert moved > 1e-3  # several real updates happened

    # Without the all-reduce a rank would learn from half the data and end elsewhere.
    alone = policy_from_meta(policy_meta(source))
    alone.load_state_dict(init)
    learner = algorithm_spec(cfg.train.algorithm).build(alone, cfg.train, alone, None)
    for batch in batches:
        learner.update(batch.split_envs(2)[0])
    gap = max((alone.state_dict()[n] - one[n]).abs().max().item() for n in one)
    assert gap > 1e-4


# -- whole runs ----------------------------------------------------------------------------


def test_groups_with_self_play_train_on_workers_and_two_ranks(ray_instance, tmp_path) -> None:
    cfg = tiny(
        *GROUPED, "rollout.num_workers=2", "learner.num_ranks=2", "train.total_env_steps=1600",
        "groups.agent.pool.size=2", "groups.agent.pool.every=1",
    )  # fmt: skip
    run_dir = new_run_dir(tmp_path, "groups")
    summary = run_training(cfg, run_dir)
    assert summary["reason"] == "total_env_steps reached"
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert {"return/adversary", "return/agent", "pool_size/agent"} <= set(table[-1])
    assert table[-1]["pool_size/agent"] == 2
    ckpt = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    assert [g["name"] for g in ckpt["meta"]["policy_groups"]] == ["adversary", "agent"]
    assert len(ckpt["extra"]["pool"]["agent"]) == 2
    assert any(k.startswith("past.") for k in ckpt["model"])  # the past version acts on workers


def test_memory_trains_on_workers_and_two_ranks_and_evaluates(ray_instance, tmp_path) -> None:
    # Workers keep their envs' recurrent states (actor's and critic's) across batches and
    # ship every step's state through Redis; each rank trains whole chunks of its own envs.
    cfg = tiny("model.memory=gru", "model.critic_memory=lstm", "rollout.num_workers=2",
               "learner.num_ranks=2", "train.total_env_steps=1600")  # fmt: skip
    run_dir = new_run_dir(tmp_path, "memory")
    summary = run_training(cfg, run_dir)
    assert summary["reason"] == "total_env_steps reached"
    assert_monotonic_progress(rows(run_dir), max_staleness=1)
    ckpt = load_checkpoint(run_dir)
    assert ckpt["meta"]["policy_spec"]["memory"] == "gru"
    assert ckpt["meta"]["policy_spec"]["critic_memory"] == "lstm"
    assert any(k.startswith("actor.core.") for k in ckpt["model"])
    assert any(k.startswith("critic.core.") for k in ckpt["model"])
    assert math.isfinite(evaluate(run_dir, episodes=8)["mean"])


def test_recurrent_qmix_trains_on_workers_and_two_ranks_and_workers_act_with_its_epsilon(
    ray_instance, tmp_path
) -> None:
    # Each rank replays the batches of its own envs, read back from the Redis stream with the
    # recurrent states the workers acted with; ε travels to the workers with the weights.
    # (Feed-forward QMIX on Ray: the worker- and rank-kill tests below.)
    cfg = tiny(*QMIX_MEMORY, "rollout.num_workers=2", "learner.num_ranks=2",
               "train.total_env_steps=1600", "train.epsilon_steps=800")  # fmt: skip
    run_dir = new_run_dir(tmp_path, "qmix")
    summary = run_training(cfg, run_dir)
    assert summary["reason"] == "total_env_steps reached"
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert table[-1]["epsilon"] == pytest.approx(0.05) and table[-1]["gradient_steps"] == 2
    ckpt = load_checkpoint(run_dir)
    assert ckpt["meta"]["q_policy"]["mixer"] == "qmix"
    assert ckpt["meta"]["policy_spec"]["memory"] == "gru"
    assert ckpt["model"]["epsilon"].item() == pytest.approx(0.05)
    assert math.isfinite(evaluate(run_dir, episodes=8)["mean"])


def test_an_algorithm_from_outside_shoal_trains_on_workers_and_two_ranks(
    ray_instance, tmp_path
) -> None:
    # A2C is registered by its import path only: the learner, loop and actors are untouched.
    a2c = ["train.algorithm=tests.agents.a2c:A2C", "rollout.num_workers=2", "learner.num_ranks=2"]
    run_dir = new_run_dir(tmp_path, "a2c")
    summary = run_training(tiny(*a2c, "train.total_env_steps=1600"), run_dir)
    assert summary["reason"] == "total_env_steps reached"
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert {"a2c_policy_loss", "a2c_value_loss"} <= set(table[-1]) and "approx_kl" not in table[-1]
    updates = load_checkpoint(run_dir)["learner"]["updates"]
    assert updates == table[-1]["weights_version"]  # one A2C step per batch
    summary = run_training(tiny(*a2c, "train.total_env_steps=2400"), run_dir, resume=str(run_dir))
    assert summary["counters"]["env_steps"] == 2400
    assert load_checkpoint(run_dir)["learner"]["updates"] > updates  # resumed its own count


def test_killed_rollout_worker_is_restarted_and_training_resumes(ray_instance, tmp_path) -> None:
    # Long enough that the run outlasts the restart on a loaded machine (the other worker keeps
    # the run going meanwhile); the restart is read from the run's counters, not from a new
    # pid, which a run that already finished would never show.
    cfg = tiny("rollout.num_workers=2", "train.total_env_steps=6400")
    run_dir = new_run_dir(tmp_path, "kill-worker")
    run = Background(cfg, run_dir)
    wait_for(lambda: len(rows(run_dir)) >= 2, 120, "the first iterations")
    victim = ray.get_actor("shoal-rollout-1", namespace=f"shoal-{run_dir.name}")
    pid = ray.get(victim.pid.remote(), timeout=30)
    steps_at_kill = rows(run_dir)[-1]["env_steps"]
    os.kill(pid, signal.SIGKILL)
    summary = run.result()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["env_steps"] == 6400
    assert summary["counters"]["rollout_restarts"] >= 1
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert table[-1]["rollout_restarts"] >= 1
    restarted_at = next(r["env_steps"] for r in table if r["rollout_restarts"] >= 1)
    assert restarted_at > steps_at_kill
    assert sum(r["env_steps"] > restarted_at for r in table) >= 2  # progress after the restart


def test_killed_rollout_worker_loses_nothing_qmix_replays(ray_instance, tmp_path) -> None:
    # The replay is the learner's: a worker killed mid-run takes no replayed transition with it.
    cfg = tiny(*QMIX, "rollout.num_workers=2", "train.total_env_steps=6400")
    run_dir = new_run_dir(tmp_path, "kill-worker-qmix")
    run = Background(cfg, run_dir)
    wait_for(lambda: len(rows(run_dir)) >= 2, 120, "the first iterations")
    victim = ray.get_actor("shoal-rollout-1", namespace=f"shoal-{run_dir.name}")
    os.kill(ray.get(victim.pid.remote(), timeout=30), signal.SIGKILL)
    summary = run.result()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["rollout_restarts"] >= 1  # it was killed mid-run and restarted
    table = rows(run_dir)
    held = [r["replay_transitions"] for r in table]
    assert held == sorted(held) and held[-1] > held[0]  # only ever grows (the ring is not full)
    # Every batch the learner was handed is held: each batch's 10 steps but the last, less a
    # step cut by spread's 25-step limit now and then.
    assert held[-1] >= 0.85 * table[-1]["env_steps"]


def test_killed_learner_rank_refills_the_replay_from_the_redis_stream(
    ray_instance, tmp_path
) -> None:
    # The workers put every batch in the Redis replay stream and the ranks read them from
    # there; a K=2 checkpoint holds no replay, so what the restarted ranks replay at once is
    # what they refilled from the stream: every transition the dead group held, and more.
    cfg = tiny(*QMIX, "rollout.num_workers=2", "learner.num_ranks=2",
               "train.total_env_steps=6400", "run.checkpoint_every_s=0.3")  # fmt: skip
    run_dir = new_run_dir(tmp_path, "kill-learner-qmix")
    run = Background(cfg, run_dir)
    wait_for(
        lambda: list_checkpoints(run_dir / "checkpoints") and len(rows(run_dir)) >= 4,
        120,
        "a checkpoint and four iterations",
    )
    held_at_kill = rows(run_dir)[-1]["replay_transitions"]
    rank1 = ray.get_actor("shoal-learner-1", namespace=f"shoal-{run_dir.name}")
    os.kill(ray.get(rank1.info.remote(), timeout=30)["pid"], signal.SIGKILL)
    summary = run.result()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["learner_restarts"] == 1
    table = rows(run_dir)
    after = [r for r in table if r["learner_restarts"] == 1]
    # The first batch after the restart joins a replay already holding the lost group's.
    assert after and after[0]["replay_transitions"] > held_at_kill


def test_killed_learner_rank_restarts_the_group_from_the_checkpoint(ray_instance, tmp_path) -> None:
    # No rollout actors: each of the two ranks steps its half of the envs itself.
    cfg = tiny("learner.num_ranks=2", "train.total_env_steps=2400", "run.checkpoint_every_s=0.3")
    run_dir = new_run_dir(tmp_path, "kill-learner")
    run = Background(cfg, run_dir)
    wait_for(lambda: list_checkpoints(run_dir / "checkpoints"), 120, "a checkpoint")
    rank1 = ray.get_actor("shoal-learner-1", namespace=f"shoal-{run_dir.name}")
    os.kill(ray.get(rank1.info.remote(), timeout=30)["pid"], signal.SIGKILL)
    summary = run.result()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["env_steps"] == 2400
    assert summary["counters"]["learner_restarts"] == 1
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=0)  # in-rank envs act with current weights
    assert table[-1]["learner_restarts"] == 1
    assert load_checkpoint(run_dir)["meta"]["counters"]["learner_restarts"] == 1


def test_redis_restart_mid_run_reconnects_and_completes(
    ray_instance, tmp_path, private_redis: RedisServer
) -> None:
    cfg = tiny(
        "rollout.num_workers=1",
        "train.total_env_steps=2400",
        f"redis.url={private_redis.url}",
        "redis.outage_timeout_s=60",
    )
    run_dir = new_run_dir(tmp_path, "redis-restart")
    run = Background(cfg, run_dir)
    wait_for(lambda: len(rows(run_dir)) >= 2, 120, "the first iterations")
    steps_at_restart = rows(run_dir)[-1]["env_steps"]
    private_redis.restart()
    summary = run.result()

    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["env_steps"] == 2400
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert table[-1]["env_steps"] > steps_at_restart
    client = connect(private_redis.url)
    try:
        # Everything below was written after the restart wiped the server.
        store = WeightStore(client, run_dir.name)
        assert store.latest_version() == int(table[-1]["weights_version"])
        assert ReplayStream(client, run_dir.name).length() >= 1
        state = RunState(client, run_dir.name).get()
        assert state["status"] == "finished"
        assert "shoal-rollout-0" in state["heartbeats"]
    finally:
        client.close()


def test_lasting_redis_outage_stops_the_run_naming_redis(
    ray_instance, tmp_path, private_redis: RedisServer
) -> None:
    cfg = tiny(
        "rollout.num_workers=1",
        "train.total_env_steps=1000000",
        f"redis.url={private_redis.url}",
        "redis.outage_timeout_s=2",
    )
    run_dir = new_run_dir(tmp_path, "redis-gone")
    run = Background(cfg, run_dir)
    wait_for(lambda: len(rows(run_dir)) >= 2, 120, "the first iterations")
    private_redis.stop()
    with pytest.raises(RuntimeError, match=private_redis.address.replace(".", r"\.")):
        run.result(timeout=120)


def test_killed_driver_resumes_from_its_last_checkpoint(
    ray_instance, tmp_path, redis_server: RedisServer
) -> None:
    run_dir = new_run_dir(tmp_path, "kill-driver")
    common = [
        *TINY,
        "rollout.num_workers=1",
        f"redis.url={redis_server.url}",
        f"run.dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "run.checkpoint_every_s=0.5",
    ]
    cmd = [sys.executable, "-m", "orchestrator.cli", "run", "--address", ray_instance]
    log = open(tmp_path / "first-driver.log", "wb")  # noqa: SIM115 - closed below
    first = subprocess.Popen(
        [*cmd, "spread-gnn", *common, "train.total_env_steps=10000000"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: killpg reaches only what it started
    )
    try:
        wait_for(
            lambda: list_checkpoints(run_dir / "checkpoints") or first.poll() is not None,
            180,
            "a checkpoint of the first driver",
        )
        assert first.poll() is None, (tmp_path / "first-driver.log").read_text()[-3000:]
        children = descendants(first.pid)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            children = descendants(first.pid)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        log.close()
    # The driver joined a running Ray and Redis, so it should have started nothing of its own;
    # whatever it did start (and a new session would hide from killpg) goes too.
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    ckpt = load_checkpoint(run_dir)  # the newest complete checkpoint loads
    before = ckpt["meta"]["counters"]
    assert before["env_steps"] > 0 and ckpt["learner"]["updates"] == before["iteration"]
    target = int(before["env_steps"]) + 800
    # config.yaml keeps no secrets: like a user, hand the password over in the environment.
    resumed = subprocess.run(
        [*cmd, "--resume", str(run_dir), f"train.total_env_steps={target}", "--json"],
        env={**os.environ, "SHOAL_REDIS_PASSWORD": redis_server.password},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        start_new_session=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    after = summary["counters"]
    assert after["env_steps"] == target and summary["steps_this_session"] == 800
    assert after["iteration"] == before["iteration"] + 10  # 80 env steps per iteration
    table = rows(run_dir)
    assert_monotonic_progress(table, max_staleness=1)
    assert table[-1]["env_steps"] == target
    newest = load_checkpoint(run_dir)
    assert newest["meta"]["counters"]["env_steps"] == target
    assert newest["learner"]["updates"] == after["iteration"]
