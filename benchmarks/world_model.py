"""Model-based against model-free on simple_spread, all arms in one run, over seeds.

``python -m benchmarks.world_model --seeds 5`` trains, one run after another, for each seed:

- ``model_free``: ``spread-gnn``;
- ``world_model``: ``spread-gnn-wm``, the same policy and PPO settings plus a learned model
  the policy also practises in;
- ``oracle``: ``spread-gnn-wm`` imagining with the true env instead of the model, the upper
  bound that separates the model's error from the algorithm.

Each run checkpoints every ``--every`` real env steps; every checkpoint is evaluated on 100
seeded episodes of the real mpe2 ``simple_spread_v3``. Reported per arm: real env steps and
wall seconds to a team return of -45 (median and range over seeds, and how many seeds reached
it), the IQM with a 95 % bootstrap CI of the return at every checkpoint (every ``--every``
real env steps), and ``spread_sample_efficiency_gain``: model-free's median env steps to -45
over the world model's. Then the trained model's open-loop k-step error (k = 1, 5, 15) on
fresh real trajectories, next to "repeat the last state" and "constant velocity" baselines.
``--slow`` adds two arms on the PettingZoo path (``spread-gnn-wm-slow``: real mpe2 stepped in
a loop), with and without its model, ``--slow-seeds`` seeds each (2 by default: a run takes
minutes) of up to ``--slow-max-env-steps``; there wall seconds to -45 is the figure that
matters, beside ``pettingzoo_spread_sample_efficiency_gain`` (and the wall-time ratio). With
``--arms`` left empty only the slow arms run; ``--set world_model.architecture=observation``
puts the observation model in place of the entity model.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.learning import at_mark
from benchmarks.spread import TARGET_RETURN, baseline_returns, emit, train_and_evaluate
from benchmarks.stats import bootstrap_ci, iqm
from orchestrator.cli.dream import dream

ARMS = {
    "model_free": ("spread-gnn", []),
    "world_model": ("spread-gnn-wm", []),
    "oracle": ("spread-gnn-wm", ["world_model.oracle=true"]),
}
# The slow path: real mpe2 stepped in a loop (the preset), without and with its model.
SLOW_ARMS = {
    "slow_model_free": ("spread-gnn-wm-slow", ["world_model.enabled=false"]),
    "slow_world_model": ("spread-gnn-wm-slow", []),
}


def _reach(evals: list[dict[str, Any]]) -> dict[str, float | None]:
    hit = next((e for e in evals if e["mean"] >= TARGET_RETURN), None)
    return {
        "env_steps": hit["env_steps"] if hit else None,
        "seconds": hit["wall_time"] if hit else None,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_arm(
    arm: str, preset: str, extra: list[str], args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, Any]:
    """Every seed of one arm; emits a line per seed and the arm's summary lines."""
    common = [
        f"run.checkpoint_every_steps={args.every}",
        "run.checkpoint_every_s=1000000",
        f"train.total_env_steps={args.max_env_steps}",
        *extra,
        *args.overrides,
    ]
    runs = []
    for seed in range(args.seeds):
        inspect = k_step_errors if arm == "world_model" and seed == 0 else None
        res = train_and_evaluate(
            preset, args.time_limit, [f"train.seed={seed}", *common], inspect=inspect
        )
        reach = _reach(res["evals"])
        runs.append({"evals": res["evals"], "reach": reach})
        emit(
            f"{arm}_seed_run",
            reach["env_steps"] if reach["env_steps"] is not None else math.nan,
            "env_steps_to_target",
            seed=seed,
            seconds_to_target=reach["seconds"],
            env_steps_per_s=round(res["sps"]),
            returns=[[e["env_steps"], round(e["mean"], 2)] for e in res["evals"]],
            **ctx,
        )
    for key, unit in (("env_steps", "env_steps"), ("seconds", "s")):
        reached = [r["reach"][key] for r in runs if r["reach"][key] is not None]
        emit(
            f"{arm}_{key}_to_target",
            _median(reached),
            unit,
            reached=len(reached),
            of_seeds=len(runs),
            range=[min(reached), max(reached)] if reached else None,
            target=TARGET_RETURN,
            **ctx,
        )
    for mark in range(args.every, args.max_env_steps + 1, args.every):
        # A run counts at the marks it trained to (a time limit may end it sooner).
        trained = [r for r in runs if r["evals"] and r["evals"][-1]["env_steps"] >= mark]
        values = [v for r in trained if (v := at_mark(r["evals"], "env_steps", mark)) is not None]
        if values:
            lo, hi = bootstrap_ci(values)
            emit(f"{arm}_iqm_return_at_{mark}_steps", iqm(values), "team_return",
                 ci95=[round(lo, 3), round(hi, 3)], seeds=len(values), **ctx)  # fmt: skip
    return {"runs": runs}


