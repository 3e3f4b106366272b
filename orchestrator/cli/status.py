"""``shoal status`` and ``shoal stop``: a run's state read from its Redis, a stop request written.

A run's private ``redis-server`` is found through ``RUN_DIR/.redis.json``; a shared one through
``--redis-url`` or ``SHOAL_REDIS_URL``. ``RUN`` is the run directory or the run id ``shoal
status`` lists (``runs/<id>``, see ``--runs-dir``). A finished run is read from its
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator.runtime.rundir import CONN_FILE, SUMMARY_FILE, find_run


def connect_for(target: str | None, redis_url: str | None) -> tuple[Any, str | None]:
    """Find the Redis that holds ``target`` (a run dir or run id)."""
    from agents.memory import connect

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
    from agents.memory import RunState, list_runs

    console = Console(soft_wrap=True)
    table = Table("run", "status", "env steps", "steps/s", "return", "heartbeat")
    args.run = args.run and find_run(args.run, args.runs_dir)
    client, run_id = connect_for(args.run, args.redis_url)
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
                    c, local_id = connect_for(str(d), None)
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
    from agents.memory import RunState

    console = Console(soft_wrap=True)
    target = find_run(args.run, args.runs_dir)
    client, run_id = connect_for(target, args.redis_url)
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
