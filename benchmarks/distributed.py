"""Distributed benchmarks: end-to-end throughput per topology, weight transport, all-reduce.

Run ``python -m benchmarks.distributed`` (all) or ``--only throughput|weights|allreduce``.
Every result is one JSON line: ``name``, ``value``, ``unit`` plus context. References are
measured in the same run: the in-process trainer next to every Ray topology, ``ray.put`` /
``ray.get`` next to the Redis weight store.

* ``throughput``: ``spread-gnn`` trained for ``--seconds`` with (M rollout workers, K learner
  ranks) in (0,1), (1,1), (2,1), (2,2) and in-process. env-steps/s counts the training loop
  only (rank 0's loop time), not starting Ray or the actors, which is reported separately.
  ``env.num_envs`` is per rollout worker, so M workers train on M times the batch.
* ``weights``: publish by the driver + fetch by another process (a Ray actor), median over
  repeats, for 1M and 10M float32 parameters; next to ``ray.put``/``ray.get`` and a raw TCP
  round trip of the same bytes between the same two processes (the floor for two transfers).
  Redis and the TCP floor take turns in blocks of consecutive transfers, each led by one
  unrecorded transfer; ``ray.put``/``ray.get`` runs after them, as the object store frees
  objects in the background.
* ``replay``: MASAC (``spread-mlp-masac``) trained for ``--seconds`` on Ray with 2 rollout
  workers and 1 rank, its batches through the Redis replay stream (``redis.replay=true``, the
  default) and through the object store (``redis.replay=false``), arms alternating, next to
  the in-process run; then the seconds a rank takes to refill a full replay (500k
  transitions: 624 entries of 800 steps) from a stream.
* ``allreduce``: share of a K=2 update spent in the gradient all-reduce. The timing hook runs
  each bucket's all-reduce synchronously, so this is the communication time itself, without
  the overlap with the backward pass DDP normally gets.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import os
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn

from agents.memory import WeightStore, connect
from agents.rollout import RolloutWorker
from benchmarks import spread
from benchmarks.spread import RAY_QUIET
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.placement import LearnerGroup
from orchestrator.runtime.services import RedisServer

TOPOLOGIES = ((0, 1), (1, 1), (2, 1), (2, 2))
BASE = ["run.progress=false", "run.log_every_s=1", "train.total_env_steps=1000000000"]


def emit(name: str, value: float, unit: str, **context: Any) -> None:
    """Print one result line, with Ray's version in its context."""
    spread.emit(name, value, unit, **context, ray=ray.__version__)


# -- throughput ---------------------------------------------------------------------------