def k_step_errors(run_dir: Path, ks: tuple[int, ...] = (1, 5, 15), worlds: int = 200) -> None:
    """Open-loop agent-position error of the run's model on fresh real trajectories.

    ``shoal dream``'s measurement: from step 5 of real episodes (agents moving), the model
    replays the policy's actions on its own, next to "repeat" and "constant velocity".
    """
    res = dream(run_dir, steps=max(ks), worlds=worlds, out=run_dir / "dream.png")
    for name, by_step in res["errors"].items():
        for k in ks:
            emit(f"k_step_position_error_{name}", by_step[k - 1], "distance", k=k, worlds=worlds)


def _rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def memory(seconds: float, ctx: dict[str, Any], overrides: list[str]) -> None:
    """Resident memory of a ``spread-gnn-wm`` run of ``seconds``, sampled every 5 s.

    The run is its own process, so its RSS is the run's alone. Once the replay holds
    ``world_model.replay_capacity`` transitions, memory should stop growing.
    """
    with tempfile.TemporaryDirectory(prefix="shoal-bench-mem-") as tmp:
        cmd = [
            *(sys.executable, "-m", "orchestrator.cli.main", "run", "spread-gnn-wm"),
            *(f"train.time_limit_s={seconds}", "train.total_env_steps=1000000000"),
            *("run.progress=false", "redis.enabled=false", f"run.dir={tmp}", *overrides),
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0, samples = time.monotonic(), []
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            time.sleep(5)
        minutes: dict[int, float] = {}
        for t, rss in samples:
            minutes[int(t // 60)] = max(minutes.get(int(t // 60), 0.0), rss)
        emit("world_model_run_peak_rss", max(r for _, r in samples), "MiB",
             seconds=seconds, rc=proc.returncode,
             peak_by_minute=[round(v, 1) for _, v in sorted(minutes.items())], **ctx)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run every arm over seeds and print the comparison."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--every", type=int, default=25_600, help="real env steps per checkpoint")
    p.add_argument("--max-env-steps", type=int, default=600_000)
    p.add_argument("--time-limit", type=float, default=300.0, help="wall seconds cap a run")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                   help="native-spread arms (none, with --slow: only the slow path)")  # fmt: skip
    p.add_argument("--slow", action="store_true", help="also the PettingZoo path, two arms")
    p.add_argument("--slow-seeds", type=int, default=2, help="seeds of each slow arm")
    p.add_argument("--slow-max-env-steps", type=int,
                   help="real env steps cap of a slow run (default: --max-env-steps)")  # fmt: skip
    p.add_argument("--memory", type=float, metavar="SECONDS",
                   help="only: peak RSS of one spread-gnn-wm run this long")  # fmt: skip
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm, e.g. world_model.ratio=3")  # fmt: skip
    args = p.parse_args(argv)
    ctx: dict[str, Any] = {"machine": platform.machine(), "overrides": args.overrides}
    if args.memory:
        memory(args.memory, ctx, args.overrides)
        return
    for name, value in baseline_returns().items():
        emit(f"mpe2_spread_{name}_team_return", value, "team_return", **ctx)
    medians: dict[str, float] = {}
    for arm in args.arms:
        preset, extra = ARMS[arm]
        out = run_arm(arm, preset, extra, args, ctx)
        reached = [r["reach"]["env_steps"] for r in out["runs"] if r["reach"]["env_steps"]]
        medians[arm] = _median(reached)
    if "model_free" in medians and "world_model" in medians:
        gain = medians["model_free"] / medians["world_model"]
        oracle = medians.get("oracle")
        emit("spread_sample_efficiency_gain", gain, "ratio",
             oracle_gain=oracle and medians["model_free"] / oracle, **ctx)  # fmt: skip
    if args.slow:
        cap = args.slow_max_env_steps or args.max_env_steps
        slow = argparse.Namespace(**{**vars(args), "seeds": args.slow_seeds, "max_env_steps": cap})
        slow_medians: dict[str, dict[str, float]] = {}
        for arm, (preset, extra) in SLOW_ARMS.items():
            out = run_arm(arm, preset, ["run.eval_every_s=null", *extra], slow, ctx)
            slow_medians[arm] = {
                key: _median([r["reach"][key] for r in out["runs"] if r["reach"][key]])
                for key in ("env_steps", "seconds")
            }
        free, model = slow_medians["slow_model_free"], slow_medians["slow_world_model"]
        emit("pettingzoo_spread_sample_efficiency_gain", free["env_steps"] / model["env_steps"],
             "ratio", wall_time_ratio=model["seconds"] / free["seconds"], **ctx)  # fmt: skip


if __name__ == "__main__":
    main()
