"""The run's Redis, started or joined by the driver: :class:`SharedMemory` and :class:`RedisServer`.

A local run needs shared memory (weights, replay stream, run state) but should not ask the
user to run a database. :class:`RedisServer` starts one on a free loopback port, protected
by a random password, with persistence off, and stops it when the run ends: on ``stop()``,
on leaving a ``with`` block (also through Ctrl-C or an exception) and at interpreter exit.

Example:
    >>> with RedisServer() as server:  # doctest: +SKIP
    ...     client = agents.memory.connect(server.url)
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from agents.memory import ReplayStream, ResilientRedis, RunState, WeightStore, connect
from orchestrator.config import RedisConfig
from orchestrator.runtime.rundir import CONN_FILE

__all__ = ["RedisServer", "RedisServerError", "SharedMemory"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
# Directives the server's safety depends on: a caller may not override them.
_RESERVED = frozenset(
    {"bind", "port", "requirepass", "protected-mode", "dir", "logfile", "daemonize", "include"}
)
_PORT_ATTEMPTS = 5
# Keeps caller-supplied text from smuggling extra directives into redis.conf.
_UNSAFE_CONF = re.compile(r"[\r\n\x00]")
_SAFE_PASSWORD = re.compile(r"[!#-\[\]-~]{1,512}")


class RedisServerError(RuntimeError):
    """The private redis-server could not be found, started or reached."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


# jemalloc, which redis-server uses, otherwise hands a freed multi-MB buffer back to the OS
# at once, so every publish of 40 MB of weights faults ~10k fresh pages in (~17 ms of a
# ~35 ms publish). A run's private server keeps freed memory for reuse instead; its
# footprint stays at its peak, which weights kept and a capped replay stream bound.
_JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MALLOC_CONF", _JEMALLOC_CONF)  # a caller's own setting wins
    return env


def redis_server_installed(executable: str = "redis-server") -> bool:
    """Whether a private server can be started: ``executable`` is on ``PATH``."""
    return shutil.which(executable) is not None


