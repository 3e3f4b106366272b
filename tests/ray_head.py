"""A private Ray head on loopback for tests: own temp dir, free ports, torn down by PID.

Every process the head starts inherits a marker environment variable, which is how teardown
finds (and then proves gone) exactly those processes, including job drivers that Ray moves to
their own session. Never `ray stop`: it would kill every Ray process on the host.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

MARKER = "SHOAL_TEST_RAY_HEAD"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Head:
    address: str
    token: str | None
    temp_dir: str
    marker: str
    metrics_port: int = 0
    session: int = -1  # session id of `ray start`, which every daemon it spawns inherits


def _head_pids(head: Head) -> list[int]:
    """Live processes of the head: its session, its marker or temp dir, and their children.

    No single sign is enough: agents rewrite their argv and environ with setproctitle, and
    job drivers start a session of their own, but each is a child of one the others catch.
    """
    marker, temp_dir = head.marker.encode(), head.temp_dir.encode()
    parents, ours = {}, set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):  # exited meanwhile, or not ours to read
            continue
        if stat[0] == "Z":  # already dead, only waiting to be reaped
            continue
        pid = int(entry.name)
        parents[pid] = int(stat[1])
        if int(stat[3]) == head.session or marker in environ or temp_dir in cmdline:
            ours.add(pid)
    while children := {pid for pid, ppid in parents.items() if ppid in ours} - ours:
        ours |= children
    return sorted(ours)


def _stop_head(head: Head) -> None:
    # Never `ray stop`: it kills every Ray process on the host, not just this head's.
    # gcs_server can sit on SIGTERM for many seconds; a test head owes nothing to disk.
    known: set[int] = set()
    for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + grace
        # Rescan while signalling: a parent's death hands its children to init.
        while (alive := set(_head_pids(head))) and time.monotonic() < deadline:
            for pid in alive - known if sig == signal.SIGTERM else alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            known |= alive
            time.sleep(0.2)
    leftover = _head_pids(head)
    shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert not leftover, f"processes of the test Ray head survived teardown: {leftover}"


@contextlib.contextmanager
def ray_head(
    *, auth: bool, num_cpus: int = 1, extra_env: dict[str, str] | None = None
) -> Iterator[Head]:
    """Start a loopback head (token auth on or off) and stop it, by PID, on exit."""
    temp_dir = tempfile.mkdtemp(prefix="shoal-ray-")
    dashboard_port = free_port()
    token = secrets.token_hex(16) if auth else None
    marker_value = uuid.uuid4().hex
    head = Head(f"http://127.0.0.1:{dashboard_port}", token, temp_dir, f"{MARKER}={marker_value}")
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token" if auth else "disabled", RAY_USAGE_STATS_ENABLED="0")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    env[MARKER] = marker_value
    env.update(extra_env or {})
    # Job entrypoints run `python` from PATH: make it this interpreter, as an active venv would.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    try:
        for attempt in range(3):
            # Every listening port is explicit so this head never collides with another on
            # the host; dashboard_port is the first attempt's.
            dashboard_port = dashboard_port if attempt == 0 else free_port()
            head.address = f"http://127.0.0.1:{dashboard_port}"
            ports = {
                "--port": free_port(),
                "--dashboard-port": dashboard_port,
                "--ray-client-server-port": free_port(),
                "--dashboard-agent-listen-port": free_port(),
                "--dashboard-agent-grpc-port": free_port(),
                "--runtime-env-agent-port": free_port(),
                "--metrics-export-port": free_port(),
                "--node-manager-port": free_port(),
                "--object-manager-port": free_port(),
            }
            command = [
                sys.executable, "-m", "ray.scripts.scripts", "start", "--head",
                "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--include-dashboard=true",
                "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items()),
            ]  # fmt: skip
            head.metrics_port = ports["--metrics-export-port"]
            starter = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            head.session = starter.pid
            _, stderr = starter.communicate(timeout=120)
            # A port picked free may be taken by another process before Ray binds it (the
            # GCS then fails to start): start again on fresh ports.
            if starter.returncode == 0 or "Failed to start GCS" not in stderr or attempt == 2:
                break
            _stop_head(head)
            os.makedirs(temp_dir, exist_ok=True)
        assert starter.returncode == 0, f"ray start failed:\n{stderr[-3000:]}"
        headers = {"authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + 60.0
        while True:
            # The Jobs module loads after the dashboard itself answers.
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{head.address}/api/jobs/", headers=headers, timeout=2).ok:
                    break
            assert time.monotonic() < deadline, "Ray dashboard did not answer within 60 s"
            time.sleep(0.5)
        yield head
    finally:
        _stop_head(head)
