"""The tensor codec's guarantees: bit-exact round trips, the documented layout, validation."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import xxhash

from agents.memory import FORMAT, PayloadError, codec, decode_tensors, encode_tensors
from tests.agents.memory.helpers import assert_bit_equal, state_dict

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


def forge(header: object, body: bytes, *, checksum: int | None = None) -> bytes:
    """Builds a payload by hand, so the decoder is tested against the documented layout."""
    text = json.dumps(header).encode()
    payload = len(text).to_bytes(8, "little") + text + body
    if checksum is None:
        checksum = xxhash.xxh3_64_intdigest(payload)
    return payload + checksum.to_bytes(8, "little")


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
