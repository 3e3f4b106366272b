"""Swarm scale: what training costs as the team grows, and how policies carry across sizes.

Run ``python -m benchmarks.scale`` (throughput for N in 3..96), ``--only learning`` (a 12-agent
run against a 3-agent run given a quarter of its wall clock) or ``--only generalisation``
(a policy trained at N=6, evaluated at 6, 12 and 24 next to random and next to policies
trained at those sizes). Every result is one JSON line (see ``benchmarks.spread.emit``).

Throughput keeps the agents stepped per call constant (``--agents-per-step``, 1536 by
default: ``spread-gnn``'s 512 worlds of 3), so agent-steps/s compares like with like; each
(policy, N) is measured in a fresh process (its peak memory is its own) with the classes
``shoal run`` trains with (``RolloutWorker``, ``Learner``), without evaluation or checkpoints.
The policies:

- ``spread-gnn``: the preset (complete edges, an MLP critic on the global state), up to the
  size where that critic is sensible (its input grows as N², its cost per world as N³);
- ``spread-gnn-swarm``: k-nearest edges (k=4) and a graph critic, at every size;
- ``spread-transformer``: full attention and an MLP critic, as far as ``spread-gnn``;
- ``spread-transformer-full``: full attention and a transformer critic, at every size;
- ``spread-transformer-local``: attention over the 4 nearest entities and a transformer
  critic, at every size.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from benchmarks.spread import emit, steps_per_s

if TYPE_CHECKING:
    from envs.spread import SpreadEnv

SIZES = (3, 6, 12, 24, 48, 96)
#: policy name -> (preset, overrides, largest N it is measured at)
POLICIES: dict[str, tuple[str, list[str], int]] = {
    "spread-gnn": ("spread-gnn", [], 24),
    "spread-gnn-swarm": ("spread-gnn-swarm", [], 96),
    "spread-transformer": ("spread-transformer", [], 24),
    "spread-transformer-full": ("spread-transformer", ["model.critic_kind=transformer"], 96),
    "spread-transformer-local": (
        "spread-transformer",
        ["model.edges=knn", "model.k=4", "model.critic_kind=transformer"],
        96,
    ),
}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure_one(
    policy: str, n_agents: int, num_envs: int, iterations: int, threads: int | None
) -> dict[str, Any]:
    """Train ``policy`` at ``n_agents`` for ``iterations`` (after one unmeasured) in-process."""
    from agents.ppo import Learner
    from agents.rollout import RolloutWorker
    from orchestrator.config import load_config

    if threads:
        torch.set_num_threads(threads)
    preset, overrides, _ = POLICIES[policy]
    cfg = load_config(preset, [*overrides, f"env.n_agents={n_agents}", f"env.num_envs={num_envs}"])
    base_rss = _peak_rss_mib()
    env = cfg.env.make(num_envs, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    worker = RolloutWorker(env, model, cfg.train.rollout_len, seed=0)
    learner = Learner(model, cfg.train)
    collect_s = update_s = 0.0
    steps = 0
    for it in range(iterations + 1):
        t0 = time.perf_counter()
        batch = worker.collect()
        t1 = time.perf_counter()
        learner.update(batch)
        t2 = time.perf_counter()
        if it:  # the first iteration warms allocators and caches
            collect_s += t1 - t0
            update_s += t2 - t1
            steps += batch.env_steps
    total = collect_s + update_s
    # The env alone, as the rollout worker steps it (only the fields the policy reads).
    raw = steps_per_s(lambda: env.step(env.random_actions()), num_envs, 2.0)
    return {
        "env_steps_per_s": steps / total,
        "agent_steps_per_s": steps * n_agents / total,
        "collect_share": collect_s / total,
        "collect_s_per_iter": collect_s / iterations,
        "update_s_per_iter": update_s / iterations,
        "raw_env_steps_per_s": raw,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_above_start_mib": _peak_rss_mib() - base_rss,
        "input_keys": sorted(model.input_keys),
    }


def raw_env(n_agents: int, num_envs: int, graph_only: bool) -> float:
    """Random-action env-steps/s of native spread, with or without mpe2's per-agent vectors."""
    import envs

    env = envs.make("spread", num_envs=num_envs, n_agents=n_agents, seed=0)
    if graph_only:
        env.restrict_observation(frozenset({"nodes", "node_pos", "node_mask", "alive"}))
    env.reset()
    return steps_per_s(lambda: env.step(env.random_actions()), num_envs, 2.0)


