"""`shoal sweep` on Ray Tune: trials are shoal runs, results and a best preset come out."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from orchestrator.cli.main import main as shoal
from orchestrator.config import load_config

BASE = ["spread-mlp", "train.total_env_steps=400", "env.num_envs=8", "train.rollout_len=10",
        "model.hidden=16", "run.eval_every_s=null"]  # fmt: skip

BAD = {
    "unknown-space": ("train.lr=logunif(1e-4,1e-3)", r"train.lr: 'logunif\(1e-4,1e-3\)' is not a"),
    "low-high": ("train.lr=loguniform(3e-3,1e-4)", r"loguniform\(0.003, 0.0001\) needs low < high"),
    "log-of-zero": ("train.lr=loguniform(0,1)", r"train.lr: loguniform needs low > 0"),
    "empty-choice": ("model.hidden=choice()", r"model.hidden: choice\(\) needs arguments"),
    "unknown-key": ("train.bogus=choice(1,2)", r"train.bogus: unknown key"),
    "out-of-range": ("train.gamma=uniform(0.9,1.5)", r"train.gamma: .*less than or equal to 1"),
}  # fmt: skip


@pytest.mark.parametrize("arg, expected", BAD.values(), ids=BAD.keys())
def test_a_bad_search_space_is_one_line_and_nothing_starts(tmp_path, capsys, arg, expected) -> None:
    assert shoal(["sweep", *BASE, arg, "--dir", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_four_trials_give_results_and_a_best_preset_shoal_run_loads(tmp_path, capsys) -> None:
    args = [*BASE, "train.lr=loguniform(1e-4,3e-3)", "model.layers=choice(1,2)"]
    assert shoal(["sweep", *args, "--samples", "4", "--dir", str(tmp_path)]) == 0
    (sweep_dir,) = tmp_path.glob("sweep-spread-mlp-*")
    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert all(1e-4 <= float(r["train.lr"]) <= 3e-3 for r in rows)
    for r in rows:  # every trial is an ordinary run
        run_dir = sweep_dir / "trials" / r["trial"]
        assert (run_dir / "metrics.csv").is_file() and list(
            (run_dir / "checkpoints").glob("step-*")
        )
    best = max(rows, key=lambda r: float(r["episode_return"]))
    cfg = load_config(str(sweep_dir / "best.yaml"))
    assert cfg.train.lr == pytest.approx(float(best["train.lr"]))
    assert cfg.model.layers == int(best["model.layers"]) and cfg.train.total_env_steps == 400
    assert "best.yaml" in capsys.readouterr().out
    assert Path(sweep_dir / "sweep.json").is_file()


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int(
                    (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, IndexError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return sorted(found)


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_sweep_resumes_without_redoing_finished_trials(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    args = [*BASE, "train.total_env_steps=1600", "train.lr=grid(1e-3,2e-3,3e-3)"]
    cmd = [sys.executable, "-m", "orchestrator.cli", "sweep", *args, "--samples", "1",
           "--max-concurrent", "1", "--dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = list(tmp_path.glob("sweep-*/trials/*/summary.json"))
            if done:
                break
            time.sleep(0.2)
        assert done, "the first trial did not finish"
        first = done[0].parent
        before = (first / "metrics.csv").read_text()
        for pid in [proc.pid, *_descendants(proc.pid)]:  # what this test started, by PID
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (sweep_dir,) = tmp_path.glob("sweep-*")
    assert shoal(["sweep", "--resume", str(sweep_dir)]) == 0
    with open(sweep_dir / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    assert (first / "metrics.csv").read_text() == before  # the finished trial was not redone


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_submitted_to_a_cluster_runs_there_as_a_job(tmp_path, monkeypatch, capsys) -> None:
    from orchestrator.cli.jobs_client import ShoalJobs
    from tests.ray_head import ray_head

    root = Path(__file__).resolve().parents[3]
    runs, store = tmp_path / "runs", tmp_path / "store"  # storage: a path every node mounts
    with ray_head(auth=False, num_cpus=2) as head:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        code = shoal(
            [
                "submit", "--sweep", *BASE, "train.lr=grid(1e-3,3e-3)", f"run.dir={runs}",
                f"run.storage={store}", "--samples", "1", "--address", head.address,
                "--working-dir", str(root), "--follow",
            ]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        job = re.search(r"submitted (shoal-sweep-spread-mlp-\S+)", out)
        assert job, out[-2000:]
        assert ShoalJobs(head.address).status(job.group(1)) == "SUCCEEDED"
        fetched = tmp_path / "fetched"
        assert shoal(["jobs", "fetch", job.group(1), str(fetched), "--address", head.address]) == 0
    assert "2 trials, by episode_return" in out
    # The sweep directory is named after the job; its files and its trials' runs are in
    # storage, and `shoal jobs fetch` brings all of them back.
    assert (store / job.group(1) / "results.csv").is_file()
    for sweep_dir in (runs / job.group(1), fetched):
        with open(sweep_dir / "results.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert sorted(float(r["train.lr"]) for r in rows) == [1e-3, 3e-3]
        assert all((sweep_dir / "trials" / r["trial"] / "metrics.csv").is_file() for r in rows)
        assert load_config(str(sweep_dir / "best.yaml")).train.total_env_steps == 400
    assert shoal(["eval", str(fetched / "trials" / rows[0]["trial"]), "--episodes", "2"]) == 0


def test_a_bad_space_is_refused_before_a_sweep_is_submitted(capsys) -> None:
    # Checked on the user's machine: no cluster is contacted (the address is unreachable).
    args = ["submit", "--sweep", *BASE, "train.lr=loguniform(0,1)"]
    assert shoal([*args, "--address", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: loguniform needs low > 0" in err and err.count("\n") == 1, err
    assert shoal(["submit", *BASE, "--samples", "2", "--address", "http://127.0.0.1:9"]) == 2
    assert "go with --sweep" in capsys.readouterr().err
