"""What a run prints when its output is a pipe or a log file (a Ray job's logs, `| tee`)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.cli import main as cli
from orchestrator.runtime import metrics
from orchestrator.runtime.metrics import Metrics, ProgressSink
from tests.cli import shoal


def _row(steps: float) -> dict[str, float]:
    return {"env_steps": steps, "env_steps_per_s": 12345.0, "episode_return": -50.5}


def test_plain_lines_are_spaced_in_time_and_the_last_row_is_always_shown(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    sink = ProgressSink(1_000_000, console=Console(file=out, width=30), every_s=10.0)
    assert sink.progress is None  # not a terminal: no live bar
    for i in range(1, 31):  # a row every second for 30 s
        clock[0] += 1.0
        sink.log(_row(i * 10_000))
    sink.close()
    lines = out.getvalue().splitlines()
    # Printed at t=1, 11, 21 s, then the unprinted last row at close.
    assert [line.split()[1] for line in lines] == [
        "10,000/1,000,000",
        "110,000/1,000,000",
        "210,000/1,000,000",
        "300,000/1,000,000",
    ]
    # Whole lines despite a 30-column console: nothing cut, every field there.
    assert "(30%)" in lines[-1] and "12,345 env-steps/s" in lines[-1]
    assert "return -50.50" in lines[-1] and lines[-1].endswith("0:00:30")


def test_close_does_not_repeat_a_row_already_printed(monkeypatch) -> None:
    out = io.StringIO()
    sink = ProgressSink(100, console=Console(file=out), every_s=0.0)
    sink.log(_row(50))
    sink.close()
    assert len(out.getvalue().splitlines()) == 1


def test_summary_keeps_long_paths_whole(monkeypatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=40, soft_wrap=True))
    run_dir = "runs/" + "a-very-long-run-directory-name-" * 3 + "20261201-090919"
    ckpt = f"{run_dir}/checkpoints/step-000000601600"
    cli._print_summary(
        {
            "reason": "total_env_steps reached",
            "counters": {"env_steps": 601600},
            "train_seconds": 18.3,
            "steps_this_session": 601600,
            "metrics": {"episode_return": -44.39},
            "run_dir": run_dir,
            "checkpoint": ckpt,
        }
    )
    lines = out.getvalue().splitlines()
    assert any(line.split() == ["checkpoint", ckpt] for line in lines)
    assert any(line.split() == ["next", "shoal", "eval", run_dir] for line in lines)


@pytest.mark.slow
def test_shoal_run_piped_shows_progress_and_whole_paths(tmp_path) -> None:
    proc = shoal(
        "run",
        "spread-mlp",
        "train.total_env_steps=20000",
        "env.num_envs=64",
        "redis.enabled=false",
        f"run.dir={tmp_path}",
    )
    assert proc.returncode == 0, proc.stderr
    progress = [line for line in proc.stderr.splitlines() if line.startswith("train ")]
    assert progress and "(100%)" in progress[-1]
    ckpt = next(line.split()[1] for line in proc.stdout.splitlines() if "checkpoint" in line)
    assert Path(ckpt).is_dir()  # the whole path, as printed


def test_csv_gains_a_column_when_a_row_brings_a_new_key(tmp_path) -> None:
    from orchestrator.runtime.metrics import CSVSink

    path = tmp_path / "metrics.csv"
    sink = CSVSink(path)
    sink.log({"env_steps": 1.0, "episode_return": -60.0})
    sink.log({"env_steps": 2.0, "episode_return": -55.0, "eval_return": -50.0})
    sink.log({"env_steps": 3.0, "episode_return": -52.0})
    sink.close()
    lines = path.read_text().splitlines()
    assert lines == [
        "env_steps,episode_return,eval_return",
        "1.0,-60.0,",
        "2.0,-55.0,-50.0",
        "3.0,-52.0,",
    ]
    resumed = CSVSink(path)  # a resumed run appends under the widened header
    resumed.log({"env_steps": 4.0, "eval_return": -45.0})
    resumed.close()
    assert path.read_text().splitlines()[-1] == "4.0,,-45.0"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_a_batch_without_finished_episodes_shows_the_last_return() -> None:
    """Long episodes do not end in every batch; the line and the summary keep the last one."""
    out = io.StringIO()
    sink = ProgressSink(100, console=Console(file=out, width=200), every_s=0.0)
    metrics = Metrics([sink])
    metrics.log({**_row(10), "episode_return": -7.25})
    metrics.log({**_row(20), "episode_return": float("nan")})
    assert "return -7.25" in out.getvalue().splitlines()[-1]
    assert metrics.latest["episode_return"] == -7.25 and metrics.latest["env_steps"] == 20


def test_fall_is_the_largest_drop_below_the_best_so_far_and_resumes_from_its_state() -> None:
    fall = metrics.Fall()
    stream = [-60.0, -40.0, float("nan"), -45.0, -30.0, -38.0, -31.0, -20.0, -24.0]
    seen = [fall.add(v) for v in stream]
    assert seen == [0, 0, 0, 5, 5, 8, 8, 8, 8]  # NaN (no episode ended) changes nothing
    assert fall.state == (-20.0, 8.0)
    resumed = metrics.Fall(fall.state)
    assert resumed.add(-29.0) == 9.0  # measured against the best before the resume
