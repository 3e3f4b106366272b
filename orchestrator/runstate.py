"""A run's Redis: start or join it, mirror run state into it, and ``shoal status`` / ``stop``.

A run with no ``redis.url`` starts a private ``redis-server`` on a free loopback port with a
generated password and records how to reach it in ``RUN_DIR/.redis.json`` (mode 0600), so
``shoal status RUN`` and ``shoal stop RUN`` work from another terminal, ``RUN`` being the run
directory or the run id ``shoal status`` lists (``runs/<id>``, see ``--runs-dir``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.table import Table

from agents.memory import (
    ReplayStream,
    ResilientRedis,
    RunState,
    WeightStore,
    connect,
    list_runs,
)
from orchestrator.config import RedisConfig, find_run
from orchestrator.services import RedisServer

log = logging.getLogger(__name__)
CONN_FILE = ".redis.json"
SUMMARY_FILE = "summary.json"


class SharedMemory:
    """The run's Redis connection and stores; a private server when no URL is configured.

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


class RunStateSink:
    """Mirrors each metrics row into Redis with a driver heartbeat."""

    def __init__(self, state: RunState, actor: str = "driver") -> None:
        self.state, self.actor = state, actor

    def log(self, row: dict[str, float]) -> None:
        """Publish the latest metrics."""
        self.state.set_metrics(row)
        self.state.heartbeat(self.actor)

    def close(self) -> None:
        """Nothing to release."""


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """``RUN_DIR/summary.json``: what ``shoal status`` shows after the run's Redis is gone."""
    keep = {k: v for k, v in summary.items() if k != "checkpoints"}
    (run_dir / SUMMARY_FILE).write_text(json.dumps(keep, indent=2, default=str))


# -- CLI -------------------------------------------------------------------------------------


def _connect_for(target: str | None, redis_url: str | None) -> tuple[Any, str | None]:
    """Find the Redis that holds ``target`` (a run dir or run id)."""
    if target and (Path(target) / CONN_FILE).is_file():
        info = json.loads((Path(target) / CONN_FILE).read_text())
        return connect(info["url"], outage_timeout=3.0), info["run_id"]
    url = redis_url or os.environ.get("SHOAL_REDIS_URL")
    if url:
        run_id = Path(target).name if target else None
        return connect(url, outage_timeout=3.0), run_id
    return None, Path(target).name if target else None


def _local_runs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if (p / CONN_FILE).is_file() or (p / SUMMARY_FILE).is_file()
    )


def _row(state: dict[str, Any]) -> list[str]:
    m = state.get("metrics") or {}
    beats = state.get("heartbeats") or {}
    age = f"{time.time() - max(beats.values()):.0f}s ago" if beats else "-"
    ret = m.get("episode_return")
    return [
        state["run_id"],
        str(state.get("status")) + (" (stop requested)" if state.get("stop_requested") else ""),
        f"{int(m.get('env_steps', 0)):,}",
        f"{m.get('env_steps_per_s', 0):,.0f}",
        f"{ret:.2f}" if isinstance(ret, (int, float)) else "-",
        age,
    ]


def cmd_status(args: argparse.Namespace) -> int:
    """Show runs and their progress."""
    console = Console(soft_wrap=True)
    table = Table("run", "status", "env steps", "steps/s", "return", "heartbeat")
    args.run = args.run and find_run(args.run, args.runs_dir)
    client, run_id = _connect_for(args.run, args.redis_url)
    try:
        if client is not None:
            ids = [run_id] if run_id else list_runs(client)
            for rid in ids:
                try:
                    table.add_row(*_row(RunState(client, rid).get()))
                except LookupError:
                    console.print(f"[red]no run '{rid}' in Redis at {client.address}[/]")
                    return 1
        else:
            dirs = [Path(args.run)] if args.run else _local_runs(Path(args.runs_dir))
            for d in dirs:
                if (d / CONN_FILE).is_file():
                    c, local_id = _connect_for(str(d), None)
                    try:
                        table.add_row(*_row(RunState(c, local_id or d.name).get()))
                    except Exception as e:  # noqa: BLE001 - a dead run must not hide the others
                        table.add_row(
                            d.name, f"unreachable ({type(e).__name__})", "-", "-", "-", "-"
                        )
                    finally:
                        c.close()
                elif (d / SUMMARY_FILE).is_file():
                    s = json.loads((d / SUMMARY_FILE).read_text())
                    m = s.get("metrics") or {}
                    ret = m.get("episode_return")
                    table.add_row(
                        d.name,
                        f"finished: {s.get('reason')}",
                        f"{int(s['counters']['env_steps']):,}",
                        "-",
                        f"{ret:.2f}" if isinstance(ret, (int, float)) else "-",
                        "-",
                    )
                else:
                    console.print(
                        f"[red]no run '{args.run}':[/] neither a run directory nor a run id "
                        f"under '{args.runs_dir}' (`shoal status` lists the runs there)",
                        highlight=False,
                    )
                    return 2
    finally:
        if client is not None:
            client.close()
    if not table.rows:
        console.print(
            f"no runs found under '{args.runs_dir}' (set SHOAL_REDIS_URL or --redis-url for a "
            "shared Redis)"
        )
        return 0
    # Off a terminal (a pipe, a log) the table takes the width it needs instead of 80 columns.
    (console if console.is_terminal else Console(width=1000)).print(table)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Ask a run to checkpoint and exit."""
    console = Console(soft_wrap=True)
    target = find_run(args.run, args.runs_dir)
    client, run_id = _connect_for(target, args.redis_url)
    summary = Path(target) / SUMMARY_FILE
    if client is None and summary.is_file():
        reason = json.loads(summary.read_text()).get("reason")
        console.print(f"run '{Path(target).name}' has already finished ({reason})")
        return 1
    if client is None or run_id is None:
        console.print(
            f"[red]cannot find the Redis of run '{args.run}':[/] give its run directory or set "
            "SHOAL_REDIS_URL / --redis-url"
        )
        return 2
    try:
        state = RunState(client, run_id)
        state.get()
        state.request_stop()
    except LookupError:
        console.print(f"[red]no run '{run_id}' in Redis at {client.address}[/]")
        return 1
    finally:
        client.close()
    console.print(f"asked run '{run_id}' to checkpoint and stop")
    return 0


def register_cli(sub: Any) -> None:
    """Add ``status`` and ``stop`` to the ``shoal`` parser."""
    st = sub.add_parser("status", help="show runs and their progress (from Redis)")
    st.add_argument("run", nargs="?", help="run directory or run id (default: all runs)")
    st.add_argument("--redis-url", help="shared Redis (default: $SHOAL_REDIS_URL)")
    st.add_argument("--runs-dir", default="runs", help="where local runs live (default: runs)")
    st.set_defaults(func=cmd_status)
    sp = sub.add_parser("stop", help="ask a run to checkpoint and exit cleanly")
    sp.add_argument("run", help="run directory or run id")
    sp.add_argument("--redis-url", help="shared Redis (default: $SHOAL_REDIS_URL)")
    sp.add_argument("--runs-dir", default="runs", help="where local runs live (default: runs)")
    sp.set_defaults(func=cmd_stop)
