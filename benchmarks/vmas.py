"""VMAS through shoal's adapter: what the adapter costs, and training speed on a scenario.

Run ``python -m benchmarks.vmas`` (needs ``pip install vmas``). For each scenario, random-action
env-steps/s of VMAS called directly and of the same worlds through ``envs.make("vmas:...")``,
measured in turns in the same run; then ``spread-gnn`` settings trained on
``vmas:navigation`` for ``--seconds``, and ``spread-gnn-swarm``'s (k-nearest edges, a graph
critic) on ``vmas:discovery`` with ``--swarm-agents`` agents (half as many targets, each
found when two agents reach it), given ``--swarm-seconds``. One JSON line per result.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

import envs
from benchmarks.spread import emit, steps_per_s
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

SCENARIOS = ("navigation", "balance", "transport")
SWARM_AGENTS = 24


def adapter_overhead(scenario: str, num_envs: int, seconds: float) -> None:
    """Direct VMAS and the adapter, alternating three times; the best of each."""
    import vmas

    raw = vmas.make_env(scenario, num_envs=num_envs, seed=0, continuous_actions=False)
    raw.reset()
    wrapped = envs.make(f"vmas:{scenario}", num_envs=num_envs, seed=0, max_steps=None)
    gen = torch.Generator().manual_seed(0)
    n = len(raw.agents)

    def direct() -> None:
        # As any VMAS loop must: reset the worlds that finished, one index at a time.
        *_, dones, _ = raw.step([torch.randint(9, (num_envs,), generator=gen) for _ in range(n)])
        for i in dones.nonzero().flatten().tolist():
            raw.reset_at(i)

    def adapted() -> None:
        wrapped.step(wrapped.random_actions(gen))

    best = {"direct": 0.0, "adapter": 0.0}
    for _ in range(3):
        best["direct"] = max(best["direct"], steps_per_s(direct, num_envs, seconds))
        best["adapter"] = max(best["adapter"], steps_per_s(adapted, num_envs, seconds))
    emit(
        f"vmas_{scenario}_adapter_env_steps_per_s",
        best["adapter"],
        "env_steps/s",
        direct=round(best["direct"], 1),
        vs_direct=round(best["adapter"] / best["direct"], 3),
        num_envs=num_envs,
        n_agents=n,
    )


def training(
    seconds: float,
    num_envs: int,
    scenario: str = "navigation",
    preset: str = "spread-gnn",
    overrides: tuple[str, ...] = ("model.edges=knn", "model.k=3"),
    scenario_kwargs: dict[str, int] | None = None,
) -> None:
    """A preset's settings on a VMAS scenario: env-steps/s, the training episodes' team return
    at the end and the last checkpoint's over 100 fresh episodes, next to random actions' over
    one 100-step episode of the same worlds."""
    kwargs: dict[str, Any] = dict(scenario_kwargs or {})
    cfg = load_config(
        preset,
        [
            f"env.name=vmas:{scenario}",
            "env.max_cycles=100",
            f"env.num_envs={num_envs}",
            *(f"env.kwargs.{k}={v}" for k, v in kwargs.items()),
            *overrides,
            f"train.time_limit_s={seconds}",
            "train.total_env_steps=1000000000",
            "run.progress=false",
            "redis.enabled=false",
        ],
    )
    env = envs.make(f"vmas:{scenario}", num_envs=num_envs, seed=1, max_steps=100, **kwargs)
    gen = torch.Generator().manual_seed(1)
    random_return = torch.zeros(num_envs)
    for _ in range(100):  # one whole episode of every world
        random_return += env.step(env.random_actions(gen)).reward.sum(-1)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        summary = run_training(cfg, Path(tmp))
        # The run's last checkpoint on 100 fresh episodes of the same scenario (its periodic
        # evaluation is capped at 10 % of the run, so on a slow env ``best`` can be old).
        evaluated = evaluate(tmp, episodes=100, which="latest")
    emit(
        f"vmas_{scenario}_train_env_steps_per_s",
        summary["steps_this_session"] / summary["train_seconds"],
        "env_steps/s",
        preset=preset,
        n_agents=env.n_agents,
        num_envs=num_envs,
        train_seconds=round(summary["train_seconds"], 1),
        team_return=round(summary["metrics"]["episode_return"], 3),
        evaluated_team_return=round(evaluated["mean"], 3),
        evaluated_stderr=round(evaluated["stderr"], 3),
        random_team_return=round(float(random_return.mean()), 3),
    )


def main(argv: list[str] | None = None) -> None:
    """Run the VMAS benchmarks."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-envs", type=int, default=512)
    p.add_argument("--seconds", type=float, default=60.0, help="training time")
    p.add_argument("--swarm-agents", type=int, default=SWARM_AGENTS, help="discovery team size")
    p.add_argument("--swarm-seconds", type=float, default=300.0, help="swarm training time")
    args = p.parse_args(argv)
    if args.swarm_agents < 2:
        p.error(
            f"--swarm-agents {args.swarm_agents}: discovery needs at least 2 agents "
            "(2 must reach a target to find it)"
        )
    for scenario in SCENARIOS:
        adapter_overhead(scenario, args.num_envs, seconds=2.0)
    training(args.seconds, args.num_envs)
    # A swarm: spread-gnn-swarm's graph policy and critic (k-nearest edges) covering targets.
    n = args.swarm_agents
    training(
        args.swarm_seconds,
        max(1, 1536 // n),
        scenario="discovery",
        preset="spread-gnn-swarm",
        overrides=(),
        scenario_kwargs={"n_agents": n, "n_targets": max(1, n // 2), "agents_per_target": 2},
    )


if __name__ == "__main__":
    main()