def in_process(seconds: float, num_envs: int, threads: int | None = None) -> float:
    """env-steps/s of the in-process run (no Ray, no Redis), as ``shoal run`` trains by default
    (torch's own thread count) or with ``threads``."""
    pinned = ["redis.enabled=false"] + ([] if threads is None else [f"train.threads={threads}"])
    cfg = load_config(
        "spread-gnn",
        [*BASE, f"env.num_envs={num_envs}", f"train.time_limit_s={seconds}", *pinned],
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        summary = run_training(cfg, Path(tmp))
    return summary["steps_this_session"] / summary["train_seconds"]


def on_ray(workers: int, ranks: int, seconds: float, num_envs: int) -> dict[str, float]:
    """env-steps/s of one topology on the already-started Ray instance."""
    total_envs = num_envs if workers else num_envs * ranks  # per-rank share when M=0
    cfg = load_config(
        "spread-gnn",
        [
            *BASE,
            *RAY_QUIET,
            f"env.num_envs={total_envs}",
            f"train.time_limit_s={seconds}",
            f"rollout.num_workers={workers}",
            f"learner.num_ranks={ranks}",
        ],
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        run_dir = Path(tmp) / f"bench-{workers}x{ranks}-{uuid.uuid4().hex[:6]}"
        run_dir.mkdir()
        t0 = time.monotonic()
        summary = run_training(cfg, run_dir)
        wall = time.monotonic() - t0
    rate = summary["steps_this_session"] / summary["train_seconds"]
    return {
        "rate": rate,
        "startup_s": wall - summary["train_seconds"],
        "batch": summary["metrics"].get("env_steps", 0) / max(summary["counters"]["iteration"], 1),
        "staleness": summary["metrics"].get("weights_staleness", 0.0),
    }


def bench_throughput(seconds: float, num_envs: int) -> None:
    reference = in_process(seconds, num_envs)
    emit(
        "throughput_in_process",
        reference,
        "env_steps/s",
        preset="spread-gnn",
        num_envs=num_envs,
        seconds=seconds,
        torch_threads=torch.get_num_threads(),
    )
    # One thread per process, as each Ray actor with one CPU gets: the per-core reference.
    emit(
        "throughput_in_process_1_thread",
        in_process(seconds, num_envs, threads=1),
        "env_steps/s",
        preset="spread-gnn",
        num_envs=num_envs,
        seconds=seconds,
    )
    for workers, ranks in TOPOLOGIES:
        res = on_ray(workers, ranks, seconds, num_envs)
        emit(
            f"throughput_ray_m{workers}_k{ranks}",
            res["rate"],
            "env_steps/s",
            preset="spread-gnn",
            rollout_workers=workers,
            learner_ranks=ranks,
            env_steps_per_iteration=res["batch"],
            weights_staleness=res["staleness"],
            startup_s=round(res["startup_s"], 2),
            vs_in_process=round(res["rate"] / reference, 3),
            in_process=round(reference, 1),
            seconds=seconds,
        )


# -- replay through Redis -----------------------------------------------------------------


def masac_rate(seconds: float, overrides: list[str]) -> float:
    """env-steps/s of ``spread-mlp-masac`` (32 envs per worker), training loop only."""
    cfg = load_config(
        "spread-mlp-masac",
        [*BASE, *RAY_QUIET, "env.num_envs=32", f"train.time_limit_s={seconds}", *overrides],
    )
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        run_dir = Path(tmp) / f"bench-replay-{uuid.uuid4().hex[:6]}"
        run_dir.mkdir()
        summary = run_training(cfg, run_dir)
    return float(summary["steps_this_session"] / summary["train_seconds"])


def refill_seconds(rounds: int = 312, workers: int = 2) -> tuple[float, int]:
    """Seconds to refill a replay from ``rounds`` x ``workers`` spread-mlp-masac entries."""
    from agents.memory import ReplayStream
    from agents.replay import Replay
    from orchestrator.runtime.rollout import refill_replay, replay_chunk

    cfg = load_config("spread-mlp-masac", ["env.num_envs=32"])
    env = cfg.env.make(32, seed=0, device=torch.device("cpu"))
    policy = cfg.build_policy(env)
    batch = RolloutWorker(env, policy, cfg.train.rollout_len, seed=0).collect()
    with RedisServer() as server:
        client = connect(server.url)
        stream = ReplayStream(client, "bench", maxlen=rounds * workers)
        for r in range(rounds):
            for w in range(workers):
                whole = replay_chunk(batch, batch.rewards.shape[1], tuple(batch.obs))
                stream.append(whole, {"worker": w, "round": r})
        replay = Replay(cfg.train.replay_size, policy.input_keys)
        names = [f"shoal-rollout-{w}" for w in range(workers)]
        t0 = time.perf_counter()
        held = refill_replay(stream, names, replay)
        spent = time.perf_counter() - t0
        client.close()
    return spent, held


def bench_replay(seconds: float, repeats: int = 2) -> None:
    reference = masac_rate(seconds, [])
    rates: dict[str, list[float]] = {"stream": [], "object_store": []}
    for _ in range(repeats):
        for arm, flag in (("stream", "true"), ("object_store", "false")):
            rates[arm].append(
                masac_rate(seconds, ["rollout.num_workers=2", f"redis.replay={flag}"])
            )
    for arm, values in rates.items():
        emit(
            f"replay_masac_ray_m2_k1_{arm}",
            statistics.median(values),
            "env_steps/s",
            preset="spread-mlp-masac",
            runs=[round(v, 1) for v in values],
            in_process=round(reference, 1),
            seconds=seconds,
        )
    spent, held = refill_seconds()
    emit("replay_refill_s", spent, "s", transitions=held, entries=624, preset="spread-mlp-masac")


# -- weight transport ---------------------------------------------------------------------


def mlp_state(params: int, width: int = 1000) -> dict[str, torch.Tensor]:
    """A ``width``-wide MLP with about ``params`` float32 parameters."""
    layers = max(1, round(params / (width * width + width)))
    net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    return {k: v.detach() for k, v in net.state_dict().items()}


class Fetcher:
    """Another process reading weights, as a rollout worker does."""

    def __init__(self, url: str, run_id: str) -> None:
        torch.set_num_threads(1)
        self.store = WeightStore(connect(url), run_id)
        self.listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._echo, daemon=True).start()

    def echo_port(self) -> int:
        return int(self.listener.getsockname()[1])

    def _echo(self) -> None:
        """Receive a length-prefixed message into one buffer and send it back."""
        conn, _ = self.listener.accept()
        buf = bytearray()
        while True:
            n = int.from_bytes(_recv_exactly(conn, memoryview(bytearray(8))), "little")
            if len(buf) < n:
                buf = bytearray(n)
            conn.sendall(_recv_exactly(conn, memoryview(buf)[:n]))

    def redis(self, version: int) -> float:
        t0 = time.perf_counter()
        _, state = self.store.fetch(version, reuse_buffer=True)  # as rollout workers do
        assert state
        return time.perf_counter() - t0

    def ray(self, boxed: list[Any]) -> float:
        t0 = time.perf_counter()
        state = ray.get(boxed[0])
        assert state
        return time.perf_counter() - t0


def _recv_exactly(sock: socket.socket, view: memoryview) -> memoryview:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n
    return view


def _echo_time(sock: socket.socket, state: dict[str, torch.Tensor], buf: bytearray) -> float:
    """Raw TCP, no Redis: send the tensors' bytes to the other process and get them back."""
    t0 = time.perf_counter()
    n = sum(t.numel() * t.element_size() for t in state.values())
    sock.sendall(n.to_bytes(8, "little"))
    for t in state.values():
        sock.sendall(t.reshape(-1).view(torch.uint8).numpy().data)
    _recv_exactly(sock, memoryview(buf)[:n])
    return time.perf_counter() - t0


BLOCKS = 6


def _cpu_times() -> tuple[int, int] | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields)  # idle + iowait, all


