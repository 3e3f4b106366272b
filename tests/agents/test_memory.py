"""Redis shared memory: the tensor codec's guarantees and the stores against a real server."""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import random
import re
import threading
import time
import uuid

import numpy as np
import pytest
import redis
import torch
import xxhash

from agents import bulk, codec, memory, redis_client
from agents.memory import (
    FORMAT,
    PayloadError,
    RedisUnavailable,
    ReplayStream,
    RunState,
    WeightStore,
    connect,
    decode_tensors,
    encode_tensors,
    key,
    list_runs,
)

redis_test = pytest.mark.redis

# Same-width integer views make float comparison bit-exact: NaN payloads, -0.0, subnormals.
BIT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.uint8,
    torch.bool,
]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BIT_VIEW[t.dtype]) if t.dtype in BIT_VIEW else t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def sample_tensor(dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        t = torch.randn(5, 7, generator=gen, dtype=torch.float64).to(dtype)
        t[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
        t[1, 0] = torch.finfo(dtype).tiny / 4  # subnormal
        return t
    if dtype == torch.bool:
        return torch.rand(5, 7, generator=gen) > 0.5
    info = torch.iinfo(dtype)
    t = torch.randint(0, 100, (5, 7), generator=gen, dtype=torch.int64).to(dtype)
    t[0, 0], t[0, 1] = info.min, info.max
    return t


def state_dict(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(n, n, generator=gen),
        "layer.bias": torch.randn(n, generator=gen),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def forge(header: object, body: bytes, *, checksum: int | None = None) -> bytes:
    """Builds a payload by hand, so the decoder is tested against the documented layout."""
    text = json.dumps(header).encode()
    payload = len(text).to_bytes(8, "little") + text + body
    if checksum is None:
        checksum = xxhash.xxh3_64_intdigest(payload)
    return payload + checksum.to_bytes(8, "little")


def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact_for_every_dtype(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    base = sample_tensor(dtype, gen)
    tensors = {
        "plain": base,
        "transposed": base.t(),  # non-contiguous
        "strided": base[::2, 1::3],  # non-contiguous with offset
        "scalar": base[0, 0].clone(),
        "empty": base[:0],
        "grad": base.double().requires_grad_().to(dtype) if dtype.is_floating_point else base,
    }
    out, meta = decode_tensors(encode_tensors(tensors, {"dtype": str(dtype)}))
    assert meta == {"dtype": str(dtype)}
    assert list(out) == list(tensors)
    for name, tensor in tensors.items():
        assert_bit_equal(out[name], tensor.detach())


def test_decoded_tensors_are_independent_writable_copies() -> None:
    payload = bytearray(encode_tensors({"a": torch.zeros(4), "b": torch.zeros(4)}))
    out, _ = decode_tensors(payload)
    out["a"] += 1  # would warn or fail on a read-only buffer
    payload[:] = bytes(len(payload))
    assert torch.equal(out["a"], torch.ones(4)) and torch.equal(out["b"], torch.zeros(4))
    assert all(t.is_contiguous() for t in out.values())


def test_layout_matches_the_documented_format() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    payload = encode_tensors({"t": t}, {"step": 3})
    header_len = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + header_len])
    body = payload[8 + header_len : -8]
    assert header["format"] == FORMAT == "shoal-tensors/2"
    assert header["meta"] == {"step": 3}
    assert int.from_bytes(payload[-8:], "little") == xxhash.xxh3_64_intdigest(payload[:-8])
    assert (8 + header_len) % 64 == 0  # the body starts on a cache line
    spec = header["tensors"]["t"]
    assert spec["dtype"] == "float32" and spec["shape"] == [2, 3] and spec["nbytes"] == 24
    raw = np.frombuffer(body, dtype="<f4", count=6, offset=spec["offset"])
    assert raw.tolist() == t.flatten().tolist()


def test_tampered_body_byte_or_checksum_is_rejected() -> None:
    payload = encode_tensors(state_dict(n=8))
    header_len = int.from_bytes(payload[:8], "little")
    rng = random.Random(0)
    positions = rng.sample(range(8 + header_len, len(payload) - 8), 25)
    for pos in [*positions, len(payload) - 1]:
        tampered = bytearray(payload)
        tampered[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(PayloadError, match="checksum"):
            decode_tensors(bytes(tampered))


def test_a_rewritten_header_that_still_parses_is_rejected() -> None:
    payload = encode_tensors({"x": torch.zeros(2)}, {"version": 7})
    assert b'"version":7' in payload
    with pytest.raises(PayloadError, match="checksum"):
        decode_tensors(payload.replace(b'"version":7', b'"version":8'))


def test_every_truncation_is_rejected() -> None:
    payload = encode_tensors({"x": torch.arange(10), "y": torch.ones(3, dtype=torch.bool)})
    for cut in range(len(payload)):
        with pytest.raises(PayloadError):
            decode_tensors(payload[:cut])


def test_bad_header_json_is_rejected() -> None:
    payload = bytearray(encode_tensors({"x": torch.ones(3)}))
    payload[8:12] = b"{{{{"
    with pytest.raises(PayloadError, match="JSON"):
        decode_tensors(bytes(payload))
    with pytest.raises(PayloadError, match="JSON"):
        decode_tensors((2).to_bytes(8, "little") + b"\xff\xfe" + bytes(8))  # invalid UTF-8


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"format": "safetensors", "meta": {}, "tensors": {}}, "format"),
        ([1, 2, 3], "format"),
        ({"format": FORMAT, "meta": {}}, "tensors"),
        (
            {"format": FORMAT, "meta": {}, "tensors": {"x": {"dtype": "object", "shape": [1]}}},
            "dtype",
        ),
        (
            {
                "format": FORMAT,
                "meta": {},
                "tensors": {"x": {"dtype": "float32", "shape": [3], "offset": 0, "nbytes": 8}},
            },
            "nbytes",
        ),
        (
            {
                "format": FORMAT,
                "meta": {},
                "tensors": {"x": {"dtype": "float32", "shape": [-2], "offset": 0, "nbytes": 8}},
            },
            "shape",
        ),
        (
            {
                "format": FORMAT,
                "meta": {},
                "tensors": {"x": {"dtype": "float32", "shape": [4], "offset": 4, "nbytes": 16}},
            },
            "truncated",
        ),
    ],
)
def test_invalid_headers_are_rejected(header: object, message: str) -> None:
    body = bytes(16)
    with pytest.raises(PayloadError, match=message):
        decode_tensors(forge(header, body))


