"""``shoal submit`` and ``shoal jobs list|status|logs|stop``: the command line of the Jobs client.

The client itself (:class:`~orchestrator.cli.jobs_client.ShoalJobs`) talks to a Ray cluster's
Jobs API.

Every failure is a one-line message on stderr and a non-zero exit code (2 for bad input or
an unknown job, 1 for an unreachable or refusing cluster); ``--follow`` exits with 0 only
when the job succeeds.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.jobs_client import (
    CONFIG_SUFFIXES,
    DEFAULT_ADDRESS,
    TERMINAL_STATUSES,
    WORKING_DIR_EXCLUDES,
    JobsError,
    ShoalJobs,
    make_submission_id,
    status_name,
)

__all__ = ["register_cli"]

_STATUS_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}
_out = Console(soft_wrap=True, highlight=False)
_err = Console(stderr=True, soft_wrap=True, highlight=False)


class _DropDefaultExcludeNotice(logging.Filter):
    """Ray warns that it now skips .git/.venv; shoal excludes them anyway, so it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "ignored by default when packaging" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ray_logs() -> Iterator[None]:
    # Ray logs INFO lines per .gitignore it packs and per websocket it closes; shoal says
    # what matters itself. Ray sets its log levels on import, so import it before overriding.
    import ray  # noqa: F401

    ray_logger = logging.getLogger("ray")
    working_dir_logger = logging.getLogger("ray._private.runtime_env.working_dir")
    notice_filter = _DropDefaultExcludeNotice()
    previous = ray_logger.level
    ray_logger.setLevel(logging.WARNING)
    working_dir_logger.addFilter(notice_filter)
    try:
        yield
    finally:
        ray_logger.setLevel(previous)
        working_dir_logger.removeFilter(notice_filter)


def _styled(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'default')}]{status}[/]"


def _config_target(target: str, working_dir: str) -> str:
    """Map a config file to its path inside the uploaded working dir; leave presets alone."""
    path = Path(target).expanduser()
    if path.suffix.lower() not in CONFIG_SUFFIXES and os.sep not in target:
        return target  # a preset name: `shoal run` resolves it on the cluster
    if not path.is_file():
        raise JobsError(f"config file {target} does not exist", exit_code=2)
    root = Path(working_dir).expanduser().resolve()
    try:
        relative = path.resolve().relative_to(root)
    except ValueError:
        raise JobsError(
            f"config file {target} is outside the working dir {working_dir}; the job sees "
            "only uploaded files, so move it there or pass --working-dir",
            exit_code=2,
        ) from None
    excluded = [
        p for p in WORKING_DIR_EXCLUDES if any(fnmatch.fnmatch(part, p) for part in relative.parts)
    ]
    if excluded:
        raise JobsError(
            f"config file {target} is under {excluded[0]!r}, which is not uploaded; "
            "copy it elsewhere in the working dir",
            exit_code=2,
        )
    return relative.as_posix()


def _print_outcome(jobs: ShoalJobs, job_id: str) -> str:
    details = jobs.info(job_id)
    status = status_name(details.status)
    message = f": {escape(details.message)}" if details.message else ""
    _out.print(f"{job_id} {_styled(status)}{message}")
    return status


def _follow(jobs: ShoalJobs, job_id: str) -> int:
    try:
        for chunk in jobs.tail_logs(job_id):
            _out.out(chunk, end="", highlight=False)
    except KeyboardInterrupt:
        _err.print(
            f"stopped following; {job_id} keeps running (`shoal jobs stop {job_id}` stops it)"
        )
        return 130
    # The stream closes when the job ends, but its status may lag the last log line.
    jobs.wait(job_id, timeout=30)
    return 0 if _print_outcome(jobs, job_id) == "SUCCEEDED" else 1


