"""Submit shoal runs to a Ray cluster and follow them through Ray's Jobs API.

:class:`ShoalJobs` wraps :class:`ray.job_submission.JobSubmissionClient`: it packages the
working directory, builds a ``python -m orchestrator.cli run ...`` entrypoint with a readable
submission id, and turns every failure into a one-line :class:`JobsError` that says what to do
(start a cluster, set the token, list the ids).

Ray 2.60 protects the dashboard with a bearer token when the cluster runs in token mode. The
SDK attaches that token only when the *client* process has ``RAY_AUTH_MODE=token``, which a
laptop submitting to a cluster rarely sets, so even an exported ``RAY_AUTH_TOKEN`` is not sent.
:func:`resolve_auth_headers` finds the token the way Ray's own loader does and shoal always
sends it; a cluster without auth ignores the header.

Example:
    >>> jobs = ShoalJobs("http://127.0.0.1:8265")  # doctest: +SKIP
    >>> job_id = jobs.submit(["spread-gnn", "train.lr=3e-4"], working_dir=".")  # doctest: +SKIP
    >>> jobs.wait(job_id, timeout=3600)  # doctest: +SKIP
    'SUCCEEDED'
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import contextlib
import fnmatch
import logging
import os
import re
import secrets
import shlex
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import requests
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

__all__ = [
    "DEFAULT_ADDRESS", "TERMINAL_STATUSES", "WORKING_DIR_EXCLUDES", "JobsError", "ShoalJobs",
    "build_entrypoint", "default_address", "main", "make_submission_id", "register_cli",
    "resolve_auth_headers"
]  # fmt: skip

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Virtualenvs, run outputs and caches can be gigabytes; the job needs none of them.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv", "venv", "runs", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", "*.egg-info"
)  # fmt: skip
# `python -m` rather than the `shoal` script: with a working_dir the package is importable
# from the job's cwd even when the cluster image has only the dependencies installed.
_ENTRYPOINT_PREFIX = ("python", "-m", "orchestrator.cli", "run")
_CONFIG_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
_STATUS_STYLE = {"SUCCEEDED": "green", "FAILED": "red", "STOPPED": "yellow", "RUNNING": "cyan"}

_out = Console(soft_wrap=True, highlight=False)
_err = Console(stderr=True, soft_wrap=True, highlight=False)


class JobsError(RuntimeError):
    """A Jobs API call failed; the message is one line that says how to fix it.

    Args:
        message: What went wrong and what to do about it.
        exit_code: 2 for wrong usage (bad address, unknown id), 1 for a runtime failure.
    """

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def default_address() -> str:
    """The dashboard address from the environment, else :data:`DEFAULT_ADDRESS`.

    ``RAY_ADDRESS`` counts only when it is an ``http(s)://`` URL: it usually holds the GCS
    address (``host:6379``) for ``ray.init``, which the Jobs API does not speak.
    """
    api = os.environ.get("RAY_API_SERVER_ADDRESS", "").strip()
    if api:
        return api
    ray_address = os.environ.get("RAY_ADDRESS", "").strip()
    if ray_address.lower().startswith(("http://", "https://")):
        return ray_address
    return DEFAULT_ADDRESS


def _normalize_address(address: str) -> str:
    url = address.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise JobsError(
            f"{address!r} is not a Ray dashboard URL; pass --address http://HOST:8265 "
            "(the dashboard port, not the GCS or ray:// client port)",
            exit_code=2,
        )
    return url


def _read_token_file(path: Path, source: str) -> str:
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise JobsError(f"cannot read the Ray auth token from {source}: {exc.strerror}") from exc
    if not token:
        raise JobsError(f"the Ray auth token file from {source} is empty")
    return token


def _find_token(token: str | None = None) -> tuple[str | None, str]:
    """Return ``(token, where it came from)`` in the order Ray's C++ loader uses."""
    if token:
        return token.strip(), "the token argument"
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    env_token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_token:
        return env_token, "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if token_path:
        # Ray does not fall back to the default file when this is set, so a typo in the
        # path fails loudly here too instead of silently sending a stale default token.
        source = f"RAY_AUTH_TOKEN_PATH={token_path}"
        return _read_token_file(Path(token_path).expanduser(), source), source
    default_file = Path.home() / ".ray" / "auth_token"
    if default_file.is_file():
        return _read_token_file(default_file, "~/.ray/auth_token"), "~/.ray/auth_token"
    return None, "no token found"


