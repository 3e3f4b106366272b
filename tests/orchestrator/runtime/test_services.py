"""The private redis-server: loopback only, password protected, no disk, always stopped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.runtime import services
from orchestrator.runtime.services import RedisServer, RedisServerError

pytestmark = pytest.mark.redis

REPO = Path(__file__).resolve().parents[3]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    # A zombie no longer runs; it only waits for its parent to reap it.
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.02)
    return False


def refuses(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


def non_loopback_ipv4() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 1))  # UDP connect sends nothing; it picks a route
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_server_is_private_to_loopback_with_password_and_no_persistence() -> None:
    with RedisServer() as server, RedisServer() as other:
        assert server.address == f"127.0.0.1:{server.port}"
        assert server.password not in server.address
        assert server.url == f"redis://:{server.password}@127.0.0.1:{server.port}/0"
        assert len(server.password) >= 32 and server.password != other.password
        assert server.port != other.port
        client = redis.Redis.from_url(server.url)
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"
        assert config["protected-mode"] == "yes"
        assert config["save"] == "" and config["appendonly"] == "no"
        assert client.info("server")["process_id"] == server.pid
        for password in (None, "wrong"):
            stranger = redis.Redis(port=server.port, password=password, retry=Retry(NoBackoff(), 0))
            with pytest.raises(redis.AuthenticationError):
                stranger.ping()
        address = non_loopback_ipv4()
        if address is not None:
            assert refuses(server.port, address)
        client.close()


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs /proc")
def test_password_stays_off_the_command_line() -> None:
    with RedisServer() as server:
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert server.password.encode() not in cmdline


def minor_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_server_reuses_freed_memory_for_large_values(monkeypatch) -> None:
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    value = bytes(16 << 20)
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        assert server.pid is not None
        for i in range(3):  # warm up: the server's memory grows to its working size
            client.set(f"w{i}", value)
            client.delete(f"w{i - 1}")
        before = minor_faults(server.pid)
        for i in range(3, 8):  # as a publisher does: a new version in, the old one out
            client.set(f"w{i}", value)
            client.delete(f"w{i - 1}")
        pages = len(value) // 4096
        assert minor_faults(server.pid) - before < pages  # not 5 x 4096 pages faulted in
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")
    assert services._server_env()["MALLOC_CONF"] == "narenas:1"  # the caller's wins


def test_stop_ends_the_process_frees_the_port_and_removes_the_directory() -> None:
    server = RedisServer().start()
    pid, port = server.pid, server.port
    assert pid is not None and port is not None
    workdir = Path(redis.Redis.from_url(server.url).config_get("dir")["dir"])
    assert workdir.is_dir()
    server.stop()
    assert server.pid is None and not alive(pid)
    assert refuses(port) and not workdir.exists()
    server.stop()  # idempotent


def test_restart_keeps_port_and_password_and_loses_data() -> None:
    with RedisServer() as server:
        url, first_pid = server.url, server.pid
        redis.Redis.from_url(url).set("k", "v")
        server.restart()
        assert server.url == url and server.pid != first_pid
        assert first_pid is not None and not alive(first_pid)
        assert redis.Redis.from_url(url).get("k") is None


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_with_block_stops_server_on_error(error: type[BaseException]) -> None:
    pid = None
    with pytest.raises(error), RedisServer() as server:
        pid = server.pid
        raise error("boom")
    assert pid is not None and not alive(pid)


def test_missing_binary_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        RedisServer().start()


def test_startup_failure_reports_the_log_tail() -> None:
    server = RedisServer(config={"maxmemory": "not-a-size"})
    with pytest.raises(RedisServerError, match="maxmemory") as excinfo:
        server.start()
    assert server.password not in str(excinfo.value)
    assert server.pid is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"config": {"bind": "0.0.0.0"}},
        {"config": {"Protected-Mode": "no"}},
        {"config": {"maxmemory": "1mb\nbind 0.0.0.0"}},
        {"password": 'has"quote'},
        {"password": "has space"},
        {"password": ""},
    ],
)
def test_unsafe_settings_are_rejected(kwargs) -> None:
    with pytest.raises(ValueError):
        RedisServer(**kwargs)


def _child(tmp_path: Path, body: str) -> tuple[subprocess.Popen[bytes], int]:
    """Runs `body` in a fresh interpreter; it writes the server's pid to a file we poll."""
    pid_file = tmp_path / "pid"
    script = "\n".join(
        [
            "import time",
            "from pathlib import Path",
            "from orchestrator.runtime.services import RedisServer",
            f"pid_file = Path({str(pid_file)!r})",
            textwrap.dedent(body),
        ]
    )
    child = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text().endswith("\n"):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            child.wait(timeout=10)
            pytest.fail("child never reported the redis-server pid")
        time.sleep(0.02)
    return child, int(pid_file.read_text())


def test_server_left_running_is_stopped_at_interpreter_exit(tmp_path) -> None:
    child, pid = _child(
        tmp_path,
        """
        server = RedisServer().start()
        pid_file.write_text(f"{server.pid}\\n")
        """,
    )
    try:
        assert child.wait(timeout=20) == 0
        assert wait_dead(pid)
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_inside_with_block_stops_server(tmp_path) -> None:
    child, pid = _child(
        tmp_path,
        """
        with RedisServer() as server:
            pid_file.write_text(f"{server.pid}\\n")
            time.sleep(30)
        """,
    )
    try:
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=20) != 0  # died of KeyboardInterrupt
        assert wait_dead(pid)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=10)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
