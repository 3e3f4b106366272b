"""Redis as the run's shared memory: versioned weights, a replay stream and run state.

Every key lives under ``shoal:{run_id}:``. Tensors travel as raw little-endian bytes behind a
JSON header (:mod:`agents.codec`); nothing is ever pickled, so a payload from Redis can
at worst fail validation, never run code. Weights, the one multi-MB payload on the hot
path, are written from the tensors' own memory and read straight into the buffer the
fetched tensors live in (:func:`bulk_set`, :func:`bulk_get`). Every operation goes through
:class:`ResilientRedis`, which rides out a Redis restart or network blip with exponential
backoff and tells the trainer (``on_reconnect``) so it can republish what the restart lost.

Example:
    >>> client = connect("redis://:secret@127.0.0.1:6379/0")  # doctest: +SKIP
    >>> store = WeightStore(client, "spread-1")  # doctest: +SKIP
    >>> store.publish(policy.state_dict(), version=7)  # doctest: +SKIP
    >>> store.fetch_if_newer(6)  # doctest: +SKIP
    (7, {...})
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.connection import ConnectionPool, PythonRespSerializer, parse_url
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from agents.codec import (
    FORMAT,
    Digest,
    Encoded,
    PayloadError,
    decode,
    decode_tensors,
    encode,
    encode_tensors,
    is_count,
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
    "bulk_get",
    "bulk_set",
    "connect",
    "decode_tensors",
    "encode_tensors",
    "key",
    "list_runs",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Chunk = dict[str, torch.Tensor]

PASSWORD_ENV = "SHOAL_REDIS_PASSWORD"
RUNS_KEY = "shoal:runs"

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RedisUnavailable(redis.RedisError):
    """Redis stayed unreachable for longer than the client's ``outage_timeout``."""


# ------------------------------------------------------------------------ resilient client


def _describe(kwargs: Mapping[str, Any]) -> str:
    if kwargs.get("path"):
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


