"""The weight store against a real Redis: versions, the latest pointer, pruning, buffers."""

from __future__ import annotations

import pytest
import redis
import torch

from agents.memory import WeightStore, key
from tests.agents.memory.helpers import assert_bit_equal, redis_test, run_id, state_dict


@redis_test
def test_weight_versions_latest_pointer_and_pruning(client, redis_server) -> None:
    run = run_id()
    store = WeightStore(client, run, keep=3)
    assert store.latest_version() is None and store.fetch_if_newer(None) is None
    with pytest.raises(LookupError, match="no weights"):
        store.fetch()
    for version in range(6):
        store.publish(state_dict(version), version)
    assert store.latest_version() == 5
    assert store.versions() == [3, 4, 5]
    raw = redis.Redis.from_url(redis_server.url)
    assert [raw.exists(key(run, "weights", v)) for v in range(6)] == [0, 0, 0, 1, 1, 1]
    version, latest = store.fetch()
    assert version == 5
    for name, tensor in state_dict(5).items():
        assert_bit_equal(latest[name], tensor)
    assert torch.equal(store.fetch(4)[1]["layer.bias"], state_dict(4)["layer.bias"])
    with pytest.raises(LookupError, match="version 1"):
        store.fetch(1)
    assert store.fetch_if_newer(5) is None and store.fetch_if_newer(7) is None
    newer = store.fetch_if_newer(3)
    assert newer is not None and newer[0] == 5
    assert WeightStore(client, run_id()).latest_version() is None  # runs do not share keys
    assert all(k.startswith(f"shoal:{run}:".encode()) for k in raw.keys(f"*{run}*"))


@redis_test
def test_reused_fetch_buffer_follows_changes_of_size(client) -> None:
    store = WeightStore(client, run_id())
    for version, n in enumerate([8, 32, 8, 8]):
        store.publish(state_dict(version, n=n), version)
        got, fetched = store.fetch(reuse_buffer=True)
        assert got == version
        for name, tensor in state_dict(version, n=n).items():
            assert_bit_equal(fetched[name], tensor)
    # Same size twice in a row: the second fetch lands in the first one's memory.
    first = store.fetch(2, reuse_buffer=True)[1]["layer.weight"].data_ptr()
    assert store.fetch(3, reuse_buffer=True)[1]["layer.weight"].data_ptr() == first
    # Without reuse every fetch owns its memory.
    assert store.fetch(3)[1]["layer.weight"].data_ptr() != first
