"""One call site, several destinations: the terminal, files in the run directory, Redis.

A :class:`Metrics` fans each row out to its sinks: :class:`ProgressSink` (the terminal),
:class:`CSVSink` (``metrics.csv``), :class:`TensorBoardSink` (event files in ``tensorboard/``),
:class:`RunStateSink` (Redis, for ``shoal status``) and, on Ray,
:class:`~orchestrator.runtime.ray_metrics.RayMetricsSink`. The driver owns them.
"""

from __future__ import annotations

import csv
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from agents.memory import RunState


class MetricsSink(Protocol):
    """Anything that accepts a row of metrics."""

    def log(self, row: dict[str, float]) -> None:
        """Record one row."""

    def close(self) -> None:
        """Flush and release."""


class CSVSink:
    """``metrics.csv`` in the run directory; appends when resuming."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: Any = None
        self._writer: csv.DictWriter[str] | None = None
        if path.exists() and path.stat().st_size > 0:
            with open(path, newline="") as fh:
                header = next(csv.reader(fh), None)
            if header:
                self._fh = open(path, "a", newline="")  # noqa: SIM115 - kept open for the run
                self._writer = csv.DictWriter(self._fh, fieldnames=header, extrasaction="ignore")

    def log(self, row: dict[str, float]) -> None:
        """Append one row; a key no earlier row had adds a column (rare: ``eval_return``)."""
        if self._writer is None:
            self._fh = open(self.path, "w", newline="")  # noqa: SIM115
            self._writer = csv.DictWriter(self._fh, fieldnames=list(row), extrasaction="ignore")
            self._writer.writeheader()
        elif not row.keys() <= set(self._writer.fieldnames):
            header = list(self._writer.fieldnames)
            self._rewrite(header + [k for k in row if k not in header], self._rows())
        assert self._writer is not None and self._fh is not None
        self._writer.writerow(row)
        self._fh.flush()

    def truncate(self, max_env_steps: float) -> None:
        """Drop rows past ``max_env_steps``: progress a crash lost and a resume will redo.

        Keeps the file's ``env_steps`` column increasing when a run resumes from a checkpoint
        older than its last logged row.
        """
        if self._writer is None or self._fh is None:
            return
        kept = [r for r in self._rows() if float(r.get("env_steps") or 0.0) <= max_env_steps]
        self._rewrite(list(self._writer.fieldnames), kept)

    def _rows(self) -> list[dict[str, str]]:
        assert self._fh is not None
        self._fh.flush()
        with open(self.path, newline="") as fh:
            return list(csv.DictReader(fh))

    def _rewrite(self, header: list[str], rows: list[dict[str, str]]) -> None:
        """Replace the file with ``rows`` under ``header``, atomically, and keep appending."""
        assert self._fh is not None
        self._fh.close()
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", newline="")  # noqa: SIM115 - kept open for the run
        self._writer = csv.DictWriter(self._fh, fieldnames=header, extrasaction="ignore")

    def close(self) -> None:
        """Close the file."""
        if self._fh is not None:
            self._fh.close()


class TensorBoardSink:
    """TensorBoard event files: every numeric column of ``metrics.csv`` as a scalar.

    Scalars are logged against ``env_steps`` (the CSV's x axis) under the CSV's column names
    (``episode_return``, ``return/<group>``, ...), so ``tensorboard --logdir runs`` compares
    runs as ``shoal plot`` does. Written with ``tensorboardX`` (installed with Ray Tune), which
    needs no TensorFlow.

    Args:
        log_dir: the run's ``tensorboard`` directory.
        purge_step: for a resumed run, the first env step after its checkpoint: TensorBoard
            drops what an earlier session logged from there on (progress a crash lost, redone).
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # type: ignore[import-untyped]

        # A file per session: two sessions in one second would otherwise share a name.
        suffix = f".{os.getpid()}.{time.time_ns()}"
        self.writer = SummaryWriter(
            str(log_dir), purge_step=purge_step, flush_secs=10, filename_suffix=suffix
        )

    def log(self, row: dict[str, float]) -> None:
        """One scalar per finite numeric column, at the row's env step."""
        step = int(row.get("env_steps", 0))
        for key, value in row.items():
            if key != "env_steps" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


class Fall:
    """The largest fall of a stream of returns below its best so far (0 while it never falls).

    The run's stability as a user sees it: fed every iteration's training return (each the
    mean of thousands of episodes, so a fall is real), or every evaluation. ``state`` is
    ``(best, largest fall)``, saved with the run's counters so a resumed run goes on.
    """

    def __init__(self, state: tuple[float | None, float] = (None, 0.0)) -> None:
        self.best, self.largest = state

    def add(self, value: float) -> float:
        """Take the next return (NaN is skipped); returns the largest fall so far."""
        if math.isfinite(value):
            self.best = value if self.best is None else max(self.best, value)
            self.largest = max(self.largest, self.best - value)
        return self.largest

    @property
    def state(self) -> tuple[float | None, float]:
        """``(best, largest fall)``."""
        return self.best, self.largest


def _finite_return(row: dict[str, float], last: float) -> float:
    """The row's team return, or ``last`` when no episode ended in its batch (NaN)."""
    value = row.get("episode_return", math.nan)
    return value if math.isfinite(value) else last


GROUP_RETURN = "return/"
"""Prefix of an agent group's return in a metrics row (``return/<group>``)."""


def _shown(
    row: dict[str, float], last_return: float = math.nan, groups: dict[str, float] | None = None
) -> dict[str, Any]:
    """What the bar and the plain line show besides env steps, with defaults for gaps.

    Long episodes do not end in every batch: the return shown is then the last one seen.
    With agent groups each group's return follows (``groups``: the last finite ones).
    """
    per_group = "".join(f" {g} {v:.2f}" for g, v in (groups or {}).items())
    return {
        "sps": row.get("env_steps_per_s", 0.0),
        "ret": _finite_return(row, last_return),
        "groups": f" ({per_group.strip()})" if per_group else "",
        "pl": row.get("policy_loss", 0.0),
        "vl": row.get("value_loss", 0.0),
    }


def _group_returns(row: dict[str, float], last: dict[str, float]) -> dict[str, float]:
    """Each group's latest finite return: ``row``'s, else the one in ``last``."""
    out = dict(last)
    for key, value in row.items():
        if key.startswith(GROUP_RETURN) and math.isfinite(value):
            out[key.removeprefix(GROUP_RETURN)] = value
    return out


class ProgressSink:
    """Progress on the console: env steps, env-steps/s, team return, losses.

    On a terminal this is a live progress bar. Elsewhere (a log file, a pipe, a Ray job's
    logs) a bar only shows when it stops, so a plain line is printed instead, at most every
    ``every_s`` seconds and once more at the end.
    """

    def __init__(
        self,
        total_env_steps: int,
        start: int = 0,
        console: Console | None = None,
        every_s: float = 10.0,
    ):
        self.console = console or Console(stderr=True)
        self.total = total_env_steps
        self.every_s = every_s
        self.t0 = time.monotonic()
        self._last_line = -math.inf
        self._pending: dict[str, float] | None = None  # logged, not printed yet
        self._return = math.nan  # the last finite team return
        self._groups: dict[str, float] = {}  # and each agent group's
        self.progress: Progress | None = None
        if self.console.is_terminal:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} steps"),
                TextColumn("{task.fields[sps]:>9,.0f} steps/s"),
                TextColumn("return {task.fields[ret]:>8.2f}{task.fields[groups]}"),
                TextColumn("π {task.fields[pl]:+.3f} v {task.fields[vl]:.3f}"),
                TimeElapsedColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self.task: TaskID = self.progress.add_task(
                "train",
                total=total_env_steps,
                completed=start,
                **_shown({}),
            )
            self.progress.start()

    def log(self, row: dict[str, float]) -> None:
        """Move the bar, or print a line if the last one is ``every_s`` old."""
        self._return = _finite_return(row, self._return)
        self._groups = _group_returns(row, self._groups)
        if self.progress is not None:
            shown = _shown(row, self._return, self._groups)
            self.progress.update(self.task, completed=row["env_steps"], **shown)
            return
        self._pending = row
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._print_line(row)

    def line(self, row: dict[str, float]) -> str:
        """The plain progress line for ``row``."""
        steps, f = row["env_steps"], _shown(row, self._return, self._groups)
        share = f" ({min(100.0, 100 * steps / self.total):.0f}%)" if self.total > 0 else ""
        elapsed = int(time.monotonic() - self.t0)
        return (
            f"train {steps:,.0f}/{self.total:,} env-steps{share}"
            f"  {f['sps']:,.0f} env-steps/s  return {f['ret']:.2f}{f['groups']}"
            f"  pi-loss {f['pl']:+.3f} v-loss {f['vl']:.3f}"
            f"  {elapsed // 3600}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        )

    def _print_line(self, row: dict[str, float]) -> None:
        self._pending = None
        self.console.print(self.line(row), markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        """Stop redrawing; without a terminal, print the last row if not printed yet."""
        if self.progress is not None:
            self.progress.stop()
        elif self._pending is not None:
            self._print_line(self._pending)


class Metrics:
    """Fan a row out to every sink and keep the latest values."""

    def __init__(self, sinks: list[MetricsSink]) -> None:
        self.sinks = sinks
        self.latest: dict[str, float] = {}
        self._groups: dict[str, float] = {}
        self.t0 = time.monotonic()

    def log(self, row: dict[str, float]) -> None:
        """Send one row everywhere.

        Sinks get the row as it is; ``latest`` (what a run's summary reports) keeps the last
        finite team return when no episode ended in this row's batch.
        """
        last = self.latest.get("episode_return", math.nan)
        groups = {GROUP_RETURN + g: v for g, v in _group_returns(row, self._groups).items()}
        self._groups = {k.removeprefix(GROUP_RETURN): v for k, v in groups.items()}
        self.latest = {**row, **groups, "episode_return": _finite_return(row, last)}
        for s in self.sinks:
            s.log(row)

    def close(self) -> None:
        """Close every sink."""
        for s in self.sinks:
            s.close()


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