class ResilientRedis:
    """A ``redis.Redis`` whose operations outlast connection drops and server restarts.

    An operation failing with ``ConnectionError``/``TimeoutError`` is retried with
    exponential backoff (``initial_backoff`` doubling up to ``max_backoff``) for up to
    ``outage_timeout`` seconds, then :class:`RedisUnavailable` is raised. A warning is logged
    once per outage. When an outage ends, or a new connection finds a different server
    (``run_id`` changed: a restart that happened between two calls), ``on_reconnect()`` runs
    once, so the trainer can republish weights the restart lost.

    Redis commands are available as methods (``client.get(k)``), each retried on its own.
    Multi-command work (pipelines, scripts) goes through :meth:`call`, which retries the
    whole function. A retried write may apply twice if the connection broke after Redis
    executed it; every writer in this module is idempotent except ``ReplayStream.append``.

    Args:
        client: The underlying client; :func:`connect` builds one. Its pool's connections
            get a handshake hook and no retries of their own, so wrap a client before it
            opens connections.
        outage_timeout: Seconds an operation keeps retrying before giving up.
        on_reconnect: Called with no arguments after a reconnect; exceptions are logged.
        initial_backoff: First retry delay in seconds.
        max_backoff: Cap on the retry delay in seconds.
    """

    _UNWRAPPED = frozenset(
        {"pipeline", "pubsub", "lock", "register_script", "monitor", "close"}
        | {"scan_iter", "hscan_iter", "sscan_iter", "zscan_iter"}
    )

    def __init__(
        self,
        client: redis.Redis,
        *,
        outage_timeout: float = 30.0,
        on_reconnect: Callable[[], None] | None = None,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
    ) -> None:
        self.client = client
        self.outage_timeout = outage_timeout
        self.on_reconnect = on_reconnect
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        kwargs = client.connection_pool.connection_kwargs
        kwargs["redis_connect_func"] = self._handshake
        # redis-py's own retries (10 by default) would hide outages from the loop in call().
        kwargs["retry"] = Retry(NoBackoff(), 0)
        self._address = _describe(kwargs)
        self._password = kwargs.get("password")
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self._server_id: str | None = None
        self._reconnected = False
        self._in_hook = False

    @property
    def address(self) -> str:
        """``host:port`` of the server, without credentials."""
        return self._address

    @property
    def socket_timeout(self) -> float | None:
        """Read timeout of the underlying connections in seconds."""
        value = self.client.connection_pool.connection_kwargs.get("socket_timeout")
        return None if value is None else float(value)

    def call(self, fn: Callable[[redis.Redis], T]) -> T:
        """Run ``fn(client)``, retrying all of it while Redis is unreachable.

        Args:
            fn: Work to do against the raw client; it may run more than once.

        Returns:
            What ``fn`` returns.

        Raises:
            RedisUnavailable: If Redis stays unreachable for ``outage_timeout`` seconds.
        """
        started = time.monotonic()
        delay = self.initial_backoff
        while True:
            try:
                result = fn(self.client)
            except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
                raise  # subclasses of ConnectionError that no amount of waiting fixes
            except (redis.ConnectionError, redis.TimeoutError) as err:
                now = time.monotonic()
                since = self._note_failure(err, now)
                remaining = self.outage_timeout - (now - started)
                if remaining <= 0:
                    raise RedisUnavailable(
                        f"Redis at {self._address} unreachable for {now - since:.1f} s "
                        f"(outage_timeout={self.outage_timeout:g} s); last error: "
                        f"{self._scrub(str(err))}"
                    ) from None
                time.sleep(min(delay, remaining))
                delay = min(2 * delay, self.max_backoff)
                continue
            self._note_success()
            return result

    def __getattr__(self, name: str) -> Any:
        if name == "client":  # not set yet (copy, unpickle): avoid recursing forever
            raise AttributeError(name)
        attr = getattr(self.client, name)
        if name.startswith("_") or name in self._UNWRAPPED or not callable(attr):
            return attr

        @functools.wraps(attr)
        def retried(*args: Any, **kwargs: Any) -> Any:
            return self.call(lambda _: attr(*args, **kwargs))

        return retried

    def close(self) -> None:
        """Close the underlying connections."""
        self.client.close()

    def __enter__(self) -> ResilientRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResilientRedis({self._address})"

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _note_failure(self, err: Exception, now: float) -> float:
        with self._lock:
            if self._outage_since is None:
                self._outage_since = now
                logger.warning(
                    "Redis at %s unreachable (%s); retrying for up to %g s",
                    self._address,
                    self._scrub(str(err)),
                    self.outage_timeout,
                )
            return self._outage_since

    def _note_success(self) -> None:
        with self._lock:
            if self._outage_since is None and not self._reconnected:
                return
            if self._outage_since is not None:
                logger.warning(
                    "Redis at %s reachable again after %.1f s",
                    self._address,
                    time.monotonic() - self._outage_since,
                )
            self._outage_since = None
            self._reconnected = False
            if self._in_hook or self.on_reconnect is None:
                return
            self._in_hook = True
        try:
            self.on_reconnect()
        except Exception:
            logger.exception("on_reconnect hook failed after Redis at %s came back", self._address)
        finally:
            with self._lock:
                self._in_hook = False

    def _handshake(self, conn: Any) -> None:
        conn.on_connect()
        try:
            conn.send_command("INFO", "server")
            info = conn.read_response()
        except redis.ResponseError:
            return  # some managed services disable INFO; outages are still detected
        text = info.decode(errors="replace") if isinstance(info, bytes) else str(info)
        match = re.search(r"run_id:(\w+)", text)
        if match is None:
            return
        with self._lock:
            if self._server_id is not None and self._server_id != match.group(1):
                self._reconnected = True
            self._server_id = match.group(1)


