"""A Redis client that outlasts outages.

:func:`connect` returns a :class:`ResilientRedis`: every operation is retried with
exponential backoff while Redis restarts or the network blips, a lasting outage becomes
:class:`RedisUnavailable` naming the address (never the password), and ``on_reconnect`` tells
the trainer to republish what a restart lost. ``Client`` is what the stores accept: a
:class:`ResilientRedis` or a plain ``redis.Redis``, which they run their commands on through
``_caller`` and ``_raw``.

Example:
    >>> client = connect("redis://:secret@127.0.0.1:6379/0")  # doctest: +SKIP
    >>> client.set("k", b"v")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.connection import ConnectionPool, PythonRespSerializer, parse_url
from redis.retry import Retry
from redis.utils import HIREDIS_AVAILABLE

__all__ = [
    "PASSWORD_ENV",
    "Client",
    "RedisUnavailable",
    "ResilientRedis",
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
            except _REFUSED as err:  # ConnectionErrors that no amount of waiting fixes
                raise type(err)(
                    f"Redis at {self._address} refused the credentials: "
                    f"{self._scrub(str(err)).rstrip('.')}; "
                    f"check the user and password in the URL or {PASSWORD_ENV}"
                ) from None
            except (redis.ConnectionError, redis.TimeoutError) as err:
                if _untrusted_certificate(err):
                    raise redis.ConnectionError(
                        f"Redis at {self._address} presented a TLS certificate this client does "
                        f"not trust ({err.__context__}); name the CA that signed it in the URL: "
                        "rediss://...?ssl_ca_certs=/path/to/ca.pem"
                    ) from None
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


_REFUSED = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError)


def _untrusted_certificate(err: BaseException) -> bool:
    """Whether ``err`` comes from a failed TLS certificate check, which retrying cannot fix."""
    seen: BaseException | None = err
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
