"""Submit shoal runs to a Ray cluster and follow them through Ray's Jobs API.

:class:`ShoalJobs` wraps :class:`ray.job_submission.JobSubmissionClient`: it packages the
working directory, builds a ``python -m orchestrator.cli run ...`` entrypoint with a readable
submission id, and turns every failure into a one-line :class:`JobsError` that says what to do
(start a cluster, set the token, list the ids).

The cluster's address and auth token are found as Ray finds them (``orchestrator.cli.cluster``)
and the token is always sent.

Example:
    >>> jobs = ShoalJobs("http://127.0.0.1:8265")  # doctest: +SKIP
    >>> job_id = jobs.submit(["spread-gnn", "train.lr=3e-4"], working_dir=".")  # doctest: +SKIP
    >>> jobs.wait(job_id, timeout=3600)  # doctest: +SKIP
    'SUCCEEDED'
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import re
import secrets
import shlex
import time
from collections.abc import AsyncGenerator, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import requests

from orchestrator.cli.cluster import (
    DEFAULT_ADDRESS,
    JobsError,
    default_address,
    find_token,
    normalize_address,
    resolve_auth_headers,
)

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

__all__ = [
    "DEFAULT_ADDRESS", "TERMINAL_STATUSES", "WORKING_DIR_EXCLUDES", "JobsError", "ShoalJobs",
    "CONFIG_SUFFIXES", "build_entrypoint", "default_address", "make_submission_id",
    "resolve_auth_headers", "status_name"
]  # fmt: skip

TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
# Virtualenvs, run outputs and caches can be gigabytes; the job needs none of them.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv", "venv", "runs", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", "*.egg-info"
)  # fmt: skip
# `python -m` rather than the `shoal` script: with a working_dir the package is importable
# from the job's cwd even when the cluster image has only the dependencies installed.
_ENTRYPOINT_PREFIX = ("python", "-m", "orchestrator.cli", "run")
CONFIG_SUFFIXES = frozenset({".yaml", ".yml", ".json"})


def make_submission_id(preset: str, now: datetime | None = None) -> str:
    """A readable, unique submission id: ``shoal-<preset>-<YYYYmmdd-HHMMSS>-<4 hex>``.

    Args:
        preset: Preset name or config path; only its lowercase alphanumeric stem is kept.
        now: Timestamp to embed (local time); defaults to now.
    """
    path = Path(preset)
    name = path.stem if path.suffix.lower() in CONFIG_SUFFIXES else path.name
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


def status_name(status: Any) -> str:
    """A job status (enum or string) as its plain name, e.g. ``"RUNNING"``."""
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
        self.address = normalize_address(address or default_address())
        self._token, self._token_source = find_token(token)
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
        entrypoint_resources: Mapping[str, float] | None = None,
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
            entrypoint_resources: Custom resources for the driver (``{"node:<ip>": 0.001}``
                puts it on that node).
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
                entrypoint_resources=dict(entrypoint_resources) if entrypoint_resources else None,
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
        return status_name(self.info(job_id).status)

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

    def delete(self, job_id: str) -> bool:
        """Forget an ended job (its logs and info); False if it was not deleted."""
        with self._translate("delete the job", job_id):
            return bool(self._client.delete_job(job_id))

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
