"""Learning over seeds, placed by env steps: evaluated team return on real mpe2, and stability.

``python -m benchmarks.learning --presets spread-gnn spread-mlp spread-transformer --seeds 5``
trains each preset once per seed, one run after another (2 cores: never two at once), for
``--env-steps`` env steps with a checkpoint each time the counter passes a multiple of
``--eval-every``, then evaluates every checkpoint on 100 episodes of the real mpe2
``simple_spread_v3`` (the same seeded episodes for every checkpoint and seed), and the run's
own best checkpoint (``checkpoints/best``) likewise. Marks and evaluations are env steps, so
the figures do not move with the machine's speed; wall time is reported beside them.
``--time-limit`` trains for wall seconds instead (checkpoints every 10 s).

``--ablate KEY=VALUE ...`` adds a second arm per preset with those overrides (e.g. a fix
switched off), its seeds interleaved with the first arm's, so both are measured in one run.

One JSON line per seed, then per arm: the interquartile mean (IQM) over seeds with a 95 %
bootstrap confidence interval of the evaluated return at env-step marks (a seed's value at a
mark is the checkpoint the schedule placed there: the first one at or past it), the time and
env steps to a team return of -45 (median and range over the seeds that reach it), and the
stability figures per seed: the largest fall of the evaluated return below its best so far,
the largest fall of the per-iteration training return below its running best after it first
passed -45 (each iteration averages ~500 episodes, so a fall there is real), and the fall from
the best to the last checkpoint. Random and no-op returns are the reference, measured in the
same run.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
from typing import Any

from benchmarks.spread import TARGET_RETURN, baseline_returns, emit, train_and_evaluate
from benchmarks.stats import bootstrap_ci, iqm, largest_drop
from orchestrator.config import preset_names

WALL_MARKS = (20.0, 40.0, 60.0, 90.0, 120.0)
STEP_MARKS = (250_000, 500_000, 1_000_000, 2_000_000)
# What a stable run must hold (the bar): no fall larger than this.
STABLE_FALL = 5.0


# A checkpoint lands at the first iteration boundary after each 10 s: up to one iteration
# (under a second here) past its mark, which must still count as the mark's.
WALL_SLACK_S = 1.5


def at_mark(
    evals: list[dict[str, Any]], key: str, mark: float, slack: float | None = None
) -> float | None:
    """The return of the last checkpoint at or before ``mark`` + ``slack``; ``None`` if none.

    ``slack`` is how far past its mark a checkpoint can land: up to one iteration (the wall
    clock's ``WALL_SLACK_S``; for env steps, one batch, as a checkpoint falls at the first
    iteration that passes its mark).
    """
    slack = (WALL_SLACK_S if key == "wall_time" else 0.0) if slack is None else slack
    before = [e for e in evals if e[key] is not None and e[key] <= mark + slack]
    return before[-1]["mean"] if before else None


def train_fall_after_target(train: list[tuple[float, float]]) -> float | None:
    """Largest fall of the per-iteration training return below its running best, counted
    from the first iteration at or above the target; ``None`` if it never got there."""
    returns = [r for _, r in train if math.isfinite(r)]
    first = next((i for i, r in enumerate(returns) if r >= TARGET_RETURN), None)
    return None if first is None else largest_drop(returns[first:])


def seed_figures(
    evals: list[dict[str, Any]], train: list[tuple[float, float]] | None = None
) -> dict[str, Any]:
    """One seed's time and steps to the target, best, last and stability figures."""
    means = [e["mean"] for e in evals]
    reached = next((e for e in evals if e["mean"] >= TARGET_RETURN), None)
    returns = [r for _, r in train or [] if math.isfinite(r)]
    return {
        "train_fall": largest_drop(returns) if returns else None,
        "train_fall_after_target": train_fall_after_target(train or []),
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


def report(
    preset: str, runs: list[dict[str, Any]], ctx: dict[str, Any], batch: int | None = None
) -> None:
    """The per-arm lines: IQM and CI at the marks, time to target, stability.

    ``batch``: env steps an iteration, the slack of a step mark (``None``: wall-clock run).
    """
    seeds = len(runs)
    axes: list[tuple[str, tuple[float, ...], str, float | None]]
    axes = [("env_steps", STEP_MARKS, "steps", batch or 0)]
    if batch is None:
        axes.insert(0, ("wall_time", WALL_MARKS, "s", None))
    for key, marks, unit, slack in axes:
        for mark in marks:
            values = [v for r in runs if (v := at_mark(r["evals"], key, mark, slack)) is not None]
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
    for what in ("largest_drop", "train_fall_after_target", "train_fall", "best_to_last_drop"):
        values = [f[what] for f in figures if f.get(what) is not None]
        if not values:
            continue
        emit(
            f"{preset}_{what}",
            max(values),
            "team_return",
            per_seed=[None if f.get(what) is None else round(f[what], 2) for f in figures],
            median=statistics.median(values),
            seeds_within_5=sum(v <= STABLE_FALL for v in values),
            **ctx,
        )
    wall = [r["wall_s"] for r in runs]
    emit(f"{preset}_train_seconds", statistics.median(wall), "s", per_seed=wall, **ctx)
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
    p.add_argument("--env-steps", type=int, default=2_000_000, help="env steps of training a run")
    p.add_argument("--eval-every", type=int, default=100_000,
                   help="env steps between evaluated checkpoints")  # fmt: skip
    p.add_argument("--time-limit", type=float, default=None,
                   help="train for this many wall seconds instead of --env-steps")  # fmt: skip
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied to every run")  # fmt: skip
    p.add_argument("--ablate", nargs="*", default=[], metavar="KEY=VALUE",
                   help="also run each preset with these overrides, in the same run")  # fmt: skip
    args = p.parse_args(argv)
    ctx: dict[str, Any] = {"machine": platform.machine()}
    by_steps = args.time_limit is None
    ctx.update(env_steps=args.env_steps, eval_every=args.eval_every) if by_steps else ctx.update(
        time_limit_s=args.time_limit
    )
    if args.overrides:
        ctx["overrides"] = args.overrides
    for name, value in baseline_returns(args.eval_episodes).items():
        emit(f"mpe2_spread_{name}_team_return", value, "team_return", **ctx)
    arms = {"": []} | ({f"[{' '.join(args.ablate)}]": args.ablate} if args.ablate else {})
    for preset in args.presets:
        runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
        batch = None
        for seed in range(args.seeds):
            for arm, extra in arms.items():  # interleaved: both arms see the same machine
                overrides = [f"train.seed={seed}", *args.overrides, *extra]
                res = train_and_evaluate(
                    preset,
                    args.time_limit,
                    overrides,
                    args.eval_episodes,
                    env_steps=args.env_steps if by_steps else None,
                    eval_every_steps=args.eval_every if by_steps else None,
                )
                cfg = res["cfg"]
                batch = cfg.train.rollout_len * cfg.env.num_envs if by_steps else None
                run = {
                    "evals": res["evals"],
                    "best": res["best"],
                    "figures": seed_figures(res["evals"], res["train"]),
                    "wall_s": round(res["summary"]["train_seconds"], 1),
                }
                runs[arm].append(run)
                emit(
                    f"{preset}{arm}_seed_run",
                    run["figures"]["last"],
                    "team_return",
                    seed=seed,
                    env_steps_per_s=round(res["sps"]),
                    train_seconds=run["wall_s"],
                    returns=[round(e["mean"], 2) for e in res["evals"]],
                    at_env_steps=[e["env_steps"] for e in res["evals"]],
                    kept_best=res["best"],
                    **{k: v for k, v in run["figures"].items() if k != "last"},
                    **ctx,
                )
        for arm in arms:
            report(f"{preset}{arm}", runs[arm], ctx, batch)


if __name__ == "__main__":
    main()