def connect(
    url: str,
    *,
    password: str | None = None,
    outage_timeout: float = 30.0,
    on_reconnect: Callable[[], None] | None = None,
    socket_timeout: float = 10.0,
    socket_connect_timeout: float = 2.0,
) -> ResilientRedis:
    """Connect to Redis at ``url`` with retries around every operation.

    Connecting is lazy: the first command opens the first connection.

    Args:
        url: ``redis://[:password@]host:port/db``, ``rediss://`` for TLS, or ``unix://``.
        password: Wins over a password in ``url``; without either, the environment variable
            ``SHOAL_REDIS_PASSWORD`` is used if set.
        outage_timeout: Seconds an operation keeps retrying before :class:`RedisUnavailable`.
        on_reconnect: Called after a reconnect; may also be set later as an attribute.
        socket_timeout: Seconds before a read from the server times out.
        socket_connect_timeout: Seconds before opening a connection times out.

    Returns:
        The wrapped client.
    """
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
        **parse_url(url),
    }
    from_url = options.get("password")
    if from_url == "***":  # a URL redacted for a run file: the real password is elsewhere
        from_url = None
        if not (password or os.environ.get(PASSWORD_ENV)):
            raise ValueError(
                f"the Redis URL's password was redacted from the run's config.yaml; set "
                f"{PASSWORD_ENV} or pass redis.url=redis://:PASSWORD@host:port/0 again"
            )
    options["password"] = password or from_url or os.environ.get(PASSWORD_ENV)
    pool = ConnectionPool(**options)
    if HIREDIS_AVAILABLE:
        # hiredis speeds up reading big replies but packs a multi-MB argument by repeated
        # reallocation (~10 ms for 4 MB); the Python packer sends it without copying.
        encoder = pool.get_encoder()
        pool.connection_kwargs["command_packer"] = PythonRespSerializer(6000, encoder.encode)
    client = redis.Redis(connection_pool=pool)
    return ResilientRedis(client, outage_timeout=outage_timeout, on_reconnect=on_reconnect)


Client = ResilientRedis | redis.Redis


def _caller(client: Client) -> Callable[[Callable[[redis.Redis], Any]], Any]:
    if isinstance(client, ResilientRedis):
        return client.call
    return lambda fn: fn(client)


def _raw(client: Client) -> redis.Redis:
    return client.client if isinstance(client, ResilientRedis) else client


# --------------------------------------------------------------------------- bulk values
# redis-py builds a reply in 64 KB reads into the parser's growing buffer, then copies it
# into a bytes object; for a 4 MB value that is ~4 ms of a ~1.5 ms transfer. These two
# functions move a large value with one syscall stream each way and no extra copy, on a
# connection borrowed from the client's pool (so auth, TLS and timeouts are the pool's).


def _release_after(r: redis.Redis, conn: Any, fn: Callable[[], T]) -> T:
    pool = r.connection_pool
    try:
        return fn()
    except BaseException:
        conn.disconnect()  # a half-sent or half-read exchange leaves the stream unusable
        raise
    finally:
        pool.release(conn)


def bulk_set(r: redis.Redis, name: str, payload: Encoded, *then: tuple[Any, ...]) -> list[Any]:
    """``SET name payload`` sending each piece of ``payload`` straight from its memory.

    Args:
        r: The client whose pool lends the connection.
        name: The key.
        payload: The value, as pieces.
        *then: Commands (``("EVAL", script, ...)``) sent in the same write, run after the
            SET in order; saves a round trip per command.

    Returns:
        The replies of ``then``.

    Raises:
        redis.ConnectionError, redis.TimeoutError: As for any command; nothing is retried.
        redis.ResponseError: If the SET or a command of ``then`` fails.
    """
    name_bytes = name.encode()
    prefix = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (
        len(name_bytes),
        name_bytes,
        payload.nbytes,
    )
    conn = r.connection_pool.get_connection()

    def exchange() -> list[Any]:
        tail = [b"\r\n"] + [chunk for command in then for chunk in conn.pack_command(*command)]
        # Each chunk is hashed for the trailer just before it is sent, while in cache.
        conn.send_packed_command(itertools.chain([prefix], payload.chunks(), tail))
        reply = conn.read_response()
        if reply not in (b"OK", "OK", True):
            raise redis.ResponseError(f"SET {name} answered {reply!r}")
        return [conn.read_response() for _ in then]

    return _release_after(r, conn, exchange)


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    try:
        n = sock.recv_into(view)
    except TimeoutError:  # socket.timeout
        raise redis.TimeoutError("Timeout reading a bulk reply") from None
    except OSError as err:
        raise redis.ConnectionError(f"Error while reading a bulk reply: {err}") from None
    if n == 0:
        raise redis.ConnectionError("Redis closed the connection during a bulk reply")
    return n


