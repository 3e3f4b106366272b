"""The replay stream against a real Redis: capped, ordered, sampled uniformly."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from agents.memory import ReplayStream
from tests.agents.memory.helpers import redis_test, run_id


@redis_test
def test_replay_stream_is_capped_and_ordered(client) -> None:
    stream = ReplayStream(client, run_id(), maxlen=50)
    assert stream.tail() == [] and stream.sample(5, random.Random(0)) == []
    for i in range(400):
        stream.append({"i": torch.tensor([i]), "obs": torch.full((2,), float(i))}, {"i": i})
    # MAXLEN ~ trims whole 100-entry stream nodes, never below maxlen.
    assert 50 <= stream.length() <= 150
    entries = stream.tail(count=1000)
    order = [meta["i"] for _, _, meta in entries]
    assert order == list(range(400 - len(order), 400)) and len(order) == stream.length()
    assert all(int(chunk["i"]) == meta["i"] for _, chunk, meta in entries)
    ids = [entry_id for entry_id, _, _ in entries]
    assert [meta["i"] for _, _, meta in stream.tail(ids[-3], count=10)] == [398, 399]
    started = time.monotonic()
    assert stream.tail(ids[-1], block_ms=50) == []
    assert time.monotonic() - started < 2


@redis_test
def test_replay_sample_is_uniform_over_the_newest_maxlen_and_reproducible(client) -> None:
    stream = ReplayStream(client, run_id(), maxlen=40)
    for i in range(250):
        stream.append({"i": torch.tensor(i)})
    picks = [int(c["i"]) for c in stream.sample(2000, random.Random(7))]
    assert len(picks) == 2000
    # Every one of the newest 40 appears (missing one has probability ~40 * e^-50).
    assert set(picks) == set(range(210, 250))
    again = [int(c["i"]) for c in stream.sample(2000, random.Random(7))]
    assert again == picks
    assert len(stream.sample(5, np.random.default_rng(0))) == 5


@redis_test
def test_replay_stream_reads_entries_by_id_in_order_and_names_one_it_trimmed(client) -> None:
    stream = ReplayStream(client, run_id(), maxlen=10)
    ids = [stream.append({"x": torch.full((3, 2), float(i))}, {"i": i}) for i in range(300)]
    picked = [ids[-1], ids[-5], ids[-1]]
    got = stream.read(picked)
    assert [meta["i"] for _, meta in got] == [299, 295, 299]
    assert torch.equal(got[1][0]["x"], torch.full((3, 2), 295.0))
    assert stream.read([]) == []
    with pytest.raises(LookupError, match=ids[0]):
        stream.read([ids[-1], ids[0]])
