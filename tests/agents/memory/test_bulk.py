"""Copy-free bulk transfers: any size, ranged reads, keys changing midway, broken reads."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from agents.memory import WeightStore, bulk, codec, connect, key
from tests.agents.memory.helpers import assert_bit_equal, redis_test, run_id, state_dict


@redis_test
@pytest.mark.parametrize("size", [0, 1, 61, 62, 63, 64, 65_534, 65_536, 1_000_003])
def test_bulk_set_and_get_round_trip_any_size(client, size: int) -> None:
    data = np.random.default_rng(size).bytes(size)
    name = key(run_id(), "blob")
    encoded = codec.Encoded([data[: size // 3], memoryview(data)[size // 3 :]], size + 8)
    client.call(lambda r: bulk.bulk_set(r, name, encoded))
    data = encoded.tobytes()  # the pieces, then their checksum
    assert client.get(name) == data  # what redis-py sees is what was sent
    assert bytes(client.call(lambda r: bulk.bulk_get(r, name))) == data
    spare = bytearray(size + 10)
    view = client.call(lambda r: bulk.bulk_get(r, name, into=spare))
    assert view.obj is spare and bytes(view) == data
    small = bytearray(1)
    view = client.call(lambda r: bulk.bulk_get(r, name, into=small))
    assert view.obj is not small and bytes(view) == data
    assert client.ping()  # the connection is in a clean state afterwards


@redis_test
@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 999, 1000, 1001])
def test_bulk_get_in_ranges_reports_progress_in_order(
    redis_server, monkeypatch, protocol: int, size: int
) -> None:
    monkeypatch.setattr(bulk, "RANGE_BYTES", 100)
    data = np.random.default_rng(size).bytes(size)
    name = key(run_id(), "blob")
    seen: list[int] = []

    def on_data(view: memoryview, received: int) -> None:
        assert len(view) == size and bytes(view[:received]) == data[:received]
        seen.append(received)

    with connect(f"{redis_server.url}?protocol={protocol}", outage_timeout=5) as client:
        client.set(name, data)
        spare = bytearray(size)
        view = client.call(lambda r: bulk.bulk_get(r, name, spare, on_data))
        assert view.obj is spare and bytes(view) == data
        assert seen == sorted(seen) and (seen[-1] == size if size else not seen)
        assert client.call(lambda r: bulk.bulk_get(r, name + ":absent")) is None
        assert client.ping()


@redis_test
def test_bulk_get_of_a_key_deleted_midway_reads_as_absent(
    client, redis_server, monkeypatch
) -> None:
    monkeypatch.setattr(bulk, "RANGE_BYTES", 1000)
    name = key(run_id(), "blob")
    client.set(name, bytes(10_000))
    real, calls = bulk._recv_into, []

    def deleting(sock, view):
        calls.append(1)
        if len(calls) == 2:  # some ranges read, later ones not yet asked for
            with connect(redis_server.url, outage_timeout=5) as other:
                other.delete(name)
        return real(sock, view)

    monkeypatch.setattr(bulk, "_recv_into", deleting)
    assert client.call(lambda r: bulk.bulk_get(r, name)) is None
    assert client.ping()
    client.set(name, b"back")
    assert bytes(client.call(lambda r: bulk.bulk_get(r, name))) == b"back"


@redis_test
def test_bulk_get_of_a_missing_key_or_a_wrong_type(client) -> None:
    name = key(run_id(), "nothing")
    assert client.call(lambda r: bulk.bulk_get(r, name)) is None
    client.rpush(name, "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.call(lambda r: bulk.bulk_get(r, name))
    assert client.lrange(name, 0, -1) == [b"x"]


@redis_test
def test_a_bulk_read_broken_midway_is_retried_on_a_fresh_connection(client, monkeypatch) -> None:
    store = WeightStore(client, run_id())
    store.publish(state_dict(5, n=256), 5)
    real, calls = bulk._recv_into, []

    def flaky(sock, view):
        calls.append(1)
        if len(calls) == 2:  # after the header, before the body is in
            raise redis.ConnectionError("connection reset")
        return real(sock, view)

    monkeypatch.setattr(bulk, "_recv_into", flaky)
    version, fetched = store.fetch(reuse_buffer=True)
    assert version == 5 and len(calls) > 2
    for name, tensor in state_dict(5, n=256).items():
        assert_bit_equal(fetched[name], tensor)
