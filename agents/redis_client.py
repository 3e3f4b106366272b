"""A Redis client that outlasts outages, and copy-free transfer of large values.

:func:`connect` returns a :class:`ResilientRedis`: every operation is retried with
exponential backoff while Redis restarts or the network blips, a lasting outage becomes
:class:`RedisUnavailable` naming the address (never the password), and ``on_reconnect`` tells
the trainer to republish what a restart lost. :func:`bulk_set` and :func:`bulk_get` move a
multi-MB value (policy weights) straight between the tensors' memory, the socket and the
buffer the reader's tensors live in.

Example:
    >>> client = connect("redis://:secret@127.0.0.1:6379/0")  # doctest: +SKIP
    >>> client.set("k", b"v")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool, PythonRespSerializer, parse_url
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

from agents.codec import Encoded

__all__ = [
    "PASSWORD_ENV",
    "Client",
    "RedisUnavailable",
    "ResilientRedis",
    "bulk_get",
    "bulk_set",
    "connect",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

PASSWORD_ENV = "SHOAL_REDIS_PASSWORD"


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
    executed it; every writer in :mod:`agents.memory` is idempotent except
    ``ReplayStream.append``.

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


# --------------------------------------------------------------------------- bulk values
# redis-py builds a reply in 64 KB reads into the parser's growing buffer, then copies it
# into a bytes object; for a 4 MB value that is ~4 ms of a ~1.5 ms transfer. These two
# functions move a large value with no copy on shoal's side, on a connection borrowed from
# the client's pool (so auth, TLS and timeouts are the pool's).


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


# A GET makes Redis copy the whole value into its reply buffer before sending a byte, on
# the one thread that then also sends it. Ranges of this size, each asked for while the
# previous one is being read, overlap that copy with the transfer and keep Redis's reply
# buffers small (reused, never faulted in afresh): a 4 MB value reads in ~2.1 ms instead of
# ~3 ms, a 40 MB one in ~17 ms instead of ~46 ms.
RANGE_BYTES = 512 * 1024


def _pack(*args: bytes | int) -> bytes:
    """A command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else b"%d" % arg
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Replies:
    """RESP replies read off a socket.

    Lines go through a small buffer; bulk bodies go straight into the caller's memory.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(256)
        self.start = 0  # unread bytes are buf[start:end]
        self.end = 0

    def line(self) -> bytes:
        while (eol := self.buf.find(b"\r\n", self.start, self.end)) < 0:
            if self.start:  # keep the unread part at the front
                self.buf[: self.end - self.start] = self.buf[self.start : self.end]
                self.end -= self.start
                self.start = 0
            elif self.end == len(self.buf):  # a long error line: keep reading it
                self.buf.extend(bytes(len(self.buf)))
            with memoryview(self.buf) as view:
                self.end += _recv_into(self.sock, view[self.end :])
        line = bytes(self.buf[self.start : eol])
        self.start = eol + 2
        return line

    def into(self, target: memoryview, progress: Callable[[int], None] | None = None) -> None:
        """Fill ``target``, calling ``progress(bytes_in)`` after every read."""
        have = min(self.end - self.start, len(target))
        target[:have] = self.buf[self.start : self.start + have]
        self.start += have
        while True:
            if progress is not None:
                progress(have)
            if have == len(target):
                return
            have += _recv_into(self.sock, target[have:])

    def integer(self) -> int:
        line = self.line()
        if line[:1] == b"-":
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if line[:1] != b":" or not line[1:].lstrip(b"-").isdigit():
            raise redis.ConnectionError(f"expected an integer reply, got {line[:40]!r}")
        return int(line[1:])

    def bulk_length(self) -> int | None:
        """The length announced by a bulk reply's header; ``None`` for a null."""
        line = self.line()
        kind = line[:1]
        if kind == b"-":
            raise redis.ResponseError(line[1:].decode(errors="replace"))
        if line == b"_":  # RESP3 null
            return None
        if kind not in (b"$", b"!") or not line[1:].lstrip(b"-").isdigit():
            raise redis.ConnectionError(f"unexpected reply to a bulk read: {line[:40]!r}")
        length = int(line[1:])
        if kind == b"!":  # RESP3 blob error
            text = bytearray(length)
            self.into(memoryview(text))
            self.end_of_bulk()
            raise redis.ResponseError(text.decode(errors="replace"))
        return None if length < 0 else length  # -1 is the RESP2 null

    def end_of_bulk(self) -> None:
        if self.line() != b"":
            raise redis.ConnectionError("bulk reply not terminated by CRLF")

    def skip(self, length: int | None) -> None:
        """Discard the body of a bulk reply whose header announced ``length``."""
        if length is not None:
            self.into(memoryview(bytearray(length)))
            self.end_of_bulk()