def _cmd_submit(args: argparse.Namespace) -> int:
    jobs = ShoalJobs(args.address)
    target = _config_target(args.target, args.working_dir)
    entrypoint, submission_id = None, args.submission_id
    overrides = list(args.overrides)
    if args.sweep:  # the sweep directory is named after the job, to be found in storage
        submission_id = submission_id or make_submission_id(f"sweep-{Path(target).stem}")
        entrypoint, spec = _sweep_entrypoint(args, target, submission_id)
        metadata = {RUN_KEY: submission_id, STORAGE_KEY: spec["storage"] or "",
                    RUN_DIR_KEY: str(Path(spec["run_dir"]) / submission_id)}  # fmt: skip
    elif args.samples is not None or args.max_concurrent is not None or args.asha:
        raise JobsError("--samples, --max-concurrent and --asha go with --sweep", exit_code=2)
    else:
        submission_id = submission_id or make_submission_id(target)
        overrides, metadata = _run_placement(target, overrides, submission_id)
    if not metadata[STORAGE_KEY] and not _loopback(jobs.dashboard_url()):
        _err.print(
            "[yellow]warning:[/] run.storage is not set: the job's run stays in Ray's "
            "temporary working dir on the node running its driver; add "
            "run.storage=s3://BUCKET/PREFIX (or a path every node mounts) to keep it"
        )
    jobs.connect()
    excludes = ", ".join(WORKING_DIR_EXCLUDES[:4])
    _out.print(f"uploading {escape(args.working_dir)} (without {excludes}, ...)")
    # The job's driver must join the cluster it runs on, not start a Ray of its own.
    job_id = jobs.submit(
        [target, *overrides, "--address", "auto"],
        entrypoint=entrypoint,
        working_dir=args.working_dir,
        submission_id=submission_id,
        metadata=metadata or None,
    )
    _out.print(f"submitted [bold]{job_id}[/]")
    _out.print(f"dashboard: {jobs.dashboard_url(job_id)}")
    if metadata.get(STORAGE_KEY):
        _out.print(f"results: {escape(_stored_run(metadata))} (`shoal jobs fetch {job_id}`)")
    if args.follow:
        return _follow(jobs, job_id)
    if args.no_wait:
        return 0
    # Waiting out PENDING surfaces runtime-env failures (bad pip spec, missing dir) now.
    started = jobs.wait(job_id, timeout=args.start_timeout, until={"RUNNING", *TERMINAL_STATUSES})
    _out.print(f"{job_id} {_styled(started)}; `shoal jobs logs {job_id} --follow` follows it")
    return 1 if started in ("FAILED", "STOPPED") else 0


RUN_KEY, STORAGE_KEY, RUN_DIR_KEY = "shoal_run", "shoal_storage", "shoal_run_dir"


def _run_placement(
    target: str, overrides: list[str], job_id: str
) -> tuple[list[str], dict[str, str]]:
    """The run's name (the job id unless ``run.name`` is set) and storage, as job metadata.

    The config is resolved here as the job will resolve it, so ``shoal jobs fetch`` knows
    where the run lands; an unusable ``run.storage`` is refused before anything is sent.
    """
    from orchestrator.config import ConfigError, load_config
    from orchestrator.runtime.storage import StorageError, check_storage

    try:
        cfg = load_config(target, overrides)
        if cfg.run.storage is not None:
            check_storage(cfg.run.storage)
    except (ConfigError, StorageError) as e:
        raise JobsError(str(e), exit_code=2) from None
    if cfg.run.name is None:
        overrides = [*overrides, f"run.name={job_id}"]
    name = cfg.run.name or job_id
    return overrides, {RUN_KEY: name, STORAGE_KEY: cfg.run.storage or "",
                       RUN_DIR_KEY: str(Path(cfg.run.dir) / name)}  # fmt: skip


def _loopback(url: str) -> bool:
    from urllib.parse import urlparse

    host = urlparse(url).hostname or ""
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def _stored_run(metadata: dict[str, str]) -> str:
    """Where a job's run is kept: ``<storage>/<run name>`` (a URI keeps its query last)."""
    from orchestrator.runtime.storage import join_uri

    return join_uri(metadata[STORAGE_KEY], metadata[RUN_KEY])


