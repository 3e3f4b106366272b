"""A learner rank refills its replay from the Redis replay stream (a real redis-server)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import torch

from agents.memory import ReplayStream, connect
from agents.memory.client import ResilientRedis
from agents.replay import Replay
from orchestrator.runtime.rollout import refill_replay

pytestmark = pytest.mark.redis

T, B, N = 5, 2, 3  # steps, sub-envs per worker, agents


@pytest.fixture
def stream(redis_server) -> Iterator[ReplayStream]:
    client: ResilientRedis
    with connect(redis_server.url, outage_timeout=5) as client:
        yield ReplayStream(client, f"test-{uuid.uuid4().hex[:12]}", maxlen=100)


def chunk(worker: int, round_: int) -> dict[str, torch.Tensor]:
    """A worker's batch whose observations say which worker and round wrote it."""
    tag = float(100 * round_ + worker)
    return {
        "obs": torch.full((T, B, N, 4), tag),
        "alive": torch.ones(T, B, N, dtype=torch.bool),
        "actions": torch.zeros(T, B, N, dtype=torch.long),
        "rewards": torch.full((T, B, N), tag),
        "terminated": torch.zeros(T, B, N, dtype=torch.bool),
        "truncated": torch.zeros(T, B, dtype=torch.bool),
    }


def write(stream: ReplayStream, worker: int, round_: int) -> None:
    stream.append(chunk(worker, round_), {"worker": worker, "round": round_})


def test_a_rank_refills_the_rounds_all_its_workers_wrote_joined_in_worker_order(stream) -> None:
    names = ["shoal-rollout-2", "shoal-rollout-3"]  # rank 1 of 2, two workers each
    for round_ in range(3):
        for worker in (3, 0, 2, 1):  # any order, other ranks' workers between
            write(stream, worker, round_)
    write(stream, 2, 3)  # a round worker 3 never finished
    write(stream, 3, 4)
    write(stream, 3, 4)  # a re-collected batch (the first copy's process died)
    write(stream, 2, 4)
    stream.append({"obs": torch.zeros(2)}, {"worker": 2})  # a chunk that is no batch

    replay = Replay(10_000, frozenset({"obs", "alive"}))
    held = refill_replay(stream, names, replay)

    assert replay.filled == 4  # rounds 0, 1, 2 and 4
    assert held == replay.transitions == 4 * (T - 1) * 2 * B
    tags = replay.data["obs.obs"][: replay.filled, 0, :, 0, 0]  # [slot, env]
    expected = [[100 * r + 2] * B + [100 * r + 3] * B for r in (0, 1, 2, 4)]
    assert tags.tolist() == expected
    # The rewards went in with the observations they belong to; the team reward sums agents.
    assert torch.equal(replay.data["reward"][: replay.filled, 0], N * tags)


def test_an_empty_stream_refills_nothing(stream) -> None:
    replay = Replay(1000, frozenset({"obs", "alive"}))
    assert refill_replay(stream, ["shoal-rollout-0"], replay) == 0 and replay.filled == 0