def test_a_payload_built_by_hand_from_the_documented_layout_decodes() -> None:
    # No alignment padding and an unpadded header: the layout allows any offsets.
    a = np.array([[1.5, -2.0], [0.25, 8.0]], dtype="<f4")
    b = np.array([7, -9], dtype="<i8")
    body = a.tobytes() + b"\x00\x00\x00" + b.tobytes()
    header = {
        "format": "shoal-tensors/2",
        "meta": {"version": 4},
        "tensors": {
            "a": {"dtype": "float32", "shape": [2, 2], "offset": 0, "nbytes": 16},
            "b": {"dtype": "int64", "shape": [2], "offset": 19, "nbytes": 16},
        },
    }
    out, meta = decode_tensors(forge(header, body))
    assert meta == {"version": 4}
    assert out["a"].tolist() == a.tolist() and out["b"].tolist() == b.tolist()
    with pytest.raises(PayloadError, match="checksum"):
        decode_tensors(forge(header, body, checksum=12345))


def test_encoding_sends_tensor_memory_without_copying_it() -> None:
    weight = torch.randn(64, 64)
    encoded = codec.encode({"w": weight, "b": torch.zeros(3)}, {"version": 1})
    assert encoded.tobytes() == encode_tensors({"w": weight, "b": torch.zeros(3)}, {"version": 1})
    assert encoded.nbytes == sum(len(memoryview(p).cast("B")) for p in encoded.pieces) + 8
    assert any(np.shares_memory(np.asarray(p), weight.numpy()) for p in encoded.pieces[1:])
    chunks = list(encoded.chunks(size=1000))
    assert max(len(c) for c in chunks) <= 1000 and b"".join(chunks) == encoded.tobytes()


