"""Copy-free transfer of large values: policy weights between tensors, socket and buffer.

:func:`bulk_set` sends a multi-MB value straight from the tensors' memory; :func:`bulk_get`
reads one straight into the buffer the reader's tensors will live in. Both borrow a connection
from a ``redis.Redis`` pool, so auth, TLS and timeouts are the pool's, and speak RESP
directly only for the value itself.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from agents.memory.codec import Encoded

__all__ = ["RANGE_BYTES", "bulk_get", "bulk_set"]

T = TypeVar("T")


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
            bytes (from the start) have arrived, e.g. a :class:`agents.memory.codec.Digest`.

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
