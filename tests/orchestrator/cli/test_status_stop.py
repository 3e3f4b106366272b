"""`shoal status`, `stop`, `eval` and `plot` from another terminal, naming a run by its id."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from orchestrator.cli.main import main as shoal

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def test_status_and_stop_by_the_run_id_status_shows(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # runs go to ./runs, as for a user in their project
    run = subprocess.Popen(
        [
            sys.executable, "-m", "orchestrator.cli", "run", "spread-mlp", "run.name=demo",
            "env.num_envs=64", "train.total_env_steps=1000000000", "run.log_every_s=0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert run.poll() is None, run.communicate()[0]
            assert time.monotonic() < deadline, "the run never reported progress"
            code = shoal(["status"])
            listing = capsys.readouterr().out
            if code == 0 and "demo" in listing and "running" in listing:
                break
            time.sleep(0.5)

        # The id in that listing is enough: no run directory, no Redis URL.
        assert shoal(["status", "demo"]) == 0
        assert "running" in capsys.readouterr().out
        assert shoal(["stop", "demo"]) == 0
        assert "asked run 'demo' to checkpoint and stop" in capsys.readouterr().out
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0, out
        assert "stop requested" in out
        assert sorted((tmp_path / "runs" / "demo" / "checkpoints").glob("step-*"))
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()

    # Finished: status reads the summary, stop says there is nothing to stop.
    assert shoal(["status", "demo"]) == 0
    assert "finished: stop requested" in capsys.readouterr().out
    assert shoal(["stop", "demo"]) == 1
    assert "has already finished (stop requested)" in capsys.readouterr().out

    # The other commands that take a run directory take the id too.
    assert shoal(["eval", "demo", "--episodes", "4"]) == 0
    assert "team return" in capsys.readouterr().out
    assert shoal(["plot", "demo"]) == 0
    assert (tmp_path / "runs" / "demo" / "learning_curve.png").is_file()