def test_encoder_reuses_its_layout_only_while_it_still_views_the_tensors() -> None:
    net = torch.nn.Linear(8, 3)
    encoder = codec.Encoder()

    def layout() -> object:
        return None if encoder._cached is None else encoder._cached[1]

    def check(version: int) -> object:
        state = net.state_dict()
        payload = encoder(state, {"version": version}).tobytes()
        assert payload == encode_tensors(state, {"version": version})  # as if encoded afresh
        return layout()

    first = check(1)
    with torch.no_grad():  # an optimizer step: in place, same memory
        net.weight.add_(1.0)
    assert check(2) is first is not None
    net.weight = torch.nn.Parameter(torch.randn(3, 8))  # new memory: a new layout
    second = check(3)
    assert second is not first
    net.bias = torch.nn.Parameter(torch.randn(4))  # new shape
    assert check(4) is not second
    # A strided tensor is copied when encoded: never reused, its changes always seen.
    base = torch.randn(5, 6)
    for _ in range(3):
        base.add_(1.0)
        assert encoder({"t": base.t()}).tobytes() == encode_tensors({"t": base.t().contiguous()})
        assert layout() is None
    with pytest.raises(TypeError, match="torch.Tensor"):
        encoder({"x": np.zeros(2)})  # type: ignore[dict-item]


def test_decode_without_copy_returns_views_of_a_writable_payload() -> None:
    payload = bytearray(encode_tensors({"x": torch.arange(4.0)}))
    out, _ = codec.decode(payload, copy=False)
    out["x"] += 1
    assert torch.equal(torch.frombuffer(payload, dtype=torch.float32)[-6:-2], out["x"])
    with pytest.raises(ValueError, match="writable"):
        codec.decode(bytes(payload), copy=False)


