"""Learning over seeds: evaluated team return on real mpe2, with honest statistics.

``python -m benchmarks.learning --presets spread-gnn spread-mlp spread-transformer --seeds 5``
trains each preset once per seed, one run after another (2 cores: never two at once), for
``--time-limit`` seconds with a checkpoint every 10 s, then evaluates every checkpoint on 100
episodes of the real mpe2 ``simple_spread_v3`` (the same seeded episodes for every checkpoint
and seed), and the run's own best checkpoint (``checkpoints/best``) likewise.

One JSON line per seed, then per preset: the interquartile mean (IQM) over seeds with a 95 %
bootstrap confidence interval of the evaluated return at fixed wall-clock and env-step marks
(a seed's value at a mark is its last checkpoint at or before it; the wall-clock
marks allow the 1.5 s a checkpoint can land after its 10 s boundary), the time and env steps to
a team return of -45 (median and range over the seeds that reach it), and two stability
figures per seed: the largest fall from its best evaluated return to any later one, and the
fall from its best to its last checkpoint. Random and no-op returns are the reference,
measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from typing import Any

from benchmarks.spread import TARGET_RETURN, baseline_returns, emit, train_and_evaluate
from benchmarks.stats import bootstrap_ci, iqm, largest_drop
from orchestrator.config import preset_names

WALL_MARKS = (20.0, 40.0, 60.0, 90.0, 120.0)
STEP_MARKS = (250_000, 500_000, 1_000_000, 2_000_000)


# A checkpoint lands at the first iteration boundary after each 10 s: up to one iteration
# (under a second here) past its mark, which must still count as the mark's.
WALL_SLACK_S = 1.5


def at_mark(evals: list[dict[str, Any]], key: str, mark: float) -> float | None:
    """The return of the last checkpoint at or before ``mark``; ``None`` if there is none."""
    slack = WALL_SLACK_S if key == "wall_time" else 0.0
    before = [e for e in evals if e[key] is not None and e[key] <= mark + slack]
    return before[-1]["mean"] if before else None


def seed_figures(evals: list[dict[str, Any]]) -> dict[str, Any]:
    """One seed's time and steps to the target, best, last and stability figures."""
    means = [e["mean"] for e in evals]
    reached = next((e for e in evals if e["mean"] >= TARGET_RETURN), None)
    return {
        "seconds_to_target": reached["wall_time"] if reached else None,
        "env_steps_to_target": reached["env_steps"] if reached else None,
        "best": max(means),
        "last": means[-1],
        "largest_drop": largest_drop(means),
        "best_to_last_drop": max(means) - means[-1],
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def report(preset: str, runs: list[dict[str, Any]], ctx: dict[str, Any]) -> None:
    """The per-preset lines: IQM and CI at the marks, time to target, stability."""
    seeds = len(runs)
    for key, marks, unit in (("wall_time", WALL_MARKS, "s"), ("env_steps", STEP_MARKS, "steps")):
        for mark in marks:
            values = [v for r in runs if (v := at_mark(r["evals"], key, mark)) is not None]
            if not values:
                continue
            lo, hi = bootstrap_ci(values)
            emit(
                f"{preset}_iqm_return_at_{int(mark)}{'s' if unit == 's' else '_steps'}",
                iqm(values),
                "team_return",
                ci95=[round(lo, 3), round(hi, 3)],
                seeds=len(values),
                of_seeds=seeds,
                **ctx,
            )
    figures = [r["figures"] for r in runs]
    for what in ("seconds_to_target", "env_steps_to_target"):
        reached = [f[what] for f in figures if f[what] is not None]
        spread = _spread(reached)
        emit(
            f"{preset}_{what}",
            spread["median"] if spread["median"] is not None else float("nan"),
            "s" if what.startswith("seconds") else "env_steps",
            target=TARGET_RETURN,
            reached=len(reached),
            of_seeds=seeds,
            range=[spread["min"], spread["max"]],
            **ctx,
        )
    for what in ("largest_drop", "best_to_last_drop"):
        values = [f[what] for f in figures]
        emit(
            f"{preset}_{what}",
            max(values),
            "team_return",
            per_seed=[round(v, 2) for v in values],
            median=statistics.median(values),
            **ctx,
        )
    for what in ("last", "best"):
        values = [f[what] for f in figures]
        lo, hi = bootstrap_ci(values)
        emit(f"{preset}_iqm_{what}_checkpoint_return", iqm(values), "team_return",
             ci95=[round(lo, 3), round(hi, 3)], seeds=seeds, **ctx)  # fmt: skip
    kept = [r["best"]["mean"] for r in runs if r["best"] is not None]
    if kept:
        lo, hi = bootstrap_ci(kept)
        emit(f"{preset}_iqm_kept_best_checkpoint_return", iqm(kept), "team_return",
             ci95=[round(lo, 3), round(hi, 3)], seeds=len(kept), **ctx)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the multi-seed learning benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=preset_names())
    p.add_argument("--seeds", type=int, default=5, help="runs per preset (seeds 0..N-1)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds of training a run")
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run")  # fmt: skip
    args = p.parse_args(argv)
    ctx: dict[str, Any] = {"machine": platform.machine(), "time_limit_s": args.time_limit}
    if args.overrides:
        ctx["overrides"] = args.overrides
    for name, value in baseline_returns(args.eval_episodes).items():
        emit(f"mpe2_spread_{name}_team_return", value, "team_return", **ctx)
    for preset in args.presets:
        runs = []
        for seed in range(args.seeds):
            res = train_and_evaluate(
                preset, args.time_limit, [f"train.seed={seed}", *args.overrides], args.eval_episodes
            )
            run = {
                "evals": res["evals"],
                "best": res["best"],
                "figures": seed_figures(res["evals"]),
            }
            runs.append(run)
            emit(
                f"{preset}_seed_run",
                run["figures"]["last"],
                "team_return",
                seed=seed,
                env_steps_per_s=round(res["sps"]),
                returns=[round(e["mean"], 2) for e in res["evals"]],
                kept_best=res["best"],
                **{k: v for k, v in run["figures"].items() if k != "last"},
                **ctx,
            )
        report(preset, runs, ctx)


if __name__ == "__main__":
    main()