def resolve_auth_headers(token: str | None = None) -> dict[str, str]:
    """HTTP headers that authenticate to a Ray dashboard running in token mode.

    The token comes from, in order: the ``token`` argument, ``RAY_AUTH_TOKEN``, the file
    named by ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token`` (where ``ray
    get-auth-token --generate`` and a local ``ray.init()`` write it). Surrounding whitespace
    is stripped, as Ray does. ``RAY_AUTH_MODE=disabled`` turns the lookup off.

    Args:
        token: An explicit token that overrides every other source.

    Returns:
        ``{"authorization": "Bearer <token>"}``, or ``{}`` when there is no token.

    Raises:
        JobsError: If ``RAY_AUTH_TOKEN_PATH`` names a file that is missing or empty.
    """
    found, _ = _find_token(token)
    return {"authorization": f"Bearer {found}"} if found else {}


def make_submission_id(preset: str, now: datetime | None = None) -> str:
    """A readable, unique submission id: ``shoal-<preset>-<YYYYmmdd-HHMMSS>-<4 hex>``.

    Args:
        preset: Preset name or config path; only its lowercase alphanumeric stem is kept.
        now: Timestamp to embed (local time); defaults to now.
    """
    path = Path(preset)
    name = path.stem if path.suffix.lower() in _CONFIG_SUFFIXES else path.name
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return f"shoal-{slug}-{stamp}-{secrets.token_hex(2)}"


def build_entrypoint(run_args: Sequence[str]) -> str:
    """The shell command a job runs: ``python -m orchestrator.cli run <quoted args>``."""
    return shlex.join([*_ENTRYPOINT_PREFIX, *run_args])


