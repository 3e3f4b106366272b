"""Sweeps: what a trial costs next to a plain run, and what a small search finds.

Run ``python -m benchmarks.sweep`` (about 10 minutes on 2 cores) or ``--only
overhead|search``. One JSON line per result, references measured in the same run, each
through the CLI as a user types it:

- ``overhead``: ``shoal run spread-gnn`` with a fixed env-step budget (the trial settings:
  no Redis, one thread, no progress line), timed as a subprocess, then ``shoal sweep`` of four
  trials of that budget one at a time (``train.seed=grid(0,1,2,3) --max-concurrent 1``): the
  sweep's wall seconds per trial next to the plain run's, Ray's start amortised over them.
- ``search``: ``train.lr=grid(3e-4,1e-3,3e-3) model.hidden=grid(32,64,128)`` on
  ``spread-gnn`` at ``--steps`` env steps a trial, two at once; each trial's final training
  team return, and the best config.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from benchmarks.spread import emit
from tests.cli import shoal

TRIAL = ["run.progress=false", "redis.enabled=false", "train.threads=1"]


def _shoal(*args: str) -> float:
    """Wall seconds of one ``shoal`` command; its output only on failure."""
    t0 = time.perf_counter()
    done = shoal(*args, timeout=3600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"shoal {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return wall


def _results(root: Path) -> list[dict[str, str]]:
    (sweep_dir,) = [p.parent for p in root.glob("*/results.csv")]
    with open(sweep_dir / "results.csv") as fh:
        return list(csv.DictReader(fh))


def overhead(steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-sweep-") as tmp:
        root = Path(tmp)
        budget = f"train.total_env_steps={steps}"
        plain = [
            _shoal("run", "spread-gnn", budget, *TRIAL, f"run.dir={root / 'plain'}",
                   f"run.name=plain-{i}")
            for i in range(2)
        ]  # fmt: skip
        plain_s = sorted(plain)[0]
        trials = 4
        sweep_s = _shoal(
            "sweep", "spread-gnn", budget, "train.seed=grid(0,1,2,3)", "--samples", "1",
            "--max-concurrent", "1", "--dir", str(root / "sweep"),
        )  # fmt: skip
        done = [r for r in _results(root / "sweep") if r["status"] == "done"]
        emit("sweep_wall_s_per_trial", sweep_s / trials, "s", trials=trials, done=len(done),
             env_steps=steps, sweep_wall_s=sweep_s, ref_plain_run_wall_s=plain_s,
             ref_plain_run_walls_s=plain)  # fmt: skip
        emit("sweep_overhead_s_per_trial", sweep_s / trials - plain_s, "s", env_steps=steps,
             ref_plain_run_wall_s=plain_s)  # fmt: skip


def search(steps: int) -> None:
    with tempfile.TemporaryDirectory(prefix="shoal-bench-sweep-") as tmp:
        root = Path(tmp)
        wall = _shoal(
            "sweep", "spread-gnn", f"train.total_env_steps={steps}",
            "train.lr=grid(3e-4,1e-3,3e-3)", "model.hidden=grid(32,64,128)", "--samples", "1",
            "--max-concurrent", "2", "--dir", str(root),
        )  # fmt: skip
        rows = _results(root)
        for row in rows:
            emit("sweep_trial_team_return", float(row["episode_return"] or "nan"), "return",
                 lr=float(row["train.lr"]), hidden=int(row["model.hidden"]), env_steps=steps,
                 status=row["status"])  # fmt: skip
        scored = [r for r in rows if r["episode_return"]]
        best = max(scored, key=lambda r: float(r["episode_return"]))
        emit("sweep_best_team_return", float(best["episode_return"]), "return",
             lr=float(best["train.lr"]), hidden=int(best["model.hidden"]), trials=len(rows),
             env_steps=steps, sweep_wall_s=wall)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["overhead", "search"])
    parser.add_argument("--overhead-steps", type=int, default=50_000)
    parser.add_argument("--steps", type=int, default=150_000, help="env steps per search trial")
    args = parser.parse_args()
    if args.only in (None, "overhead"):
        overhead(args.overhead_steps)
    if args.only in (None, "search"):
        search(args.steps)


if __name__ == "__main__":
    main()
