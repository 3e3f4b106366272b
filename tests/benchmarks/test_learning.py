"""How the learning benchmark reads one seed's evaluated checkpoints."""

from __future__ import annotations

import json
import math

from benchmarks.learning import at_mark, seed_figures, train_fall_after_target

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


def test_a_step_mark_takes_the_checkpoint_placed_at_it_up_to_one_batch_past() -> None:
    # Checkpoints fall at the first iteration (12,800 steps) past each 150k.
    assert at_mark(EVALS, "env_steps", 290_000, slack=12_800) == -44.0
    assert at_mark(EVALS, "env_steps", 280_000, slack=12_800) == -60.0


def test_training_fall_counts_from_the_first_iteration_at_the_target() -> None:
    nan = math.nan
    train = [
        (0, -60.0),
        (1, -80.0),
        (2, -70.0),
        (3, nan),
        (4, -44.0),
        (5, -33.0),
        (6, -40.0),
        (7, -31.0),
    ]
    assert train_fall_after_target(train) == 7.0  # -33 then -40
    assert train_fall_after_target([(1, -90.0), (2, -50.0), (3, -80.0)]) is None  # never there
    # The climb before the target is not a fall, however noisy.
    assert train_fall_after_target([(1, -60.0), (2, -75.0), (3, -45.0), (4, -46.0)]) == 1.0
    f = seed_figures(EVALS, train)
    assert f["train_fall_after_target"] == 7.0 and f["train_fall"] == 20.0  # -60 to -80


def test_a_checkpoint_that_landed_past_its_mark_is_placed_at_that_mark(capsys) -> None:
    # 8192-step batches against marks every 200k: checkpoints land at 204800 and 401408.
    from benchmarks.world_model import summarize

    evals = [{"env_steps": 204_800, "mean": 1.0}, {"env_steps": 401_408, "mean": 2.0}]
    runs = [{"evals": evals, "reach": {"env_steps": None, "seconds": None}}] * 3
    summarize("arm", runs, 200_000, 400_000, "return", {})
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    at = {r["name"]: r["value"] for r in lines if "_iqm_return_at_" in r["name"]}
    assert at == {"arm_iqm_return_at_200000_steps": 1.0, "arm_iqm_return_at_400000_steps": 2.0}
