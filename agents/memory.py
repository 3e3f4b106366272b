"""Redis as the run's shared memory: versioned weights, a replay stream and run state.

Every key lives under ``shoal:{run_id}:``. Tensors travel as raw little-endian bytes behind a
JSON header (:mod:`agents.codec`); nothing is ever pickled, so a payload from Redis can
at worst fail validation, never run code. Weights, the one multi-MB payload on the hot
path, are written from the tensors' own memory and read straight into the buffer the
fetched tensors live in. Every operation goes through a
:class:`~agents.redis_client.ResilientRedis`, which rides out a Redis restart or network
blip with exponential backoff and tells the trainer (``on_reconnect``) so it can republish
what the restart lost.

Example:
    >>> client = connect("redis://:secret@127.0.0.1:6379/0")  # doctest: +SKIP
    >>> store = WeightStore(client, "spread-1")  # doctest: +SKIP
    >>> store.publish(policy.state_dict(), version=7)  # doctest: +SKIP
    >>> store.fetch_if_newer(6)  # doctest: +SKIP
    (7, {...})
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, cast

import numpy as np
import redis
import torch
from redis.commands.core import Script

from agents.bulk import bulk_get, bulk_set
from agents.codec import (
    FORMAT,
    Digest,
    Encoded,
    Encoder,
    PayloadError,
    decode,
    decode_tensors,
    encode_tensors,
    is_count,
)
from agents.redis_client import (
    PASSWORD_ENV,
    Client,
    RedisUnavailable,
    ResilientRedis,
    connect,
)

__all__ = [
    "FORMAT",
    "PASSWORD_ENV",
    "PayloadError",
    "RedisUnavailable",
    "ReplayStream",
    "ResilientRedis",
    "RunState",
    "WeightStore",
    "connect",
    "decode_tensors",
    "encode_tensors",
    "key",
    "list_runs",
]

logger = logging.getLogger(__name__)

Chunk = dict[str, torch.Tensor]

RUNS_KEY = "shoal:runs"

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _caller(client: Client) -> Callable[[Callable[[redis.Redis], Any]], Any]:
    if isinstance(client, ResilientRedis):
        return client.call
    return lambda fn: fn(client)


def _raw(client: Client) -> redis.Redis:
    return client.client if isinstance(client, ResilientRedis) else client


def key(run_id: str, *parts: str | int) -> str:
    """The Redis key ``shoal:{run_id}:{part}:...``.

    Raises:
        ValueError: If ``run_id`` is empty, too long, or has characters outside
            ``[A-Za-z0-9._-]`` (a colon would make keys ambiguous).
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 characters from [A-Za-z0-9._-], starting "
            "with a letter or digit"
        )
    return ":".join(("shoal", run_id, *map(str, parts)))


# ----------------------------------------------------------------------------- weights


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
        run_id: The run's id; keys live under ``shoal:{run_id}:weights:``.
        keep: How many versions to keep.
    """

    def __init__(self, client: Client, run_id: str, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.run_id = run_id
        self.keep = keep
        self._call = _caller(client)
        self._lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._recv: bytearray | None = None
        self._encode = Encoder()  # reuses the layout while the tensors stay put
        self._latest_key = key(run_id, "weights", "latest")
        self._index_key = key(run_id, "weights", "versions")

    def _version_key(self, version: int | str) -> str:
        return key(self.run_id, "weights", version)

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


# ----------------------------------------------------------------------------- replay

# XADD and the id index must move together; the index lets sample() pick entries uniformly.
_APPEND_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'data', ARGV[2])
redis.call('RPUSH', KEYS[2], id)
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[1]), -1)
return id
"""

_SAMPLE_LUA = """
local size = redis.call('LLEN', KEYS[2])
local out = {}
if size == 0 then return out end
for i = 1, #ARGV do
  local idx = math.min(math.floor(tonumber(ARGV[i]) * size), size - 1)
  local id = redis.call('LINDEX', KEYS[2], idx)
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if entry[1] then out[#out + 1] = entry[1][2][2] end
end
return out
"""


