"""The ``shoal-tensors/2`` payload: named tensors as raw bytes behind a JSON header.

Weights, replay chunks and anything else shoal puts in Redis travel in this format. Nothing
is pickled, so a payload read back can at worst fail validation, never run code.

Layout::

    8-byte little-endian header length H
    H bytes of JSON, space-padded so the body starts on a 64-byte boundary:
        {"format": "shoal-tensors/2", "meta": {...},
         "tensors": {name: {"dtype", "shape", "offset", "nbytes"}, ...},
         "xxh3_64": hex digest of the body}
    body: each tensor's contiguous little-endian CPU bytes at its 64-byte aligned offset,
          zero padding in between

The checksum is XXH3-64: it detects corruption and truncation at ~20 GB/s (sha256 ran at
~1 GB/s and dominated the weight round trip). It is not a signature: anyone who can write
to the run's Redis can write weights, so Redis must be protected by a password or ACL.

Example:
    >>> payload = encode_tensors({"w": torch.ones(2)}, {"version": 3})
    >>> tensors, meta = decode_tensors(payload)
    >>> meta
    {'version': 3}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import xxhash

__all__ = ["FORMAT", "Encoded", "PayloadError", "decode_tensors", "encode_tensors"]

FORMAT = "shoal-tensors/2"
CHECKSUM = "xxh3_64"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_LEN_BYTES = 8
# 64-byte alignment puts decoded tensors on cache-line boundaries inside one buffer.
_ALIGN = 64
_ZEROS = bytes(_ALIGN)


class PayloadError(ValueError):
    """A tensor payload is malformed, truncated, tampered with, or of an unknown format."""


def _align(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


class Encoded:
    """A payload as a list of buffers that still point into the source tensors.

    Sending ``pieces`` one after another (``socket.sendall`` each) transmits the payload
    without first copying multi-MB tensors into one buffer. The pieces are views: do not
    modify the tensors until the payload is sent, or its checksum will not match.

    Attributes:
        pieces: The header (with its length prefix and padding), then the body's tensor
            views and padding, in order.
        nbytes: Total length of the payload.
    """

    __slots__ = ("nbytes", "pieces")

    def __init__(self, pieces: list[bytes | memoryview], nbytes: int) -> None:
        self.pieces = pieces
        self.nbytes = nbytes

    def tobytes(self) -> bytes:
        """The payload as one ``bytes`` object (a copy)."""
        return b"".join(self.pieces)


def encode(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Encoded:
    """Like :func:`encode_tensors`, but returns the payload as pieces without copying."""
    if sys.byteorder != "little":
        raise NotImplementedError(f"{FORMAT} payloads are only produced on little-endian hosts")
    entries: dict[str, dict[str, Any]] = {}
    body: list[bytes | memoryview] = []
    digest = xxhash.xxh3_64()
    size = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TypeError(f"{name!r} must be a dense torch.Tensor, got {type(tensor).__name__}")
        dtype = _DTYPE_NAMES.get(tensor.dtype)
        if dtype is None:
            raise ValueError(
                f"tensor {name!r} has dtype {tensor.dtype}; supported dtypes: {', '.join(_DTYPES)}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        offset = _align(size)
        if offset > size:
            body.append(_ZEROS[: offset - size])
        entries[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "offset": offset,
            "nbytes": flat.numel(),
        }
        if flat.numel():
            body.append(flat.numpy().data)
        size = offset + flat.numel()
    for piece in body:
        digest.update(piece)
    header = {"format": FORMAT, "meta": dict(meta or {}), "tensors": entries}
    header[CHECKSUM] = digest.hexdigest()
    try:
        text = json.dumps(header, separators=(",", ":")).encode()
    except TypeError as err:
        raise TypeError(f"payload meta must be JSON-serialisable: {err}") from err
    start = _align(_LEN_BYTES + len(text))
    head = (start - _LEN_BYTES).to_bytes(_LEN_BYTES, "little") + text.ljust(start - _LEN_BYTES)
    return Encoded([head, *body], start + size)


def encode_tensors(
    tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> bytes:
    """Serialise named tensors and JSON metadata without pickle (layout: module docstring).

    Args:
        tensors: Name to tensor; any device, any strides; one of the dtypes float32, float64,
            float16, bfloat16, int64, int32, uint8, bool.
        meta: JSON-serialisable metadata returned unchanged by :func:`decode_tensors`.

    Returns:
        The payload.

    Raises:
        TypeError: If a value is not a dense tensor or ``meta`` is not JSON-serialisable.
        ValueError: If a tensor has an unsupported dtype.
    """
    return encode(tensors, meta).tobytes()


def _fail(message: str) -> PayloadError:
    return PayloadError(f"invalid {FORMAT} payload: {message}")


def is_count(value: Any) -> bool:
    """A non-negative ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode(
    payload: bytes | bytearray | memoryview, *, copy: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Like :func:`decode_tensors`; ``copy=False`` returns views into ``payload``.

    Views need a writable ``payload`` (a ``bytearray``) that the caller no longer uses.
    """
    view = memoryview(payload).cast("B")
    if not copy and view.readonly:
        raise ValueError("decode(copy=False) needs a writable payload, e.g. a bytearray")
    if len(view) < _LEN_BYTES:
        raise _fail(f"truncated: {len(view)} bytes, shorter than the header length field")
    header_len = int.from_bytes(view[:_LEN_BYTES], "little")
    start = _LEN_BYTES + header_len
    if start > len(view):
        raise _fail(f"truncated: header claims {header_len} bytes, payload has {len(view)}")
    try:
        header = json.loads(bytes(view[_LEN_BYTES:start]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise _fail(f"format is {found!r}, expected {FORMAT!r}")
    meta, specs, digest = header.get("meta"), header.get("tensors"), header.get(CHECKSUM)
    if not isinstance(meta, dict) or not isinstance(specs, dict) or not isinstance(digest, str):
        raise _fail(f"header needs a 'meta' object, a 'tensors' object and a '{CHECKSUM}' string")
    body = view[start:]
    layout: list[tuple[str, torch.dtype, list[int], int, int]] = []
    for name, spec in specs.items():
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES:
            dtype = spec.get("dtype") if isinstance(spec, dict) else spec
            raise _fail(f"tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        dtype = _DTYPES[spec["dtype"]]
        shape, offset, nbytes = spec.get("shape"), spec.get("offset"), spec.get("nbytes")
        if not (
            isinstance(shape, list)
            and all(is_count(dim) for dim in shape)
            and is_count(offset)
            and is_count(nbytes)
        ):
            raise _fail(f"tensor {name!r} needs a shape of non-negative ints, offset and nbytes")
        if nbytes != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise _fail(f"tensor {name!r}: nbytes {nbytes} does not match shape {shape}")
        if offset + nbytes > len(body):
            raise _fail(
                f"truncated: tensor {name!r} ends at body byte {offset + nbytes}, "
                f"body has {len(body)}"
            )
        layout.append((str(name), dtype, list(shape), spec["offset"], spec["nbytes"]))
    if xxhash.xxh3_64_hexdigest(body) != digest:
        raise _fail(f"body {CHECKSUM} does not match the header: the payload was corrupted")
    if copy:
        buf: bytearray | memoryview = bytearray(body)
        base = 0
    else:
        buf, base = view, start
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype, shape, offset, nbytes in layout:
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
        else:
            count = nbytes // dtype.itemsize
            flat = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + offset)
            tensors[name] = flat.view(shape)
    return tensors, meta


def decode_tensors(
    payload: bytes | bytearray | memoryview,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`encode_tensors`; validates everything before building a tensor.

    The body is copied once into a fresh buffer that the returned tensors share, so they
    are writable and independent of ``payload``.

    Args:
        payload: Bytes produced by :func:`encode_tensors`.

    Returns:
        ``(tensors, meta)``.

    Raises:
        PayloadError: If the format is unknown, the header is not valid JSON, the payload is
            truncated, a dtype is not whitelisted, or the body's checksum does not match.
    """
    return decode(payload, copy=True)
