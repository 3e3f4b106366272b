"""Redis as the run's shared memory: versioned weights, a replay stream and run state.

Every key lives under ``shoal:{run_id}:``. Tensors travel as raw little-endian bytes behind a
JSON header; nothing is ever pickled, so a payload from Redis can at worst fail validation,
never run code. Weights, the one multi-MB payload on the hot path, are written from the
tensors' own memory and read straight into the buffer the fetched tensors live in. Every
operation goes through a :class:`ResilientRedis`, which rides out a Redis restart or
network blip with exponential backoff and tells the trainer (``on_reconnect``) so it can
republish what the restart lost.

Modules:
    client: :func:`connect`, :class:`ResilientRedis` and :class:`RedisUnavailable`.
    keys: :func:`key`, the ``shoal:{run_id}:`` namespace and the run-id rule.
    codec: the ``shoal-tensors/2`` payload format (:func:`encode_tensors`, :func:`decode_tensors`).
    bulk: copy-free ``SET``/``GET`` of multi-MB values on the client's own sockets.
    weights: :class:`WeightStore`, versioned policy weights and a ``latest`` pointer.
    replay: :class:`ReplayStream`, a capped stream of trajectory chunks.
    runstate: :class:`RunState` (status, heartbeats, metrics, stop flag) and :func:`list_runs`.

Example:
    >>> client = connect("redis://:secret@127.0.0.1:6379/0")  # doctest: +SKIP
    >>> store = WeightStore(client, "spread-1")  # doctest: +SKIP
    >>> store.publish(policy.state_dict(), version=7)  # doctest: +SKIP
    >>> store.fetch_if_newer(6)  # doctest: +SKIP
    (7, {...})
"""

from __future__ import annotations

from agents.memory.client import PASSWORD_ENV, RedisUnavailable, ResilientRedis, connect
from agents.memory.codec import FORMAT, PayloadError, decode_tensors, encode_tensors
from agents.memory.keys import key
from agents.memory.replay import ReplayStream
from agents.memory.runstate import RunState, list_runs
from agents.memory.weights import WeightStore

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
