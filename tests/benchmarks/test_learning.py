"""How the learning benchmark reads one seed's evaluated checkpoints."""

from __future__ import annotations

from benchmarks.learning import at_mark, seed_figures

EVALS = [
    {"wall_time": 10.4, "env_steps": 150_000, "mean": -60.0},
    {"wall_time": 20.6, "env_steps": 300_000, "mean": -44.0},
    {"wall_time": 30.2, "env_steps": 450_000, "mean": -33.0},
    {"wall_time": 40.9, "env_steps": 600_000, "mean": -41.0},
    {"wall_time": 50.3, "env_steps": 750_000, "mean": -36.0},
]


def test_a_mark_takes_the_last_checkpoint_up_to_it() -> None:
    assert at_mark(EVALS, "wall_time", 20) == -44.0  # landed 0.6 s after its 10 s boundary
    assert at_mark(EVALS, "wall_time", 5) is None
    assert at_mark(EVALS, "env_steps", 500_000) == -33.0
    assert at_mark(EVALS, "env_steps", 10**7) == -36.0


def test_seed_figures() -> None:
    f = seed_figures(EVALS)
    assert f["seconds_to_target"] == 20.6 and f["env_steps_to_target"] == 300_000
    assert f["best"] == -33.0 and f["last"] == -36.0
    assert f["largest_drop"] == 8.0 and f["best_to_last_drop"] == 3.0
    never = seed_figures([{"wall_time": 10, "env_steps": 1, "mean": -70.0}])
    assert never["seconds_to_target"] is None and never["largest_drop"] == 0.0
