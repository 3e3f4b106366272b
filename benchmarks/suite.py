"""The field's suites in one table: shoal's evaluated return per task at fixed env-step marks.

``python -m benchmarks.suite --tasks lbf_8x8_2p_2f_coop smax_3m --seeds 3`` trains each
task's preset for its env-step budget per seed (tasks in turn; run one task per invocation to
keep tasks in separate runs), evaluates every checkpoint on 100 episodes of the task's own env,
and prints JSON lines: random and no-op references (same run), the IQM [95 % CI] over seeds
at every mark, each seed's largest fall below its best so far (stability), env-steps/s and
wall seconds, and the published figure this task is compared with where one is cited
(``published``: what, where, at what budget; ``None`` where no figure was checked).
``--budget-scale`` shortens every budget (a smoke run; the marks move).
Peers run on the same machine after shoal's arms, for the same wall clock a seed: JaxMARL's
recurrent MAPPO on SMAX (``--jaxmarl-repo``), EPyMARL's MAPPO on LBF/rware
(``--epymarl-repo``), BenchMARL's MASAC on VMAS balance (``--benchmarl-python``; or to
``--benchmarl-env-steps``, the same env steps as shoal's arms), each in its own Python
environment.

Returns are what each env gives summed over the agents (LBF: 1.0 when every food is loaded;
rware: deliveries per 500-step episode; SMAX: each ally's team reward, damage dealt plus 1.0
for a win, summed over the allies; VMAS and MPE: their team returns).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.spread import emit, train_and_evaluate
from benchmarks.stats import largest_drop
from benchmarks.world_model import reference_returns, summarize


@dataclass(frozen=True)
class Task:
    """One row: its preset (and overrides), env-step budget, checkpoint spacing, the figure it
    is compared with."""

    preset: str
    overrides: list[str] = field(default_factory=list)
    budget: int = 1_000_000
    every: int = 100_000
    what: str = "team return"
    published: str | None = None
    # SMAX: a won battle gives each ally 1.0 for the enemies' health and the 1.0 win bonus, a
    # lost or drawn one at most the 1.0, so a team return above 1.5 per ally is a win.
    win_above: float | None = None
    jaxmarl_map: str | None = None  # the map JaxMARL's own MAPPO trains on as the peer
    epymarl_key: str | None = None  # the env EPyMARL's own MAPPO trains on as the peer
    epymarl_time_limit: int = 50  # its episode limit (the paper's: LBF 50, RWARE 500)
    # The preset each replay-learner arm (--algorithms qmix/vdn/masac/isac) starts from.
    replay_presets: dict[str, str] = field(default_factory=dict)
    # The VMAS task BenchMARL's own MASAC runs as the peer (benchmarks/peers/benchmarl_masac.py).
    benchmarl_task: str | None = None


def _lbf(task_id: str) -> list[str]:
    return [f"env.name=lbf:{task_id}"]


# Budgets: about 10 minutes a seed on 2 cores at each preset's measured speed.
TASKS: dict[str, Task] = {
    "lbf_8x8_2p_2f_coop": Task(
        "lbf-8x8-2p-2f-coop", budget=2_000_000, every=200_000,
        what="team return, LBF 2.0 Foraging-8x8-2p-2f-coop-v3 (1.0 = every food loaded)",
        epymarl_key="lbforaging:Foraging-8x8-2p-2f-coop-v3",
        replay_presets=dict.fromkeys(("qmix", "vdn"), "lbf-8x8-2p-2f-coop-qmix"),
        published="EPyMARL (Papoudakis et al., NeurIPS 2021 D&B), MAPPO with parameter "
        "sharing, Table 3 (maximum returns over 20M steps, LBF v1): not checked here",
    ),
    "lbf_2s_8x8_2p_2f_coop": Task(
        "lbf-8x8-2p-2f-coop", _lbf("Foraging-2s-8x8-2p-2f-coop-v3"), 2_000_000, 200_000,
        "team return, LBF 2.0 Foraging-2s-8x8-2p-2f-coop-v3 (sight 2)",
        epymarl_key="lbforaging:Foraging-2s-8x8-2p-2f-coop-v3",
    ),
    "lbf_10x10_3p_3f": Task(
        "lbf-8x8-2p-2f-coop", _lbf("Foraging-10x10-3p-3f-v3"), 2_000_000, 200_000,
        "team return, LBF 2.0 Foraging-10x10-3p-3f-v3",
        epymarl_key="lbforaging:Foraging-10x10-3p-3f-v3",
    ),
    "rware_tiny_2ag": Task(
        "rware-tiny-2ag", budget=6_000_000, every=1_000_000,
        what="deliveries per 500-step episode, rware 2.0 rware-tiny-2ag-v2",
        epymarl_key="rware:rware-tiny-2ag-v2", epymarl_time_limit=500,
        published="EPyMARL, MAPPO, Table 3 (40M steps, rware v1): not checked here",
    ),
    "rware_tiny_4ag": Task(
        "rware-tiny-2ag", ["env.name=rware:rware-tiny-4ag-v2"], 6_000_000, 1_000_000,
        "deliveries per 500-step episode, rware 2.0 rware-tiny-4ag-v2",
    ),
    "smax_3m": Task(
        "smax-3m", budget=5_000_000, every=500_000,
        what="allies' summed team reward, SMAX 3m vs the heuristic enemy (JaxMARL 0.2)",
        published="JaxMARL (Rutherford et al.) trains recurrent MAPPO 10M steps on SMAX; "
        "no 3m figure was found in its report",
        win_above=4.5, jaxmarl_map="3m",
        replay_presets=dict.fromkeys(("qmix", "vdn"), "smax-3m-qmix"),
    ),
    "smax_2s3z": Task(
        "smax-3m", ["env.name=jaxmarl:smax:2s3z"], 5_000_000, 500_000,
        "allies' summed team reward, SMAX 2s3z vs the heuristic enemy (JaxMARL 0.2)",
        win_above=7.5, jaxmarl_map="2s3z",
        replay_presets=dict.fromkeys(("qmix", "vdn"), "smax-3m-qmix"),
    ),
    "vmas_balance": Task(
        "navigation-wm",
        ["env.name=vmas:balance", "env.continuous_actions=true", "world_model.enabled=false"],
        3_000_000, 300_000, "team return, VMAS balance (continuous 2-D forces)",
        replay_presets=dict.fromkeys(("masac", "isac"), "balance-masac"),
        benchmarl_task="balance",
    ),
    "vmas_transport": Task(
        "navigation-wm",
        ["env.name=vmas:transport", "env.continuous_actions=true", "env.max_cycles=100",
         "world_model.enabled=false"],
        3_000_000, 300_000,
        "team return, VMAS transport (4 agents push a package of mass 50; 100-step episodes)",
        replay_presets=dict.fromkeys(("masac", "isac"), "balance-masac"),
        benchmarl_task="transport",
    ),
    "mpe_spread": Task(
        "spread-mlp", [], 3_000_000, 300_000, "team return, spread (N=3)",
        replay_presets=dict.fromkeys(("masac", "isac"), "spread-mlp-masac"),
    ),
    "spread_gnn": Task("spread-gnn", [], 1_000_000, 100_000, "team return, spread (N=3), GNN"),
    "cue": Task(
        "spread-mlp", ["env.name=cue", "env.n_agents=2", "env.max_cycles=4", "env.num_envs=64",
                       "train.rollout_len=16", "train.minibatches=2", "model.hidden=32"],
        60_000, 10_000, "team return, cue (2 agents, 4 choices, 4 steps: chance 0.5, best 2.0)",
    ),
    "mpe_tag": Task("tag-mlp", [], 3_000_000, 300_000, "team return of each side, tag"),
}  # fmt: skip


def run_task(name: str, task: Task, args: argparse.Namespace, ctx: dict[str, Any]) -> None:
    """The random and no-op references, then every arm of one task (``--memory``)."""
    overrides = [*task.overrides, *args.overrides]
    budget = max(task.every, int(task.budget * args.budget_scale))
    line = {**ctx, "task": name, "what": task.what, "budget": budget}
    for ref, value in reference_returns(task.preset, overrides).items():
        emit(f"{name}_{ref}_return", value, "return", **line)
    done = {}
    for (arm, sets), memory, algorithm in itertools.product(
        args.arms or [(None, [])], args.memory or [None], args.algorithms or [None]
    ):
        label, extra, preset = name, list(sets), task.preset
        if arm is not None:
            label = f"{label}_{arm}"
        if memory is not None:
            label, extra = f"{label}_memory_{memory}", [*extra, f"model.memory={memory}"]
        if algorithm is not None:
            label = f"{label}_{algorithm}"
            if algorithm != "ppo":
                if algorithm not in task.replay_presets:
                    raise SystemExit(f"--algorithms {algorithm}: task {name} has no preset "
                                     f"for {algorithm} (Task.replay_presets)")  # fmt: skip
                preset = task.replay_presets[algorithm]
                extra = [*extra, f"train.algorithm={algorithm}"]
        arm_line = {
            **line,
            "memory": memory or "preset",
            "algorithm": algorithm or "preset",
            "arm": arm or "preset",
            "arm_sets": sets,
        }
        done[label] = run_arm(label, task, extra, args, arm_line, preset)
    if task.jaxmarl_map and args.jaxmarl_repo:
        # The peer gets the longest arm's median wall clock a seed.
        seconds = max(total for total, _, _ in done.values())
        peer_sps = peer_jaxmarl(name, task.jaxmarl_map, seconds, args, line)
        for label, (_, sps, _) in done.items():
            emit(f"{label}_throughput_vs_jaxmarl", sps / peer_sps, "ratio", **line)
    if task.epymarl_key and args.epymarl_repo:
        seconds = max(total for total, _, _ in done.values())
        peer_sps = peer_epymarl(name, task, seconds, args, line)
        for label, (_, sps, _) in done.items():
            emit(f"{label}_throughput_vs_epymarl", sps / peer_sps, "ratio", **line)
    if task.benchmarl_task and args.benchmarl_python:
        # The peer trains as long as the longest arm's training loop ran a seed (setup and
        # evaluation excluded on both sides), or to --benchmarl-env-steps.
        seconds = max(train for _, _, train in done.values())
        peer_sps = peer_benchmarl(name, task.benchmarl_task, seconds, args, line)
        for label, (_, sps, _) in done.items():
            emit(f"{label}_throughput_vs_benchmarl", sps / peer_sps, "ratio", **line)


def peer_benchmarl(
    name: str, vmas_task: str, seconds: float, args: argparse.Namespace, line: dict[str, Any]
) -> float:
    """BenchMARL's own MASAC on a VMAS task (continuous) for ``seconds`` of training a seed.

    With ``args.benchmarl_env_steps``, to that many env steps a seed instead (evaluated every
    30k, as shoal's arms are about every 30k).
    """
    speeds, finals = [], []
    budget = (["--max-env-steps", str(args.benchmarl_env_steps), "--eval-every", "30000"]
              if args.benchmarl_env_steps else
              ["--max-env-steps", "100000000", "--eval-every", "6000",
               "--seconds", f"{seconds:.1f}"])  # fmt: skip
    for seed in range(args.seeds):
        cmd = [args.benchmarl_python, "-m", "benchmarks.peers.benchmarl_masac",
               "--seeds", str(seed), *budget, "--continuous-actions",
               "--task", vmas_task]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise SystemExit(f"benchmarl peer failed: {out.stderr.strip().splitlines()[-1:]}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        recs = res["records"]
        speeds.append(res["env_steps_per_s"])
        finals.append(recs[-1]["team_return"])
        emit(f"{name}_benchmarl_masac_seed_run", finals[-1], "team return (its last eval)",
             seed=seed, env_steps=res["env_steps"], train_wall_s=res["train_wall_s"],
             env_steps_per_s=round(speeds[-1]), curve=[[r["env_steps"], r["train_wall_s"],
             round(r["team_return"], 3)] for r in recs], **line)  # fmt: skip
    per_seed = ({"env_steps_per_seed": args.benchmarl_env_steps} if args.benchmarl_env_steps
                else {"seconds_per_seed": round(seconds, 1)})  # fmt: skip
    emit(f"{name}_benchmarl_masac_env_steps_per_s", statistics.median(speeds), "env_steps/s",
         **per_seed, **line)  # fmt: skip
    emit(f"{name}_benchmarl_masac_final_return_median", statistics.median(finals), "return",
         seeds=finals, **line)  # fmt: skip
    return statistics.median(speeds)


def peer_epymarl(
    name: str, task: Task, seconds: float, args: argparse.Namespace, line: dict[str, Any]
) -> float:
    """EPyMARL's own MAPPO on the same env for the longest arm's median wall clock a seed."""
    from benchmarks.peers.epymarl import run

    assert task.epymarl_key is not None
    speeds, finals = [], []
    for seed in range(args.seeds):
        res = run(args.epymarl_repo, args.epymarl_python, task.epymarl_key,
                  task.epymarl_time_limit, seed, seconds)  # fmt: skip
        recs = res["records"]
        speeds.append(res["env_steps_per_s"])
        finals.append(recs[-1]["test_return"])
        emit(f"{name}_epymarl_mappo_seed_run", finals[-1], "test return (its last log)",
             seed=seed, env_steps=recs[-1]["env_steps"], wall_s=round(res["wall_s"], 1),
             env_steps_per_s=round(speeds[-1]), curve=[[r["env_steps"], r["wall_s"],
             r["test_return"]] for r in recs], **line)  # fmt: skip
    emit(f"{name}_epymarl_mappo_env_steps_per_s", statistics.median(speeds), "env_steps/s",
         seconds_per_seed=round(seconds, 1), **line)  # fmt: skip
    emit(f"{name}_epymarl_mappo_final_return_median", statistics.median(finals), "return",
         seeds=finals, **line)  # fmt: skip
    return statistics.median(speeds)


def run_arm(
    name: str,
    task: Task,
    extra: list[str],
    args: argparse.Namespace,
    line: dict[str, Any],
    preset: str | None = None,
) -> tuple[float, float, float]:
    """Every seed of one arm (from ``preset``, default the task's), then its summary lines.

    Returns:
        The median seconds a seed took (setup included), env-steps/s and training seconds.
    """
    budget = max(task.every, int(task.budget * args.budget_scale))
    every = max(1, int(task.every * args.budget_scale))
    overrides = [*task.overrides, *args.overrides, *extra]
    runs, speeds, walls, totals, wins, falls = [], [], [], [], [], []
    for seed in range(args.seeds):
        res = train_and_evaluate(
            preset or task.preset, None, [f"train.seed={seed}", *overrides],
            env_steps=budget, eval_every_steps=every,
        )  # fmt: skip
        final = res["evals"][-1]["mean"] if res["evals"] else math.nan
        falls.append(round(largest_drop([e["mean"] for e in res["evals"]]), 3))
        speeds.append(res["sps"])
        walls.append(res["summary"]["train_seconds"])
        totals.append(walls[-1] + res["setup_s"])
        runs.append({"evals": res["evals"], "reach": {"env_steps": None, "seconds": None}})
        more: dict[str, Any] = {}
        if task.win_above is not None:
            rates = [
                sum(r > task.win_above for r in e["returns"]) / len(e["returns"])
                for e in res["evals"]
            ]
            wins.append(rates[-1] if rates else math.nan)
            more["win_rates"] = [
                [e["env_steps"], round(w, 3)] for e, w in zip(res["evals"], rates, strict=True)
            ]
        emit(f"{name}_seed_run", final, "return", seed=seed, env_steps_per_s=round(res["sps"]),
             train_seconds=round(walls[-1], 1), setup_seconds=round(res["setup_s"], 1),
             returns=[[e["env_steps"], round(e["mean"], 3)] for e in res["evals"]],
             **more, **line)  # fmt: skip
    emit(f"{name}_env_steps_per_s", statistics.median(speeds), "env_steps/s", **line)
    emit(f"{name}_train_seconds", statistics.median(walls), "s", **line)
    # Stability: each seed's largest fall of the evaluated return below its best so far.
    emit(f"{name}_largest_fall", max(falls), "return", seeds=falls, **line)
    summarize(name, runs, every, budget, "return", line)
    if wins:
        emit(f"{name}_final_win_rate_median", statistics.median(wins), "win rate",
             seeds=wins, **line)  # fmt: skip
    emit(f"{name}_published", math.nan, "see text", published=task.published, **line)
    return statistics.median(totals), statistics.median(speeds), statistics.median(walls)


def peer_jaxmarl(
    name: str, map_name: str, seconds: float, args: argparse.Namespace, line: dict[str, Any]
) -> float:
    """JaxMARL's own recurrent MAPPO on the same map for shoal's median wall clock a seed
    (setup and compilation included on both sides)."""
    from benchmarks.peers.jaxmarl_mappo import run

    speeds, wins = [], []
    for seed in range(args.seeds):
        res = run(args.jaxmarl_repo, map_name, seed, seconds, 10_000_000)
        recs = res["records"]
        tail = recs[-max(1, len(recs) // 10) :]
        wins.append(sum(r["win_rate"] for r in tail) / len(tail))
        speeds.append(res["env_steps_per_s"])
        emit(f"{name}_jaxmarl_mappo_rnn_seed_run", wins[-1], "win rate (last tenth of updates)",
             seed=seed, env_steps=recs[-1]["env_steps"], wall_s=round(res["wall_s"], 1),
             first_update_s=res["first_update_s"], env_steps_per_s=round(speeds[-1]),
             curve=[[r["env_steps"], round(r["returns"], 3), round(r["win_rate"], 3)]
                    for r in recs[:: max(1, len(recs) // 20)]], **line)  # fmt: skip
    emit(f"{name}_jaxmarl_mappo_rnn_env_steps_per_s", statistics.median(speeds), "env_steps/s",
         seconds_per_seed=round(seconds, 1), **line)  # fmt: skip
    emit(f"{name}_jaxmarl_mappo_rnn_win_rate_median", statistics.median(wins), "win rate",
         seeds=[round(w, 3) for w in wins], **line)  # fmt: skip
    return statistics.median(speeds)


def _arm(text: str) -> tuple[str, list[str]]:
    label, _, sets = text.partition("=")
    if not label.isidentifier() or not sets or any("=" not in kv for kv in sets.split(",")):
        raise argparse.ArgumentTypeError(
            f"'{text}': an arm is LABEL=KEY=VALUE[,KEY=VALUE...], e.g. native=env.num_envs=32"
        )
    return label, sets.split(",")


def main(argv: list[str] | None = None) -> None:
    """Measure the named tasks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every task's env-step budget (and marks)")  # fmt: skip
    p.add_argument("--memory", nargs="+", choices=["none", "gru", "lstm"], default=None,
                   help="arms: each task once per model.memory value (default: the "
                   "preset's)")  # fmt: skip
    p.add_argument("--algorithms", nargs="+", choices=["ppo", "qmix", "vdn", "masac", "isac"],
                   default=None, help="arms: each task once per train.algorithm (a replay "
                   "learner starts from the task's preset for it; default: the "
                   "preset's)")  # fmt: skip
    p.add_argument("--arms", nargs="+", type=_arm, default=None, metavar="LABEL=KEY=VALUE,...",
                   help="arms: each task once per LABEL with its overrides (comma-separated), "
                   "e.g. package=env.name=gym:lbforaging:Foraging-8x8-2p-2f-coop-v3 "
                   "native=env.num_envs=32")  # fmt: skip
    p.add_argument("--jaxmarl-repo", type=Path, default=None,
                   help="a JaxMARL checkout: its own recurrent MAPPO runs on the SMAX tasks "
                   "for shoal's wall clock (benchmarks.peers.jaxmarl_mappo)")  # fmt: skip
    p.add_argument("--epymarl-repo", type=Path, default=None,
                   help="an EPyMARL checkout: its own MAPPO runs on the LBF/rware tasks for "
                   "shoal's wall clock (benchmarks.peers.epymarl)")  # fmt: skip
    p.add_argument("--epymarl-python", default="python",
                   help="the Python EPyMARL runs with (its own environment)")  # fmt: skip
    p.add_argument("--benchmarl-python", default=None,
                   help="the Python of an environment with benchmarl 1.5.2 and vmas: BenchMARL's "
                   "own MASAC runs on VMAS balance for shoal's training wall clock "
                   "(benchmarks.peers.benchmarl_masac)")  # fmt: skip
    p.add_argument("--benchmarl-env-steps", type=int, default=None, metavar="N",
                   help="BenchMARL's MASAC runs to N env steps a seed instead, evaluated "
                   "every 30k (the equal-sample comparison)")  # fmt: skip
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    ctx = {"machine": platform.machine()}
    for name in args.tasks:
        run_task(name, TASKS[name], args, ctx)


if __name__ == "__main__":
    main()
