"""Versioned policy weights in Redis: ``weights:{version}`` keys and a ``latest`` pointer.

Rank 0 publishes; rollout workers poll. A publish sends the payload straight from the
tensors' memory and moves the pointer in the same round trip (:mod:`agents.memory.bulk`); a
fetch reads it straight into the buffer the returned tensors live in.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import cast

import redis
import torch

from agents.memory.bulk import bulk_get, bulk_set
from agents.memory.client import Client, _caller
from agents.memory.codec import Digest, Encoded, Encoder, PayloadError, decode, is_count
from agents.memory.keys import key

__all__ = ["WeightStore"]


# Move the pointer, index the version, drop all but the newest `keep` (never the new one).
_POINT_LUA = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[1])
local excess = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[2])
if excess > 0 then
  for _, v in ipairs(redis.call('ZRANGE', KEYS[2], 0, excess - 1)) do
    if v ~= ARGV[1] then
      redis.call('UNLINK', ARGV[3] .. v)
      redis.call('ZREM', KEYS[2], v)
    end
  end
end
return 1
"""


class WeightStore:
    """Versioned policy weights: ``weights:{version}`` plus a ``weights:latest`` pointer.

    Rank 0 publishes; rollout workers poll :meth:`fetch_if_newer`, which costs one small
    read while nothing changed. Only the newest ``keep`` versions stay in Redis.

    Args:
        client: A client from :func:`connect` (or a plain ``redis.Redis``).
        run_id: The run's id; keys live under ``shoal:{run_id}:{name}:``.
        keep: How many versions to keep.
        name: What the weights are: ``weights`` (the policy) or ``world_model``.
    """

    def __init__(self, client: Client, run_id: str, keep: int = 3, name: str = "weights") -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_id = run_id
        self.keep = keep
        self._call = _caller(client)
        self._lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._recv: bytearray | None = None
        self._encode = Encoder()  # reuses the layout while the tensors stay put
        self.name = name
        self._latest_key = key(run_id, name, "latest")
        self._index_key = key(run_id, name, "versions")

    def _version_key(self, version: int | str) -> str:
        return key(self.run_id, self.name, version)

    def publish(self, state_dict: Mapping[str, torch.Tensor], version: int) -> None:
        """Store ``state_dict`` as ``version`` and point ``latest`` at it, in one round trip.

        The payload is sent from the tensors' memory: do not modify them from another
        thread meanwhile. Versions beyond the newest ``keep`` are deleted atomically with
        the pointer's move.

        Args:
            state_dict: Name to tensor, e.g. ``policy.state_dict()``.
            version: Non-negative int, normally increasing with every publish.
        """
        if not is_count(version):
            raise ValueError(f"version must be a non-negative int, got {version!r}")
        with self._lock:
            payload = self._encode(state_dict, {"version": version})
            self._call(lambda r: self._write(r, version, payload))

    def _write(self, r: redis.Redis, version: int, payload: Encoded) -> None:
        # One round trip. The version's key is written before the pointer moves to it, so
        # a reader that follows the pointer always finds a complete payload.
        keys = (self._latest_key, self._index_key)
        prefix = self._version_key("")
        script = ("EVAL", _POINT_LUA, 2, *keys, version, self.keep, prefix)
        bulk_set(r, self._version_key(version), payload, script)

    def latest_version(self) -> int | None:
        """The newest published version, or ``None`` before the first publish."""
        value = self._call(lambda r: r.get(self._latest_key))
        return None if value is None else int(value)

    def versions(self) -> list[int]:
        """Versions currently stored, oldest first."""
        return [int(v) for v in self._call(lambda r: r.zrange(self._index_key, 0, -1))]

    def fetch(
        self, version: int | None = None, *, reuse_buffer: bool = False
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Read a version (the latest by default).

        The payload is read from the socket into one buffer and the returned tensors are
        views into it, so a fetch costs one transfer and one checksum pass.

        Args:
            version: The version to read; ``None`` for the latest.
            reuse_buffer: Read into a buffer this store keeps for the next such fetch,
                which skips allocating (and faulting in) a fresh one. The returned tensors
                are then only valid until the next ``fetch(reuse_buffer=True)``: copy them
                first, as ``load_state_dict`` does.

        Returns:
            ``(version, state_dict)``.

        Raises:
            LookupError: If nothing was published yet or ``version`` is no longer kept.
            PayloadError: If the stored payload fails validation or holds another version.
        """
        with self._recv_lock if reuse_buffer else contextlib.nullcontext():
            for _ in range(5):
                wanted = self.latest_version() if version is None else version
                if wanted is None:
                    raise LookupError(f"no weights published yet for run {self.run_id!r}")
                payload, digest = self._read(wanted, self._recv if reuse_buffer else None)
                if payload is not None:
                    if reuse_buffer:
                        self._recv = cast(bytearray, payload.obj)
                    # The buffer is ours alone; it was hashed as it arrived.
                    tensors, meta = decode(payload, copy=False, digest=digest)
                    if meta.get("version") != wanted:
                        raise PayloadError(
                            f"weights:{wanted} of run {self.run_id!r} holds version "
                            f"{meta.get('version')!r}"
                        )
                    return wanted, tensors
                if version is not None:
                    raise LookupError(
                        f"weights version {version} of run {self.run_id!r} is not in Redis "
                        f"(kept: {self.versions()})"
                    )
                # A publisher pruned the version between our two reads; the pointer moved on.
        raise LookupError(f"weights of run {self.run_id!r} kept changing while being read")

    def _read(self, version: int, into: bytearray | None) -> tuple[memoryview | None, Digest]:
        def read(r: redis.Redis) -> tuple[memoryview | None, Digest]:
            digest = Digest()  # afresh on every attempt
            return bulk_get(r, self._version_key(version), into, on_data=digest), digest

        return self._call(read)

    def fetch_if_newer(
        self, current_version: int | None
    ) -> tuple[int, dict[str, torch.Tensor]] | None:
        """Fetch the latest weights only if newer than ``current_version``.

        Args:
            current_version: The version held by the caller, ``None`` if it holds none.

        Returns:
            ``(version, state_dict)``, or ``None`` if nothing newer is published.
        """
        latest = self.latest_version()
        if latest is None or (current_version is not None and latest <= current_version):
            return None
        try:
            return self.fetch(latest)
        except LookupError:
            return self.fetch()