def bulk_get(
    r: redis.Redis,
    name: str,
    into: bytearray | None = None,
    on_data: Callable[[memoryview, int], None] | None = None,
) -> memoryview | None:
    """Read the string at ``name`` straight from the socket into one buffer, without copies.

    The value is read as ``GETRANGE`` pieces of :data:`RANGE_BYTES`, each asked for as soon
    as the previous one starts arriving. A key that disappears or shrinks midway reads as
    absent; one overwritten midway by a value at least as long reads as a mix of the two,
    which is why stored payloads carry a checksum.

    Args:
        r: The client whose pool lends the connection.
        name: The key.
        into: A buffer to read into if it is large enough (at least the value's length);
            otherwise a fresh ``bytearray`` is used.
        on_data: Called after every read with the value's buffer and how many of its
            bytes (from the start) have arrived, e.g. a :class:`agents.codec.Digest`.

    Returns:
        A writable view of the value (``view.obj`` is the buffer it lives in), or ``None``
        if the key is absent.

    Raises:
        redis.ConnectionError, redis.TimeoutError: As for any command; nothing is retried.
        redis.ResponseError: If the key holds something other than a string.
    """
    # The pool hands out a connected connection with nothing pending on it.
    conn = r.connection_pool.get_connection()

    key = name.encode()

    def send(*commands: tuple[bytes | int, ...]) -> None:
        # One write, so Redis reads the commands together; packed here, ~3x faster than
        # redis-py's general packer, as this runs a few times per MB.
        conn.send_packed_command([b"".join(_pack(*command) for command in commands)])

    def exchange() -> memoryview | None:
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise redis.ConnectionError(f"no socket to read {name} from")
        replies = _Replies(sock)
        send((b"STRLEN", key), (b"GETRANGE", key, 0, RANGE_BYTES - 1))
        try:
            length = replies.integer()
        except redis.ResponseError:  # a wrong type: the GETRANGE failed too
            with contextlib.suppress(redis.ResponseError):
                replies.skip(replies.bulk_length())
            raise
        announced = replies.bulk_length()
        if length == 0:  # empty or absent
            replies.skip(announced)
            send((b"EXISTS", key))
            exists = replies.integer()
            return memoryview(into if into is not None else bytearray())[:0] if exists else None
        value = memoryview(into if into is not None and len(into) >= length else bytearray(length))
        value = value[:length]

        def progress(start: int) -> Callable[[int], None] | None:
            return None if on_data is None else lambda n: on_data(value, start + n)

        for start in range(0, length, RANGE_BYTES):
            stop = min(start + RANGE_BYTES, length)
            more = stop < length
            if more:
                send((b"GETRANGE", key, stop, min(stop + RANGE_BYTES, length) - 1))
            if announced != stop - start:  # deleted or shortened since the STRLEN
                replies.skip(announced)
                if more:
                    replies.skip(replies.bulk_length())
                return None
            replies.into(value[start:stop], progress(start))
            replies.end_of_bulk()
            if more:
                announced = replies.bulk_length()
        return value

    return _release_after(r, conn, exchange)
