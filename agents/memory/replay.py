"""The replay stream: a capped Redis stream of trajectory chunks, tailed or sampled."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from redis.commands.core import Script

from agents.memory.client import Client, ResilientRedis, _caller, _raw
from agents.memory.codec import decode_tensors, encode_tensors
from agents.memory.keys import key

__all__ = ["Chunk", "ReplayStream"]

Chunk = dict[str, torch.Tensor]

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
    """A capped Redis stream of trajectory chunks: the world model's and replay learners' data.

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

    def read(self, ids: Sequence[str]) -> list[tuple[Chunk, dict[str, Any]]]:
        """The entries ``ids`` (as :meth:`append` returned them), in that order, in one trip.

        Raises:
            LookupError: naming the first id the stream no longer holds (trimmed by
                ``maxlen``, or never written).
        """

        def fetch(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xrange(self.key, entry_id, entry_id)
            return list(pipe.execute())

        replies = self._call(fetch) if ids else []
        out = []
        for entry_id, reply in zip(ids, replies, strict=True):
            if not reply:
                raise LookupError(
                    f"replay stream {self.key} no longer holds entry {entry_id} (it keeps the "
                    f"newest ~{self.maxlen} entries)"
                )
            out.append(decode_tensors(reply[0][1][b"data"]))
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