def throughput(
    sizes: list[int], agents_per_step: int, iterations: int, threads: int | None
) -> None:
    """One line per (policy, N) and per N for the raw env; each run in its own process."""
    for n in sizes:
        b = max(1, agents_per_step // n)
        for graph_only in (False, True):
            name = "raw_env_graph_only" if graph_only else "raw_env_full_obs"
            value = raw_env(n, b, graph_only)
            emit(f"scale_{name}_env_steps_per_s", value, "env_steps/s", n_agents=n, num_envs=b)
        for policy, (_, _, largest) in POLICIES.items():
            if n > largest:
                continue
            cmd = [sys.executable, "-m", "benchmarks.scale", "--one", policy, str(n), str(b)]
            cmd += ["--iterations", str(iterations)]
            if threads:
                cmd += ["--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
                emit(f"scale_{policy}_failed", float("nan"), "", n_agents=n, error=tail)
                continue
            res = json.loads(out.stdout.strip().splitlines()[-1])
            keys = res.pop("input_keys")
            value = res.pop("agent_steps_per_s")
            emit(
                f"scale_{policy}_agent_steps_per_s",
                value,
                "agent_steps/s",
                n_agents=n,
                num_envs=b,
                **{k: round(v, 4) for k, v in res.items()},
                reads=keys,
            )


def _train(preset: str, overrides: list[str], seconds: float, root: Path) -> Path:
    from orchestrator.config import load_config
    from orchestrator.runtime.driver import run_training

    cfg = load_config(
        preset,
        [
            *overrides,
            f"train.time_limit_s={seconds}",
            "train.total_env_steps=1000000000",
            "run.progress=false",
            "redis.enabled=false",
        ],
    )
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    run_training(cfg, run_dir)
    return run_dir


def _native_episodes(
    n_agents: int, episodes: int, plan: Callable[[SpreadEnv], Callable[[], Tensor]]
) -> dict[str, float]:
    """Team return over one whole episode of ``episodes`` native spread worlds.

    ``plan`` sees the worlds once, reset, and returns what acts at every step.
    """
    import envs
    from envs.spread import SpreadEnv

    env = envs.make("spread", num_envs=episodes, n_agents=n_agents, seed=12345)
    assert isinstance(env, SpreadEnv)
    env.reset(seed=12345)
    act = plan(env)
    total = torch.zeros(episodes)
    for _ in range(env.max_episode_steps or 25):
        total += env.step(act()).reward.sum(-1)
    mean, stderr = float(total.mean()), float(total.std() / episodes**0.5)
    return {"team_return": mean, "stderr": stderr, "per_agent": mean / n_agents}


def _eval(run_dir: Path | None, n_agents: int, episodes: int) -> dict[str, float]:
    """Mean team return at ``n_agents`` on native spread (``None``: uniformly random)."""
    if run_dir is None:
        gen = torch.Generator().manual_seed(12345)
        return _native_episodes(n_agents, episodes, lambda env: lambda: env.random_actions(gen))
    from orchestrator.cli.evaluate import evaluate

    res = evaluate(run_dir, env_name="spread", n_agents=n_agents, episodes=episodes)
    mean, stderr = res["mean"], res["stderr"]
    return {"team_return": mean, "stderr": stderr, "per_agent": mean / n_agents}


def _assignment(n_agents: int, episodes: int) -> dict[str, float]:
    """Mean team return of a scripted reference on native spread: what a team can get.

    Each world's agents are matched to landmarks once, at the start (the assignment of least
    total distance, ``scipy.optimize.linear_sum_assignment``), and every step each agent takes
    the discrete action whose force, held for two steps, brings it nearest its landmark
    (mpe2's integrator, collisions ignored). Not optimal, but a per-N yardstick: the shared
    reward sums N landmarks' distances, so even this team's return per agent falls with N.
    """
    from scipy.optimize import linear_sum_assignment

    from envs.spread import _DISCRETE_U, DAMPING, DT, SENSITIVITY

    accel = (torch.tensor(_DISCRETE_U) * SENSITIVITY).view(1, 1, 5, 2)

    def plan(env: SpreadEnv) -> Callable[[], Tensor]:
        target = torch.empty_like(env.agent_pos)  # [B, N, 2]
        dist = torch.cdist(env.agent_pos, env.landmark_pos)  # [B, agent, landmark]
        for b in range(dist.shape[0]):
            rows, cols = linear_sum_assignment(dist[b].numpy())
            target[b, torch.as_tensor(rows)] = env.landmark_pos[b, torch.as_tensor(cols)]

        def act() -> Tensor:
            p, v = env.agent_pos.unsqueeze(2), env.agent_vel.unsqueeze(2)
            p = p + v * DT  # mpe2 moves with the old velocity, then accelerates
            for _step in range(2):
                v = v * (1.0 - DAMPING) + accel * DT
                p = p + v * DT
            return (p - target.unsqueeze(2)).norm(dim=-1).argmin(-1)  # [B, N]

        return act

    return _native_episodes(n_agents, episodes, plan)


def _size(n: int, agents_per_step: int) -> list[str]:
    return [f"env.n_agents={n}", f"env.num_envs={max(1, agents_per_step // n)}"]


def learning(seconds: float, agents_per_step: int, episodes: int, root: Path) -> None:
    """``spread-gnn-swarm`` at 3 agents for ``seconds`` and at 12 for 4x as long."""
    for n, budget in ((3, seconds), (12, 4 * seconds)):
        run = _train("spread-gnn-swarm", _size(n, agents_per_step), budget, root)
        trained, rand = _eval(run, n, episodes), _eval(None, n, episodes)
        scripted = _assignment(n, episodes)
        span = scripted["team_return"] - rand["team_return"]
        emit(
            "scale_learning_team_return_per_agent",
            trained["per_agent"],
            "return/agent",
            n_agents=n,
            train_seconds=budget,
            team_return=round(trained["team_return"], 3),
            stderr=round(trained["stderr"], 3),
            random_per_agent=round(rand["per_agent"], 3),
            # The shared reward sums N landmarks' distances: per agent and per landmark
            # is the figure that does not grow with N by construction.
            per_agent_per_landmark=round(trained["per_agent"] / n, 4),
            random_per_agent_per_landmark=round(rand["per_agent"] / n, 4),
            assignment_per_agent=round(scripted["per_agent"], 3),
            # Share of the way from random to the scripted assignment: comparable across N.
            gap_closed=round((trained["team_return"] - rand["team_return"]) / span, 3),
        )


def generalisation(
    seconds: float, agents_per_step: int, episodes: int, root: Path, train_at: int = 6
) -> None:
    """A policy trained at ``train_at`` agents, evaluated at 1x, 2x and 4x that size."""
    base = _train("spread-gnn-swarm", _size(train_at, agents_per_step), seconds, root)
    for n in (train_at, 2 * train_at, 4 * train_at):
        own = (
            base
            if n == train_at
            else _train("spread-gnn-swarm", _size(n, agents_per_step), seconds, root)
        )
        moved, native, rand = (
            _eval(base, n, episodes),
            _eval(own, n, episodes),
            _eval(None, n, episodes),
        )
        emit(
            "scale_generalisation_team_return",
            moved["team_return"],
            "return",
            trained_at=train_at,
            n_agents=n,
            train_seconds=seconds,
            stderr=round(moved["stderr"], 3),
            trained_at_this_n=round(native["team_return"], 3),
            trained_at_this_n_stderr=round(native["stderr"], 3),
            random=round(rand["team_return"], 3),
            assignment=round(_assignment(n, episodes)["team_return"], 3),
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n")[0]
    )
    p.add_argument("--only", choices=["throughput", "learning", "generalisation"])
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), metavar="N")
    p.add_argument("--agents-per-step", type=int, default=1536)
    p.add_argument("--iterations", type=int, default=3, help="measured iterations per size")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--seconds", type=float, default=60.0, help="training budget unit (learning)")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--one", nargs=3, metavar=("POLICY", "N", "NUM_ENVS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        policy, n, b = args.one[0], int(args.one[1]), int(args.one[2])
        print(json.dumps(measure_one(policy, n, b, args.iterations, args.threads)), flush=True)
        return
    unknown = [n for n in args.sizes if n < 1]
    if unknown:
        p.error(f"--sizes must be positive team sizes, got {unknown}")
    if args.only in (None, "throughput"):
        throughput(args.sizes, args.agents_per_step, args.iterations, args.threads)
    root = Path(tempfile.mkdtemp(prefix="shoal-scale-"))
    try:
        if args.only in (None, "learning"):
            learning(args.seconds, args.agents_per_step, args.episodes, root)
        if args.only in (None, "generalisation"):
            generalisation(2 * args.seconds, args.agents_per_step, args.episodes, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