class ReplayStream:
    """A capped Redis stream of trajectory chunks for world-model training.

    Args:
        client: A client from :func:`connect` (or a plain ``redis.Redis``).
        run_id: The run's id; the stream is ``shoal:{run_id}:replay``.
        maxlen: Approximate cap: Redis trims whole macro-nodes, so the stream holds at
            least ``maxlen`` and a little more entries once full.
    """

    def __init__(self, client: Client, run_id: str, maxlen: int = 10000) -> None:
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        self.run_id = run_id
        self.maxlen = maxlen
        self.key = key(run_id, "replay")
        self._index_key = key(run_id, "replay", "ids")
        self._client = client
        self._call = _caller(client)
        self._append = Script(_raw(client), _APPEND_LUA)
        self._sample = Script(_raw(client), _SAMPLE_LUA)

    def append(
        self, chunk: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
    ) -> str:
        """Add a chunk; the oldest entries beyond ``maxlen`` are trimmed.

        Returns:
            The entry id, e.g. ``"1700000000000-0"``.
        """
        payload = encode_tensors(chunk, meta)
        keys = [self.key, self._index_key]
        entry_id = self._call(
            lambda r: self._append(keys=keys, args=[self.maxlen, payload], client=r)
        )
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def tail(
        self, last_id: str = "0-0", count: int = 10, block_ms: int | None = None
    ) -> list[tuple[str, Chunk, dict[str, Any]]]:
        """Entries after ``last_id``, oldest first.

        Args:
            last_id: Return entries strictly after this id; ``"0-0"`` starts at the oldest.
            count: Most entries to return.
            block_ms: If set, wait up to this many milliseconds for an entry when none is
                there; must be shorter than the client's socket timeout.

        Returns:
            ``[(entry_id, chunk, meta), ...]``; pass the last id back to continue.
        """
        if block_ms is not None:
            timeout = (
                self._client.socket_timeout if isinstance(self._client, ResilientRedis) else None
            )
            if block_ms <= 0 or (timeout is not None and block_ms >= 1000 * timeout):
                raise ValueError(
                    f"block_ms must be in (0, {1000 * timeout if timeout else 'inf'}) ms, the "
                    f"client's socket timeout; got {block_ms}"
                )
        reply = self._call(lambda r: r.xread({self.key: last_id}, count=count, block=block_ms))
        entries = (
            next(iter(reply.values()))[0]
            if isinstance(reply, dict)
            else (reply[0][1] if reply else [])
        )
        out = []
        for entry_id, fields in entries:
            chunk, meta = decode_tensors(fields[b"data"])
            out.append(
                (entry_id.decode() if isinstance(entry_id, bytes) else entry_id, chunk, meta)
            )
        return out

    def sample(self, n: int, rng: random.Random | np.random.Generator) -> list[Chunk]:
        """Draw ``n`` of the newest ``maxlen`` chunks uniformly, with replacement, in one trip.

        Args:
            n: How many chunks.
            rng: The caller's generator, so a seeded run samples reproducibly.

        Returns:
            Up to ``n`` chunks; empty if the stream is empty.
        """
        if n <= 0:
            return []
        draws = (
            rng.random(n).tolist()
            if isinstance(rng, np.random.Generator)
            else [rng.random() for _ in range(n)]
        )
        keys = [self.key, self._index_key]
        payloads = self._call(
            lambda r: self._sample(keys=keys, args=[repr(u) for u in draws], client=r)
        )
        return [decode_tensors(p)[0] for p in payloads]

    def length(self) -> int:
        """Number of entries in the stream."""
        return int(self._call(lambda r: r.xlen(self.key)))


# ----------------------------------------------------------------------------- run state

_STATE_FIELDS = frozenset({"status", "started", "updated", "metrics", "config", "stop_requested"})


class RunState:
    """Status, heartbeats, latest metrics and the stop flag of one run.

    ``shoal status`` and ``shoal stop`` use this from any machine that reaches Redis.

    Args:
        client: A client from :func:`connect` (or a plain ``redis.Redis``).
        run_id: The run's id; keys are ``shoal:{run_id}:state`` and ``:heartbeats``.
    """

    def __init__(self, client: Client, run_id: str) -> None:
        self.run_id = run_id
        self.key = key(run_id, "state")
        self._heartbeats_key = key(run_id, "heartbeats")
        self._call = _caller(client)

    def _write(self, fields: Mapping[str, Any]) -> None:
        mapping: dict[Any, Any] = {name: json.dumps(value) for name, value in fields.items()}
        mapping["updated"] = json.dumps(time.time())

        def write(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.hsetnx(self.key, "started", mapping["updated"])
            pipe.hset(self.key, mapping=mapping)
            pipe.sadd(RUNS_KEY, self.run_id)
            pipe.execute()

        self._call(write)

    def set_status(self, status: str, **fields: Any) -> None:
        """Set the status (e.g. ``"running"``) and any extra JSON-serialisable fields."""
        clash = _STATE_FIELDS & fields.keys()
        if clash:
            raise ValueError(f"{sorted(clash)} are reserved run-state fields")
        self._write({"status": status, **fields})

    def set_config(self, summary: Mapping[str, Any]) -> None:
        """Record a JSON-serialisable summary of the run's config."""
        self._write({"config": dict(summary)})

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Replace the latest metrics (a JSON-serialisable mapping)."""
        self._write({"metrics": dict(metrics)})

    def heartbeat(self, actor_name: str) -> None:
        """Record that ``actor_name`` is alive now (unix time)."""
        self._call(lambda r: r.hset(self._heartbeats_key, actor_name, time.time()))

    def request_stop(self) -> None:
        """Ask the run to stop at its next check."""
        self._write({"stop_requested": True})

    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called."""
        value = self._call(lambda r: r.hget(self.key, "stop_requested"))
        return value is not None and json.loads(value) is True

    def get(self) -> dict[str, Any]:
        """Everything known about the run.

        Returns:
            ``{"run_id", "status", "started", "updated", "config", "metrics",
            "stop_requested", "heartbeats": {actor: unix_time}, **extra_fields}``.

        Raises:
            LookupError: If Redis holds nothing for this run.
        """

        def read(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(self.key)
            pipe.hgetall(self._heartbeats_key)
            return pipe.execute()

        state, beats = self._call(read)
        if not state and not beats:
            raise LookupError(f"no run {self.run_id!r} in Redis")
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "status": None,
            "started": None,
            "updated": None,
            "config": {},
            "metrics": {},
            "stop_requested": False,
        }
        for name, value in state.items():
            out[name.decode()] = json.loads(value)
        out["heartbeats"] = {name.decode(): float(value) for name, value in beats.items()}
        return out


def list_runs(client: Client) -> list[str]:
    """Ids of the runs that recorded state in this Redis, sorted."""
    members = _caller(client)(lambda r: r.smembers(RUNS_KEY))
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
