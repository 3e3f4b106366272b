"""Spread benchmarks: training throughput, the raw env ceiling, and time to a team return.

Run ``python -m benchmarks.spread`` (all) or ``python -m benchmarks.spread --only throughput``.
Every result is one JSON line: ``name``, ``value``, ``unit`` plus context; references (raw env
speed, random and no-op returns) are measured in the same run on the same machine.

``--set`` overrides apply to every preset; overrides that need Ray (``rollout.num_workers``,
``learner.num_ranks``) train through Ray and Redis exactly as ``shoal run`` does, e.g.
``--presets spread-gnn --only learning --set rollout.num_workers=2 learner.num_ranks=2
env.num_envs=256`` (``env.num_envs`` is per rollout worker).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import envs
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import load_config, preset_names
from orchestrator.runtime.checkpoint import list_checkpoints
from orchestrator.runtime.driver import run_training, runs_on_ray

TARGET_RETURN = -45.0
# Ray's per-worker logs and dashboard stay off while benchmarking.
RAY_QUIET = ["ray.log_to_driver=false", "ray.include_dashboard=false"]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def emit(name: str, value: float, unit: str, **context: Any) -> None:
    """Print one result line: strict JSON, so a value that is not a number reads as null."""
    context.setdefault("host_cpus", os.cpu_count())
    context.setdefault("torch", torch.__version__)
    line = {"name": name, "value": round(value, 4), "unit": unit, **context}
    print(json.dumps({k: _finite(v) for k, v in line.items()}, allow_nan=False), flush=True)


def steps_per_s(step: Callable[[], object], num_envs: int, seconds: float) -> float:
    """env-steps/s of calling ``step`` (one step of ``num_envs`` worlds) for ``seconds``,
    after five unmeasured calls."""
    for _ in range(5):
        step()
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        steps += num_envs
    return steps / (time.perf_counter() - t0)


def raw_env_steps_per_s(num_envs: int, n_agents: int = 3, seconds: float = 3.0) -> float:
    """Random-action env-steps/s of the native spread env at batch ``num_envs``."""
    env = envs.make("spread", num_envs=num_envs, n_agents=n_agents, seed=0)
    env.reset()
    return steps_per_s(lambda: env.step(env.random_actions()), num_envs, seconds)


Policy = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
"""Observations ``[B, N, D]`` and a generator to discrete actions ``[B, N]``."""


def team_returns(act: Policy, episodes: int = 100, seed: int = 12345) -> torch.Tensor:
    """Team returns of ``episodes`` full episodes of real mpe2 simple_spread_v3 (N=3)."""
    env = envs.make("mpe2-spread", num_envs=episodes, n_agents=3, seed=seed)
    obs = env.reset(seed=seed).obs
    total = torch.zeros(episodes)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(25):
        step = env.step(act(obs, gen))
        total += step.reward.sum(-1)
        obs = step.observation.obs
    return total


def baseline_returns(episodes: int = 100, seed: int = 12345) -> dict[str, float]:
    """Random and no-op mean team returns on real mpe2 simple_spread_v3 (N=3)."""
    policies: dict[str, Policy] = {
        "random": lambda obs, gen: torch.randint(5, obs.shape[:2], generator=gen),
        "noop": lambda obs, gen: torch.zeros(obs.shape[:2], dtype=torch.long),
    }
    return {name: float(team_returns(act, episodes, seed).mean()) for name, act in policies.items()}


def train_and_evaluate(
    preset: str,
    time_limit: float | None,
    overrides: list[str],
    eval_episodes: int = 100,
    inspect: Callable[[Path], None] | None = None,
    env_steps: int | None = None,
    eval_every_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``preset`` for ``time_limit`` wall seconds or ``env_steps``, then evaluate.

    Checkpoints fall every ``eval_every_steps`` env steps when given, else every 10 s; each
    is evaluated afterwards on real mpe2, so evaluation never eats into training time. Every
    iteration's training return is kept too (``train``: ``env_steps`` and ``episode_return``
    pairs from the run's ``metrics.csv``).
    """
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    try:
        common = [
            f"train.total_env_steps={env_steps or 1_000_000_000}",
            "run.keep_checkpoints=1000",
            "run.progress=false",
            "run.log_every_s=1e-9",  # a metrics row every iteration
            *([f"train.time_limit_s={time_limit}"] if time_limit else []),
            *(
                [f"run.checkpoint_every_steps={eval_every_steps}", "run.checkpoint_every_s=1e9"]
                if eval_every_steps
                else ["run.checkpoint_every_s=10"]
            ),
        ]
        distributed = runs_on_ray(load_config(preset, overrides))
        extra = RAY_QUIET if distributed else ["redis.enabled=false"]
        cfg = load_config(preset, [*common, *extra, *overrides])
        t0 = time.perf_counter()
        run_dir = tmp / "run"
        run_dir.mkdir()
        summary = run_training(cfg, run_dir)
        if summary["reason"] == "interrupted":  # Ctrl-C ends the benchmark, not just this run
            raise KeyboardInterrupt
        # Building envs and model (and on Ray starting its processes): not training time.
        setup_s = time.perf_counter() - t0 - summary["train_seconds"]
        evals = []
        for ckpt in list_checkpoints(run_dir / "checkpoints"):
            res = evaluate(ckpt, episodes=eval_episodes)
            evals.append(
                {
                    "wall_time": res["wall_time"],
                    "env_steps": res["env_steps"],
                    "mean": res["mean"],
                    "stderr": res["stderr"],
                    "returns": res["returns"],
                }
            )
        reached = next((e for e in evals if e["mean"] >= TARGET_RETURN), None)
        if inspect is not None:  # e.g. the world-model benchmark's k-step errors
            inspect(run_dir)
        best = run_dir / "checkpoints" / "best"  # kept by the run's own periodic evaluation
        best_eval = evaluate(best, episodes=eval_episodes) if best.is_dir() else None
        with open(run_dir / "metrics.csv", newline="") as fh:
            train = [
                (float(r["env_steps"]), float(r["episode_return"] or "nan"))
                for r in csv.DictReader(fh)
            ]
        return {
            "best": best_eval and {k: best_eval[k] for k in ("env_steps", "wall_time", "mean")},
            "cfg": cfg,
            "summary": summary,
            "setup_s": setup_s,
            "evals": evals,
            "train": train,
            "reached": reached,
            "sps": summary["steps_this_session"] / summary["train_seconds"],
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """Run the spread benchmarks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=preset_names())
    p.add_argument("--time-limit", type=float, default=120.0)
    p.add_argument("--only", choices=["throughput", "learning"], help="a subset")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to every preset",
    )
    args = p.parse_args(argv)
    ctx = {"machine": platform.machine()}

    if args.only != "throughput":
        for name, value in baseline_returns().items():
            emit(f"mpe2_spread_{name}_team_return", value, "team_return", episodes=100, **ctx)

    for preset in args.presets:
        cfg = load_config(preset, args.overrides)
        b = cfg.env.num_envs
        ceiling = raw_env_steps_per_s(b, cfg.env.n_agents)
        emit(f"{preset}_raw_env_steps_per_s", ceiling, "env_steps/s", num_envs=b, **ctx)
        limit = 20.0 if args.only == "throughput" else args.time_limit
        res = train_and_evaluate(preset, limit, args.overrides)
        emit(
            f"{preset}_train_env_steps_per_s",
            res["sps"],
            "env_steps/s",
            num_envs=b,
            fraction_of_raw_env=round(res["sps"] / ceiling, 4),
            train_seconds=round(res["summary"]["train_seconds"], 1),
            setup_seconds=round(res["setup_s"], 2),
            rollout_workers=cfg.rollout.num_workers,
            learner_ranks=cfg.learner.num_ranks,
            max_staleness=cfg.rollout.max_staleness,
            **ctx,
        )
        if args.only == "throughput":
            continue
        for e in res["evals"]:
            emit(f"{preset}_eval_team_return", e["mean"], "team_return", **e, **ctx)
        reached = res["reached"]
        emit(
            f"{preset}_seconds_to_team_return_-45",
            reached["wall_time"] if reached else float("nan"),
            "s",
            reached=reached is not None,
            best_return=max(e["mean"] for e in res["evals"]),
            time_limit_s=args.time_limit,
            **ctx,
        )


if __name__ == "__main__":
    main()