def test_encode_rejects_what_it_cannot_represent() -> None:
    with pytest.raises(ValueError, match="complex64"):
        encode_tensors({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        encode_tensors({"x": np.zeros(2)})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="JSON"):
        encode_tensors({"x": torch.zeros(2)}, {"bad": object()})


def test_no_unpickling_code_path_exists() -> None:
    for module in (memory, codec, redis_client, bulk):
        source = inspect.getsource(module)
        assert "import pickle" not in source and "torch.load" not in source


def test_key_namespace_and_run_id_validation() -> None:
    assert key("run-1", "weights", 3) == "shoal:run-1:weights:3"
    for bad in ["", "a:b", "with space", "-lead", "x" * 129, "ü"]:
        with pytest.raises(ValueError, match="run_id"):
            key(bad)


def test_rediss_url_selects_tls_and_connects_lazily(monkeypatch) -> None:
    monkeypatch.setenv(memory.PASSWORD_ENV, "from-env")
    with connect("rediss://redis.example:6380/2", outage_timeout=1) as c:
        pool = c.client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs["password"] == "from-env"
        assert c.address == "redis.example:6380" and "from-env" not in repr(c)


# ----------------------------------------------------------------------------- Redis


@pytest.fixture
def client(redis_server):
    with connect(redis_server.url, outage_timeout=5) as c:
        yield c


@redis_test
def test_no_pickle_or_torch_load_on_the_read_paths(client, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling called")

    for module, name in [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    run = run_id()
    weights = WeightStore(client, run)
    weights.publish(state_dict(1), version=1)
    version, fetched = weights.fetch()
    assert version == 1 and torch.equal(fetched["layer.weight"], state_dict(1)["layer.weight"])
    stream = ReplayStream(client, run)
    stream.append({"obs": torch.ones(2, 3)}, {"env": 0})
    [(_, chunk, meta)] = stream.tail()
    assert torch.equal(chunk["obs"], torch.ones(2, 3)) and meta == {"env": 0}
    assert torch.equal(stream.sample(1, random.Random(0))[0]["obs"], torch.ones(2, 3))


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
def test_run_state_round_trip_and_stop_request(client, redis_server) -> None:
    run = run_id()
    state = RunState(client, run)
    with pytest.raises(LookupError):
        state.get()
    state.set_status("starting")
    started = state.get()["started"]
    state.set_config({"preset": "spread-gnn", "n_agents": 3})
    state.set_status("running", iteration=12, env_steps=4096)
    state.set_metrics({"return": -1.5, "loss": 0.25})
    state.heartbeat("shoal-rollout-0")
    state.heartbeat("shoal-learner-0")
    got = state.get()
    assert got["run_id"] == run and got["status"] == "running"
    assert got["started"] == started <= got["updated"] <= time.time()
    assert got["config"] == {"preset": "spread-gnn", "n_agents": 3}
    assert got["metrics"] == {"return": -1.5, "loss": 0.25}
    assert got["iteration"] == 12 and got["env_steps"] == 4096
    assert set(got["heartbeats"]) == {"shoal-rollout-0", "shoal-learner-0"}
    assert all(abs(t - time.time()) < 60 for t in got["heartbeats"].values())
    assert got["stop_requested"] is False and state.stop_requested() is False
    with connect(redis_server.url) as other:  # `shoal stop` runs in another process
        RunState(other, run).request_stop()
        assert run in list_runs(other)
    assert state.stop_requested() is True and state.get()["stop_requested"] is True
    with pytest.raises(ValueError, match="reserved"):
        state.set_status("running", metrics={})


@redis_test
def test_password_from_url_argument_or_environment(redis_server, monkeypatch) -> None:
    host_url = f"redis://{redis_server.address}/0"
    wrong_url = f"redis://:wrong@{redis_server.address}/0"
    monkeypatch.delenv(memory.PASSWORD_ENV, raising=False)
    with connect(redis_server.url) as c:
        assert c.ping()
    with connect(wrong_url, password=redis_server.password) as c:
        assert c.ping()
    monkeypatch.setenv(memory.PASSWORD_ENV, redis_server.password)
    with connect(host_url) as c:
        assert c.ping()
    monkeypatch.delenv(memory.PASSWORD_ENV)
    started = time.monotonic()
    with connect(host_url, outage_timeout=10) as c, pytest.raises(redis.AuthenticationError):
        c.ping()
    assert time.monotonic() - started < 2  # a wrong password is not an outage to wait out


@redis_test
def test_client_survives_restart_and_fires_on_reconnect(private_redis, caplog) -> None:
    run = run_id()
    calls: list[int] = []
    client = connect(private_redis.url, outage_timeout=10)
    store = WeightStore(client, run)

    def republish() -> None:
        calls.append(1)
        store.publish(state_dict(9), 9)

    client.on_reconnect = republish
    store.publish(state_dict(9), 9)
    assert calls == []

    # 1: the server restarts between two calls; the pool reconnects without an error.
    private_redis.restart()
    assert client.ping()
    assert calls == [1] and store.latest_version() == 9

    # 2: the server is down while a call is in flight; the call waits for it to return.
    caplog.set_level(logging.WARNING, logger="agents.memory")
    private_redis.stop()
    timer = threading.Timer(0.4, private_redis.start)
    timer.start()
    try:
        # Served by the fresh, empty server; the hook republishes right after.
        assert store.latest_version() is None
    finally:
        timer.join(timeout=10)
    assert calls == [1, 1] and store.latest_version() == 9
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1
    assert all(private_redis.password not in r.getMessage() for r in caplog.records)
    client.close()


@redis_test
def test_lasting_outage_raises_naming_address_not_password(private_redis, caplog) -> None:
    client = connect(private_redis.url, outage_timeout=1.0)
    assert client.ping()
    private_redis.stop()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable) as excinfo:
        client.get("anything")
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 4.0
    message = str(excinfo.value)
    assert f"127.0.0.1:{private_redis.port}" in message
    lasted = re.search(r"unreachable for (\d+\.\d) s", message)
    assert lasted is not None and 0.9 <= float(lasted.group(1)) <= elapsed + 0.1
    assert private_redis.password not in message
    assert private_redis.password not in repr(excinfo.getrepr())
    assert all(private_redis.password not in r.getMessage() for r in caplog.records)
    client.close()