def _sweep_entrypoint(
    args: argparse.Namespace, target: str, name: str
) -> tuple[str, dict[str, Any]]:
    """``shoal sweep ... --address auto --name NAME`` and the checked sweep (its storage).

    The spaces (and the storage) are checked here before anything is sent; the sweep
    directory is named ``name`` (the job id) so that its place in storage is known.
    """
    from orchestrator.cli import sweep
    from orchestrator.config import ConfigError

    local = args.target if Path(args.target).is_file() else target
    try:
        source, yaml_spaces = sweep.read_sweep_section(local)
        overrides, spaces = sweep.split_args(args.overrides)
        spec = sweep.check(source, overrides, {**yaml_spaces, **spaces})
    except ConfigError as exc:
        raise JobsError(str(exc), exit_code=2) from None
    command = ["python", "-m", "orchestrator.cli", "sweep", target, *args.overrides]
    command += ["--name", name]
    command += ["--samples", str(args.samples or 4), "--metric", args.metric]
    if args.max_concurrent is not None:
        command += ["--max-concurrent", str(args.max_concurrent)]
    if args.asha:
        command.append("--asha")
    return shlex.join([*command, "--address", "auto"]), spec


def _format_time(millis: int | None) -> str:
    if not millis:
        return "-"
    return datetime.fromtimestamp(millis / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _format_duration(start: int | None, end: int | None) -> str:
    if not start:
        return "-"
    seconds = int(((end or time.time() * 1000) - start) / 1000)
    hours, rest = divmod(max(seconds, 0), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _cmd_list(args: argparse.Namespace) -> int:
    jobs = ShoalJobs(args.address)
    found = jobs.list()
    # Piped output has no width to respect; rich's default of 80 would squeeze the table.
    console = _out if _out.is_terminal else Console(width=1000, highlight=False)
    table = Table(title=f"jobs on {jobs.address}", title_justify="left", box=box.SIMPLE)
    id_width = max((len(job.submission_id or job.job_id or "-") for job in found), default=2)
    for column, width in (("id", id_width), ("status", 9), ("started", 19), ("duration", 8)):
        table.add_column(column, no_wrap=True, min_width=width)
    # Ids must stay whole to be copied, and rich squeezes every column when short of room,
    # so the entrypoint gets only what is left and is dropped when that is too little.
    room = console.width - id_width - 36 - 15
    if room >= 10:
        table.add_column("entrypoint", no_wrap=True, overflow="ellipsis", max_width=room)
    for job in found:
        row = [
            job.submission_id or job.job_id or "-",
            _styled(status_name(job.status)),
            _format_time(job.start_time),
            _format_duration(job.start_time, job.end_time),
            escape(job.entrypoint),
        ]
        table.add_row(*row[: len(table.columns)])
    console.print(table)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    jobs = ShoalJobs(args.address)
    _print_outcome(jobs, args.job_id)
    metadata = jobs.info(args.job_id).metadata or {}
    if metadata.get(STORAGE_KEY):
        _out.print(f"results: {escape(_stored_run(metadata))}")
    elif metadata.get(RUN_DIR_KEY):
        _out.print(
            f"results: {escape(metadata[RUN_DIR_KEY])} on the driver's node, while the cluster "
            f"keeps it (`shoal jobs fetch {args.job_id}`)"
        )
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    """Copy a job's run from its ``run.storage`` to this machine."""
    from orchestrator.runtime.storage import StorageError, fetch_run

    jobs = ShoalJobs(args.address)
    metadata = jobs.info(args.job_id).metadata or {}
    if not metadata.get(RUN_KEY):
        raise JobsError(f"{args.job_id} was not submitted by `shoal submit`", exit_code=2)
    dest = Path(args.dest) if args.dest else Path("runs") / metadata[RUN_KEY]
    if metadata.get(STORAGE_KEY):
        source = _stored_run(metadata)
        try:
            fetch_run(source, dest)
        except (StorageError, FileNotFoundError) as e:
            raise JobsError(f"{e} (job {args.job_id})", exit_code=2) from None
    elif metadata.get(RUN_DIR_KEY):  # no storage: from the driver node's working dir
        from orchestrator.cli.jobs_fetch import fetch_from_driver

        source = f"{args.job_id}'s driver node"
        _out.print(f"copying from {escape(source)} (the newest checkpoint and every other file)")
        fetch_from_driver(jobs, args.job_id, metadata[RUN_DIR_KEY], dest)
    else:
        raise JobsError(f"{args.job_id} has no run directory on record (an older job)", exit_code=2)
    _out.print(f"fetched {escape(source)} -> {escape(str(dest))}")
    if (dest / "sweep.json").is_file():  # a sweep: its trials' runs are under trials/
        best = dest / "best.yaml"
        if best.is_file():
            _out.print(f"next: shoal run {escape(str(best))}  (the best trial's config)")
        _out.print(f"trials: shoal eval {escape(str(dest / 'trials'))}/TRIAL")
    else:
        _out.print(f"next: shoal eval {escape(str(dest))}")
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    jobs = ShoalJobs(args.address)
    if args.follow:
        return _follow(jobs, args.job_id)
    _out.out(jobs.logs(args.job_id), end="", highlight=False)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    jobs = ShoalJobs(args.address)
    if jobs.stop(args.job_id):
        _out.print(f"stop requested for {args.job_id}")
    else:
        _out.print(f"{args.job_id} had already ended ({_styled(jobs.status(args.job_id))})")
    return 0


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="Ray dashboard URL (default: $RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, "
        f"else {DEFAULT_ADDRESS}); the auth token comes from $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token",
    )


_Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: _Handler) -> _Handler:
    def run(args: argparse.Namespace) -> int:
        try:
            with _quiet_ray_logs():
                return int(handler(args))
        except JobsError as exc:
            _err.print(f"[red]error:[/] {escape(str(exc))}")
            return exc.exit_code

    run.__doc__ = handler.__doc__
    return run


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``submit`` and ``jobs {list,status,logs,stop}`` to a ``shoal`` argument parser.

    Each subcommand sets ``func``, a handler that takes the parsed namespace and returns
    the process exit code.

    Args:
        subparsers: The result of ``parser.add_subparsers()`` on the ``shoal`` parser.
    """
    submit = subparsers.add_parser(
        "submit",
        help="run a preset or config file as a Ray job",
        description="Upload the working dir and run `shoal run PRESET|FILE [overrides...]` "
        "(or, with --sweep, `shoal sweep`) as a Ray job. Waits until the job leaves "
        "PENDING unless --no-wait or --follow.",
    )
    submit.add_argument("target", metavar="PRESET|FILE", help="preset name or config file")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    _add_address(submit)
    submit.add_argument("--working-dir", default=".", help="directory to upload (default: .)")
    submit.add_argument("--submission-id", default=None, help="job id (default: generated)")
    submit.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for the job to leave PENDING (default: 600)",
    )
    search = submit.add_argument_group("sweeps", "run `shoal sweep` as the job instead")
    search.add_argument(
        "--sweep",
        action="store_true",
        help="the job is `shoal sweep PRESET|FILE KEY=SPACE ...` on the cluster's nodes",
    )
    search.add_argument("--samples", type=int, help="configs sampled (default 4)")
    search.add_argument("--max-concurrent", type=int, help="trials at once (default: free CPUs)")
    search.add_argument(
        "--metric", choices=["episode_return", "eval_return"], default="episode_return"
    )
    search.add_argument("--asha", action="store_true", help="stop trials that fall behind")
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    mode.add_argument("--no-wait", action="store_true", help="return right after submitting")
    submit.set_defaults(func=_guarded(_cmd_submit))

    jobs = subparsers.add_parser("jobs", help="list, inspect and stop Ray jobs")
    actions = jobs.add_subparsers(dest="jobs_command", metavar="{list,status,logs,stop,fetch}")
    actions.required = True
    commands = {
        "list": (_cmd_list, "table of the cluster's jobs"),
        "status": (_cmd_status, "status and message of one job"),
        "logs": (_cmd_logs, "print a job's logs"),
        "stop": (_cmd_stop, "stop a running job"),
        "fetch": (
            _cmd_fetch,
            "copy a job's run here: from its run.storage, or else from its driver node "
            "while the cluster keeps it",
        ),
    }
    for name, (handler, summary) in commands.items():
        action = actions.add_parser(name, help=summary)
        if name != "list":
            action.add_argument("job_id", metavar="ID")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until it ends")
        if name == "fetch":
            action.add_argument("dest", nargs="?", metavar="DEST",
                                help="where the run goes (default: runs/<run name>)")  # fmt: skip
        _add_address(action)
        action.set_defaults(func=_guarded(handler))