def _read_bulk(
    sock: socket.socket,
    into: bytearray | None,
    on_data: Callable[[memoryview, int], None] | None = None,
) -> memoryview | None:
    head = bytearray(64)
    view = memoryview(head)
    got = _recv_into(sock, view)
    while (eol := head.find(b"\r\n", 0, got)) < 0:
        if got == len(head):  # a long error line: keep reading it
            view.release()
            head.extend(bytes(len(head)))
            view = memoryview(head)
        got += _recv_into(sock, view[got:])
    line = bytes(head[:eol])
    kind = line[:1]
    if kind == b"-":
        raise redis.ResponseError(line[1:].decode(errors="replace"))
    if line == b"_":  # RESP3 null
        return None
    if kind not in (b"$", b"!") or not line[1:].lstrip(b"-").isdigit():
        raise redis.ConnectionError(f"unexpected reply to a bulk read: {line[:40]!r}")
    length = int(line[1:])
    if length < 0:  # RESP2 null
        return None
    # The value and its trailing CRLF; a reused buffer saves faulting in fresh pages.
    out = into if into is not None and len(into) >= length + 2 else bytearray(length + 2)
    target = memoryview(out)[: length + 2]
    have = min(got - eol - 2, len(target))
    target[:have] = view[eol + 2 : eol + 2 + have]
    value = target[:length]
    while True:
        if on_data is not None:
            on_data(value, min(have, length))
        if have == len(target):
            break
        have += _recv_into(sock, target[have:])
    if target[length:] != b"\r\n":
        raise redis.ConnectionError("bulk reply not terminated by CRLF")
    if kind == b"!":  # RESP3 blob error
        raise redis.ResponseError(bytes(target[:length]).decode(errors="replace"))
    return value


def bulk_get(
    r: redis.Redis,
    name: str,
    into: bytearray | None = None,
    on_data: Callable[[memoryview, int], None] | None = None,
) -> memoryview | None:
    """``GET name`` read straight from the socket into one buffer, without copies.

    Args:
        r: The client whose pool lends the connection.
        name: The key.
        into: A buffer to read into if it is large enough (at least the value plus 2
            bytes); otherwise a fresh ``bytearray`` is used.
        on_data: Called after every read with the value's buffer and how many of its
            bytes have arrived, e.g. a :class:`agents.codec.Digest`.

    Returns:
        A writable view of the value (``view.obj`` is the buffer it lives in), or ``None``
        if the key is absent.

    Raises:
        redis.ConnectionError, redis.TimeoutError: As for any command; nothing is retried.
        redis.ResponseError: If the key holds something other than a string.
    """
    # The pool hands out a connected connection with nothing pending on it.
    conn = r.connection_pool.get_connection()

    def exchange() -> memoryview | None:
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise redis.ConnectionError(f"no socket to read GET {name} from")
        conn.send_command("GET", name)
        return _read_bulk(sock, into, on_data)

    return _release_after(r, conn, exchange)


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
            payload = encode(state_dict, {"version": version})
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
        digest = Digest()

        def read(r: redis.Redis) -> memoryview | None:
            nonlocal digest
            digest = Digest()  # afresh on every attempt
            return bulk_get(r, self._version_key(version), into, on_data=digest)

        return self._call(read), digest

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