def _one_line(text: str) -> str:
    """The last meaningful line of a server error, which for Ray's tracebacks is the cause."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip(" .")]
    return (lines[-1] if lines else str(text).strip()).rstrip(".")


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def _connection_reason(exc: BaseException) -> str:
    if isinstance(exc, requests.Timeout):
        return "no answer in time"
    # requests buries the cause in "... Max retries exceeded ... [Errno 111] Connection refused".
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return match.group(1).strip() if match else _one_line(str(exc))


class ShoalJobs:
    """Client for the Jobs API of one Ray cluster.

    Connects lazily: constructing it touches no network, the first call checks that the
    dashboard answers (within ``connect_timeout``) and accepts the auth token.

    Args:
        address: Dashboard URL, e.g. ``http://127.0.0.1:8265``; ``None`` reads
            ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` (see :func:`default_address`).
        token: Auth token; ``None`` finds one like Ray does (see :func:`resolve_auth_headers`).
        connect_timeout: Seconds to wait for the dashboard to answer the first request.

    Raises:
        JobsError: If the address is not an http(s) URL.
    """

    def __init__(
        self, address: str | None = None, *, token: str | None = None, connect_timeout: float = 5.0
    ) -> None:
        self.address = _normalize_address(address or default_address())
        self._token, self._token_source = _find_token(token)
        self._headers = {"authorization": f"Bearer {self._token}"} if self._token else {}
        self._connect_timeout = connect_timeout
        self._sdk: JobSubmissionClient | None = None

    def dashboard_url(self, job_id: str | None = None) -> str:
        """The dashboard's URL, or the page of one job when ``job_id`` is given."""
        return f"{self.address}/#/jobs/{job_id}" if job_id else self.address

    # -- errors ---------------------------------------------------------------------------

    def _unreachable(self, reason: str) -> JobsError:
        return JobsError(
            f"cannot reach Ray dashboard at {self.address}: {reason}; is the cluster running? "
            "start one with `ray start --head`"
        )

    def _auth_error(self, status: int) -> JobsError:
        fix = (
            "set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token "
            "(`ray get-auth-token` on the head node prints it)"
        )
        if status == 401 or not self._token:
            return JobsError(
                f"Ray at {self.address} requires an auth token and shoal sent none "
                f"({self._token_source}); {fix}"
            )
        return JobsError(
            f"Ray rejected the auth token from {self._token_source} at {self.address}; {fix}"
        )

    def _unknown_job(self, job_id: str) -> JobsError:
        return JobsError(
            f"no job {job_id!r} on {self.address}; `shoal jobs list` shows existing ids",
            exit_code=2,
        )

    @contextlib.contextmanager
    def _translate(self, action: str, job_id: str | None = None) -> Iterator[None]:
        """Turn the SDK's mix of exceptions into one-line :class:`JobsError`s."""
        import aiohttp
        from ray.exceptions import AuthenticationError

        try:
            yield
        except JobsError:
            raise
        except AuthenticationError as exc:
            raise self._auth_error(401 if "required" in str(exc).lower() else 403) from exc
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise self._auth_error(exc.status) from exc
            if exc.status == 404 and job_id is not None:
                raise self._unknown_job(job_id) from exc
            raise JobsError(f"could not {action}: HTTP {exc.status} {exc.message}") from exc
        except (requests.ConnectionError, requests.Timeout, aiohttp.ClientConnectionError) as exc:
            raise self._unreachable(_connection_reason(exc)) from exc
        except ConnectionError as exc:
            raise self._unreachable(_one_line(str(exc))) from exc
        except (RuntimeError, ValueError) as exc:
            text = str(exc)
            if job_id is not None and "status code 404" in text:
                raise self._unknown_job(job_id) from exc
            if job_id is not None and "already exists" in text:
                raise JobsError(
                    f"a job with id {job_id!r} already exists on {self.address}; "
                    "choose another --submission-id",
                    exit_code=2,
                ) from exc
            raise JobsError(f"could not {action} on {self.address}: {_one_line(text)}") from exc

    # -- connection -----------------------------------------------------------------------

    def connect(self) -> None:
        """Check now that the dashboard answers and accepts the token (calls do it lazily).

        Raises:
            JobsError: If the dashboard cannot be reached or rejects the token.
        """
        self._client  # noqa: B018

    @property
    def _client(self) -> JobSubmissionClient:
        if self._sdk is None:
            self._sdk = self._connect()
        return self._sdk

    def _connect(self) -> JobSubmissionClient:
        # The SDK's own connection check has no timeout: a firewalled host would hang it.
        try:
            response = requests.get(
                f"{self.address}/api/version",
                headers=self._headers,
                timeout=self._connect_timeout,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise self._unreachable(_connection_reason(exc)) from exc
        if response.status_code in (401, 403):
            raise self._auth_error(response.status_code)
        try:
            payload = response.json()
        except ValueError:
            payload = None
        version = payload.get("ray_version") if isinstance(payload, dict) else None
        if response.status_code != 200 or not version:
            raise JobsError(
                f"{self.address} answered HTTP {response.status_code} without a Ray version; "
                "is it the Ray dashboard (usually port 8265)?"
            )
        from ray.job_submission import JobSubmissionClient

        with self._translate("connect"):
            # The SDK adds its own header when RAY_AUTH_MODE=token, but never overrides ours.
            return JobSubmissionClient(self.address, headers=dict(self._headers))

    # -- jobs -----------------------------------------------------------------------------

    def submit(
        self,
        run_args: Sequence[str] = (),
        *,
        entrypoint: str | None = None,
        working_dir: str | os.PathLike[str] | None = None,
        submission_id: str | None = None,
        runtime_env: Mapping[str, Any] | None = None,
        entrypoint_num_cpus: float = 0,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Submit ``shoal run <run_args>`` as a job and return its submission id.

        Args:
            run_args: Arguments after ``shoal run``: a preset name or config path, then
                ``key=value`` overrides.
            entrypoint: A raw shell command that replaces the ``shoal run`` entrypoint.
            working_dir: Local directory uploaded as the job's cwd, minus
                :data:`WORKING_DIR_EXCLUDES` and whatever its ``.gitignore`` lists.
            submission_id: Job id; defaults to :func:`make_submission_id` of the preset.
            runtime_env: Extra Ray runtime_env keys (``env_vars``, ``pip``, ...); its
                ``excludes`` are added to shoal's.
            entrypoint_num_cpus: CPUs reserved for the driver. 0 because the driver mostly
                waits on Ray actors that reserve their own; reserving one would deadlock a
                one-CPU cluster.
            metadata: String key/values shown with the job.

        Returns:
            The submission id.

        Raises:
            JobsError: If there is nothing to run, the working dir is missing, the id is
                taken, or the cluster cannot be reached or rejects the token.
        """
        if entrypoint is None:
            if not run_args:
                raise JobsError("nothing to run: give a preset or config file", exit_code=2)
            entrypoint = build_entrypoint(run_args)
        if submission_id is None:
            submission_id = make_submission_id(run_args[0] if run_args else "job")
        env = dict(runtime_env or {})
        if working_dir is not None:
            directory = Path(working_dir).expanduser().resolve()
            if not directory.is_dir():
                raise JobsError(f"working dir {working_dir} is not a directory", exit_code=2)
            env["working_dir"] = str(directory)
            env["excludes"] = [*WORKING_DIR_EXCLUDES, *env.get("excludes", [])]
        with self._translate("submit the job", submission_id):
            return self._client.submit_job(
                entrypoint=entrypoint,
                submission_id=submission_id,
                runtime_env=env or None,
                entrypoint_num_cpus=entrypoint_num_cpus,
                metadata=dict(metadata) if metadata else None,
            )

    def list(self) -> builtins.list[JobDetails]:
        """Every job the cluster knows, oldest first."""
        with self._translate("list jobs"):
            jobs = self._client.list_jobs()
        return sorted(jobs, key=lambda job: job.start_time or 0)

    def info(self, job_id: str) -> JobDetails:
        """Status, message, timestamps and entrypoint of one job."""
        with self._translate("get the job's status", job_id):
            return self._client.get_job_info(job_id)

    def status(self, job_id: str) -> str:
        """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
        return _status_name(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        """Everything the job's driver has printed so far."""
        with self._translate("fetch the job's logs", job_id):
            return self._client.get_job_logs(job_id)

    def tail_logs(self, job_id: str) -> Iterator[str]:
        """Yield log chunks as the job prints them, until it ends.

        The SDK streams through an async generator; this drives it on a private event loop
        so callers can use a plain ``for`` loop. Do not call it from a running event loop.
        """
        self.info(job_id)  # a clear "no job" error beats a websocket 404
        # Typed as AsyncIterator by the SDK, but it is an async generator we must close.
        stream = cast("AsyncGenerator[str, None]", self._client.tail_job_logs(job_id))
        loop = asyncio.new_event_loop()
        try:
            while True:
                with self._translate("follow the job's logs", job_id):
                    try:
                        chunk = loop.run_until_complete(stream.__anext__())
                    except StopAsyncIteration:
                        return
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(stream.aclose())
            loop.close()

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop (SIGTERM, then SIGKILL); False if it had already ended."""
        with self._translate("stop the job", job_id):
            return bool(self._client.stop_job(job_id))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll: float = 0.5,
        *,
        until: Collection[str] = TERMINAL_STATUSES,
    ) -> str:
        """Poll until the job's status is in ``until`` and return that status.

        Args:
            job_id: Submission id.
            timeout: Seconds before giving up; ``None`` waits as long as it takes.
            poll: Seconds between status requests.
            until: Statuses to stop at; the default waits for the job to end.

        Raises:
            JobsError: On timeout, or if the job cannot be queried.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if status in until:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise JobsError(f"job {job_id!r} is still {status} after {timeout:g}s")
            time.sleep(poll)


# -- CLI ------------------------------------------------------------------------------------


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
    if path.suffix.lower() not in _CONFIG_SUFFIXES and os.sep not in target:
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
    status = _status_name(details.status)
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
    jobs.connect()
    excludes = ", ".join(WORKING_DIR_EXCLUDES[:4])
    _out.print(f"uploading {escape(args.working_dir)} (without {excludes}, ...)")
    # The job's driver must join the cluster it runs on, not start a Ray of its own.
    job_id = jobs.submit(
        [target, *args.overrides, "--address", "auto"],
        working_dir=args.working_dir,
        submission_id=args.submission_id,
    )
    _out.print(f"submitted [bold]{job_id}[/]")
    _out.print(f"dashboard: {jobs.dashboard_url(job_id)}")
    if args.follow:
        return _follow(jobs, job_id)
    if args.no_wait:
        return 0
    # Waiting out PENDING surfaces runtime-env failures (bad pip spec, missing dir) now.
    started = jobs.wait(job_id, timeout=args.start_timeout, until={"RUNNING", *TERMINAL_STATUSES})
    _out.print(f"{job_id} {_styled(started)}; `shoal jobs logs {job_id} --follow` follows it")
    return 1 if started in ("FAILED", "STOPPED") else 0


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
            _styled(_status_name(job.status)),
            _format_time(job.start_time),
            _format_duration(job.start_time, job.end_time),
            escape(job.entrypoint),
        ]
        table.add_row(*row[: len(table.columns)])
    console.print(table)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    _print_outcome(ShoalJobs(args.address), args.job_id)
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
        "as a Ray job. Waits until the job leaves PENDING unless --no-wait or --follow.",
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
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--follow", action="store_true", help="stream logs until the job ends")
    mode.add_argument("--no-wait", action="store_true", help="return right after submitting")
    submit.set_defaults(func=_guarded(_cmd_submit))

    jobs = subparsers.add_parser("jobs", help="list, inspect and stop Ray jobs")
    actions = jobs.add_subparsers(dest="jobs_command", metavar="{list,status,logs,stop}")
    actions.required = True
    commands = {
        "list": (_cmd_list, "table of the cluster's jobs"),
        "status": (_cmd_status, "status and message of one job"),
        "logs": (_cmd_logs, "print a job's logs"),
        "stop": (_cmd_stop, "stop a running job"),
    }
    for name, (handler, summary) in commands.items():
        action = actions.add_parser(name, help=summary)
        if name != "list":
            action.add_argument("job_id", metavar="ID")
        if name == "logs":
            action.add_argument("--follow", action="store_true", help="stream until it ends")
        _add_address(action)
        action.set_defaults(func=_guarded(handler))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the jobs subcommands on their own, for testing without the full ``shoal`` CLI."""
    parser = argparse.ArgumentParser(prog="shoal", description="shoal Ray Jobs client")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