def _wait_until_quiet(idle: float = 0.85, window: float = 1.0, limit: float = 30.0) -> float:
    """Wait (up to ``limit`` s) until the CPUs are ``idle`` over a ``window``: Ray keeps
    starting processes for several seconds after ``ray.init``. Returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        before = _cpu_times()
        time.sleep(window)
        after = _cpu_times()
        if before is None or after is None:
            break
        if (after[0] - before[0]) >= idle * max(1, after[1] - before[1]):
            break
    return time.monotonic() - started


def _via_redis(
    store: WeightStore, fetcher: Any, state: dict[str, torch.Tensor], versions: Iterator[int]
) -> dict[str, float]:
    version = next(versions)
    t0 = time.perf_counter()
    store.publish(state, version)
    publish = time.perf_counter() - t0
    fetch = float(ray.get(fetcher.redis.remote(version), timeout=120))
    return {"redis": publish + fetch, "publish": publish, "fetch": fetch}


def _via_tcp(
    sock: socket.socket, state: dict[str, torch.Tensor], buf: bytearray
) -> dict[str, float]:
    return {"tcp": _echo_time(sock, state, buf)}


def _via_ray(fetcher: Any, state: dict[str, torch.Tensor]) -> dict[str, float]:
    t0 = time.perf_counter()
    ref = ray.put(state)
    put = time.perf_counter() - t0
    return {"ray": put + float(ray.get(fetcher.ray.remote([ref]), timeout=120))}


def _run_transfers(
    samples: dict[str, list[float]], transfer: Callable[[], dict[str, float]], count: int
) -> None:
    """One unrecorded transfer, then ``count`` recorded ones."""
    transfer()
    for _ in range(count):
        for name, took in transfer().items():
            samples[name].append(took)


def bench_weights(repeats: int) -> None:
    with RedisServer() as server:
        client = connect(server.url)
        store = WeightStore(client, "bench")
        fetcher: Any = ray.remote(Fetcher).options(num_cpus=0).remote(server.url, "bench")
        echo = socket.create_connection(("127.0.0.1", ray.get(fetcher.echo_port.remote())))
        echo.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        quiet_after = round(_wait_until_quiet(), 1)
        versions = itertools.count()
        for params in (1_000_000, 10_000_000):
            state = mlp_state(params)
            n = sum(t.numel() for t in state.values())
            redis = functools.partial(_via_redis, store, fetcher, state, versions)
            tcp = functools.partial(_via_tcp, echo, state, bytearray(4 * n))
            samples: dict[str, list[float]] = collections.defaultdict(list)
            run = functools.partial(_run_transfers, samples)
            # Redis and its TCP floor take turns in blocks, so they see the same machine. The
            # object store goes last: it frees objects in the background, which would
            # otherwise run inside the next transfers.
            for block in range(BLOCKS):
                for transfer in (redis, tcp):
                    run(transfer, repeats // BLOCKS + (block < repeats % BLOCKS))
            run(functools.partial(_via_ray, fetcher, state), repeats)
            redis_s, publish_s, fetch_s = samples["redis"], samples["publish"], samples["fetch"]
            floor_s, ray_s = samples["tcp"], samples["ray"]
            context = {
                "params": n,
                "megabytes": round(4 * n / 2**20, 1),
                "repeats": repeats,
                "quiet_after_s": quiet_after,
            }
            emit(
                f"weights_redis_publish_fetch_{params // 1_000_000}m",
                1000 * statistics.median(redis_s),
                "ms",
                **context,
                publish_ms=round(1000 * statistics.median(publish_s), 2),
                fetch_ms=round(1000 * statistics.median(fetch_s), 2),
                fastest_ms=round(1000 * min(redis_s), 2),
            )
            emit(
                f"weights_raw_tcp_round_trip_{params // 1_000_000}m",
                1000 * statistics.median(floor_s),
                "ms",
                **context,
                what="the same bytes sent to the fetcher's process and back over a plain "
                "loopback socket: two transfers, no Redis, no checksum",
            )
            emit(
                f"weights_ray_put_get_{params // 1_000_000}m",
                1000 * statistics.median(ray_s),
                "ms",
                **context,
                zero_copy_torch=os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "0"),
            )
        echo.close()
        ray.kill(fetcher)
        client.close()


# -- all-reduce share ---------------------------------------------------------------------


def bench_allreduce(num_envs: int, updates: int) -> None:
    cfg = load_config("spread-gnn", [*RAY_QUIET, "learner.num_ranks=2", f"env.num_envs={num_envs}"])
    env = cfg.env.make(num_envs, seed=0, device=torch.device("cpu"))
    batch = RolloutWorker(env, cfg.build_policy(env), cfg.train.rollout_len).collect()
    shards = batch.split_envs(2)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        group = LearnerGroup(cfg, Path(tmp), None, "bench", f"shoal-bench-{uuid.uuid4().hex[:6]}")
        group.start()
        try:
            ray.get([h.setup_model.remote() for h in group.ranks], timeout=120)
            # One untimed update lets DDP settle its static graph and buckets.
            ray.get([h.update.remote(s) for h, s in zip(group.ranks, shards, strict=True)])
            times = ray.get(
                [
                    h.time_updates.remote(s, updates)
                    for h, s in zip(group.ranks, shards, strict=True)
                ],
                timeout=600,
            )
        finally:
            group.shutdown()
    # A rank's all-reduce time includes waiting for the slower rank: report the mean share
    # and each rank's.
    shares = [t["allreduce_s"] / t["update_s"] for t in times]
    params = sum(p.numel() for p in cfg.build_policy(env).parameters())
    emit(
        "allreduce_share_k2",
        100 * statistics.mean(shares),
        "%",
        per_rank_percent=[round(100 * x, 1) for x in shares],
        update_s=round(statistics.mean(t["update_s"] for t in times) / updates, 4),
        allreduce_s=round(statistics.mean(t["allreduce_s"] for t in times) / updates, 4),
        params=params,
        env_steps_per_rank=shards[0].env_steps,
        minibatches_per_update=cfg.train.epochs * cfg.train.minibatches,
        backend="gloo",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["throughput", "replay", "weights", "allreduce"])
    parser.add_argument("--seconds", type=float, default=20.0, help="training time per topology")
    parser.add_argument("--num-envs", type=int, help="envs per rollout worker (preset's default)")
    parser.add_argument("--repeats", type=int, default=60, help="weight transfers per size")
    args = parser.parse_args()
    num_envs = args.num_envs or load_config("spread-gnn").env.num_envs
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="shoal-bench")
    try:
        if args.only in (None, "throughput"):
            bench_throughput(args.seconds, num_envs)
        if args.only in (None, "replay"):
            bench_replay(args.seconds)
        if args.only in (None, "weights"):
            bench_weights(args.repeats)
        if args.only in (None, "allreduce"):
            bench_allreduce(num_envs, updates=3)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