class RedisServer:
    """A private ``redis-server`` bound to 127.0.0.1 with a generated password.

    The server keeps nothing on disk (``save ""``, ``appendonly no``); its config and log
    live in a temporary directory removed on stop. The password is written to a config file
    readable only by the owner instead of the command line, where ``ps`` would show it.

    Args:
        port: Port to listen on; ``None`` picks a free one at the first start.
        password: Password clients must send; ``None`` generates one with ``secrets``.
        startup_timeout: Seconds to wait for the server to answer PING.
        stop_timeout: Seconds to wait after SIGTERM before SIGKILL.
        executable: Name or path of the server binary.
        config: Extra ``redis.conf`` directives, e.g. ``{"maxmemory": "2gb"}``. Directives
            that decide where and to whom the server listens (``bind``, ``port``,
            ``requirepass``, ``protected-mode``, ...) are fixed and rejected here.

    Raises:
        ValueError: If ``config`` tries to override a fixed directive.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        password: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        executable: str = "redis-server",
        config: Mapping[str, str] | None = None,
    ) -> None:
        extra = {str(key): str(value) for key, value in (config or {}).items()}
        if any(_UNSAFE_CONF.search(item) for pair in extra.items() for item in pair):
            raise ValueError("RedisServer config keys and values must be single-line text")
        if password is not None and not _SAFE_PASSWORD.fullmatch(password):
            raise ValueError(
                "RedisServer password must be 1-512 printable characters without spaces, "
                "quotes or backslashes"
            )
        reserved = sorted(_RESERVED & {key.lower() for key in extra})
        if reserved:
            raise ValueError(
                f"RedisServer config may not set {', '.join(reserved)}: the private server "
                "always listens on 127.0.0.1 with a password; pass port=/password= instead"
            )
        self._port = port
        self._fixed_port = port is not None
        self._password = password if password is not None else secrets.token_hex(24)
        self._startup_timeout = startup_timeout
        self._stop_timeout = stop_timeout
        self._executable = executable
        self._config = extra
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._lock = threading.RLock()

    @property
    def url(self) -> str:
        """``redis://:PASSWORD@127.0.0.1:PORT/0``; contains the password, never log it."""
        return f"redis://:{quote(self._password, safe='')}@{self.address}/0"

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` without credentials, safe to log."""
        if self._port is None:
            raise RedisServerError("RedisServer has no port yet: call start() first")
        return f"{_HOST}:{self._port}"

    @property
    def host(self) -> str:
        """Always ``127.0.0.1``."""
        return _HOST

    @property
    def port(self) -> int | None:
        """The listening port, ``None`` before the first start."""
        return self._port

    @property
    def password(self) -> str:
        """The password clients must send."""
        return self._password

    @property
    def pid(self) -> int | None:
        """PID of the running server, ``None`` when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self.pid is not None

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING.

        Returns:
            ``self``, so ``server = RedisServer().start()`` reads naturally.

        Raises:
            RedisServerError: If ``redis-server`` is not installed, exits early, or does not
                answer within ``startup_timeout``; the message carries the server log's tail.
        """
        with self._lock:
            if self.running:
                return self
            binary = shutil.which(self._executable)
            if binary is None:
                raise RedisServerError(
                    f"{self._executable!r} not found on PATH; install it with "
                    "`apt-get install redis-server` (or `make redis`), or point the run at an "
                    "existing Redis with redis.url=redis://... (or SHOAL_REDIS_URL)"
                )
            try:
                self._start_on_some_port(binary)
            except BaseException:
                # Covers Ctrl-C during startup too: never leave a half-started server behind.
                self._terminate()
                raise
            atexit.register(self.stop)
            logger.info("started private redis-server pid %s on %s", self.pid, self.address)
            return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``stop_timeout``) and clean up.

        Safe to call more than once and on a server that never started.
        """
        with self._lock:
            atexit.unregister(self.stop)
            pid = self.pid
            self._terminate()
            if pid is not None:
                logger.info("stopped private redis-server pid %s", pid)

    def restart(self) -> None:
        """Stop and start again on the same port with the same password.

        Data is lost (there is no persistence), which is what a real Redis restart looks
        like to clients; tests use it to exercise reconnects.
        """
        with self._lock:
            self.stop()
            fixed = self._fixed_port
            self._fixed_port = True
            try:
                self.start()
            finally:
                self._fixed_port = fixed

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.address if self._port is not None else "unstarted"
        return f"RedisServer({where}, pid={self.pid})"

    def _start_on_some_port(self, binary: str) -> None:
        attempts = 1 if self._fixed_port else _PORT_ATTEMPTS
        for attempt in range(attempts):
            if not self._fixed_port and (self._port is None or attempt > 0):
                self._port = _free_port()
            self._spawn(binary)
            try:
                self._wait_ready()
                return
            except RedisServerError:
                # Another process can grab the free port between probing it and binding it.
                lost_race = "Address already in use" in self._log_tail()
                self._terminate()
                if not lost_race or attempt == attempts - 1:
                    raise

    def _spawn(self, binary: str) -> None:
        self._tmpdir = Path(tempfile.mkdtemp(prefix="shoal-redis-"))
        conf = self._tmpdir / "redis.conf"
        lines = [
            f"bind {_HOST}",
            f"port {self._port}",
            "protected-mode yes",
            f'requirepass "{self._password}"',
            f'dir "{self._tmpdir}"',
            f'logfile "{self._tmpdir / "redis.log"}"',
            'save ""',
            "appendonly no",
            "daemonize no",
            *(f"{key} {value}" for key, value in self._config.items()),
        ]
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(self._tmpdir / "stdout.log", "wb") as out:
            # A new session keeps the terminal's Ctrl-C away from the server, so the driver can
            # still write its final state to Redis before stop() ends the server.
            self._proc = subprocess.Popen(
                [binary, str(conf)],
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._tmpdir,
                start_new_session=True,
            )

    def _wait_ready(self) -> None:
        assert self._proc is not None
        client = redis.Redis(
            host=_HOST,
            port=self._port or 0,
            password=self._password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self._startup_timeout
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                code = self._proc.poll()
                if code is not None:
                    raise RedisServerError(
                        f"redis-server exited with code {code} while starting on "
                        f"{self.address}; log tail:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError as err:
                    last_error = err
                time.sleep(0.02)
        finally:
            client.close()
        raise RedisServerError(
            f"redis-server on {self.address} did not answer PING within "
            f"{self._startup_timeout:g} s (last error: {last_error}); log tail:\n"
            f"{self._log_tail()}"
        )

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                logger.warning("redis-server pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=self._stop_timeout)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _log_tail(self, lines: int = 20) -> str:
        if self._tmpdir is None:
            return "(no log)"
        text: list[str] = []
        for name in ("stdout.log", "redis.log"):
            try:
                text += (self._tmpdir / name).read_text(errors="replace").splitlines()
            except OSError:
                continue
        return "\n".join(text[-lines:]) or "(log is empty)"


class SharedMemory:
    """The run's Redis connection and stores; a private server when no URL is configured.

    The private server's URL (with its password) goes into ``RUN_DIR/.redis.json``, mode
    0600, so ``shoal status RUN`` and ``shoal stop RUN`` reach it from another terminal.

    Args:
        cfg: the ``redis`` config section.
        run_id: namespaces every key (``shoal:{run_id}:...``).
        run_dir: where the connection file of a private server is written.
    """

    def __init__(self, cfg: RedisConfig, run_id: str, run_dir: Path) -> None:
        self.cfg, self.run_id, self.run_dir = cfg, run_id, run_dir
        self.server: RedisServer | None = None
        self.client: ResilientRedis | None = None
        self.url = cfg.url

    def __enter__(self) -> SharedMemory:
        if self.url is None:
            self.server = RedisServer().start()
            self.url = self.server.url
            conn = self.run_dir / CONN_FILE
            fd = os.open(conn, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"url": self.url, "run_id": self.run_id, "pid": os.getpid()}, fh)
        self.client = connect(self.url, outage_timeout=self.cfg.outage_timeout_s)
        self.state = RunState(self.client, self.run_id)
        self.weights = WeightStore(self.client, self.run_id)
        self.replay = ReplayStream(self.client, self.run_id, maxlen=self.cfg.replay_maxlen)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            (self.run_dir / CONN_FILE).unlink(missing_ok=True)
            self.server.stop()

    @property
    def address(self) -> str:
        """``host:port`` of the server (never the password)."""
        return self.client.address if self.client else "?"
