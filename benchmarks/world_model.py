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

``--envs NAME ...`` measures any env instead (:data:`ENVS`: ``mpe2_spread``,
``speaker_listener``, ``tag``, ``navigation``, ``spread``), each env's arms interleaved seed by
seed in one run, envs one after another: the model-free arm (its preset with
``world_model.enabled=false``) and one arm per world-model architecture. Each env states its
target before measuring (about what model-free reaches at 2/3 of its budget) and its budget
of real env steps; every checkpoint (every ``every`` real steps) is evaluated on 100 seeded
episodes of the run's own env (1000 on tag, whose returns move in steps of 30), each with its
standard error. Per env: random and no-op returns (every agent uniformly random
/ the zero action; the agents that learn are summed), then per arm real env steps and wall
seconds to the target (median, range, seeds reached), the IQM [95 % CI] at every mark, each
seed's largest evaluated fall below its best so far, where an iteration's time goes (collect,
waiting for the fit, imagining, learning; seconds per iteration), and
``<env>_sample_efficiency_gain`` (model-free's median real steps to the target over the
arm's) with the wall-time ratio beside it. ``--env-arms ARM ...`` runs only those arms of each
env, beside its model-free reference.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.learning import at_mark
from benchmarks.spread import TARGET_RETURN, baseline_returns, emit, train_and_evaluate
from benchmarks.stats import bootstrap_ci, iqm, largest_drop
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


@dataclass(frozen=True)
class EnvBench:
    """One env's measurement: its preset (with a world model), arms, target and budget."""

    preset: str
    arms: dict[str, list[str]]  # the first arm is the reference (model-free)
    target: float
    max_env_steps: int
    every: int
    seeds: int
    time_limit: float  # wall seconds a run may take at most
    what: str  # what the return means
    # Episodes per evaluation: enough that a checkpoint's standard error stays well under the
    # stability statistic's 5 (tag's returns come in steps of 30 per tag).
    eval_episodes: int = 100


MODEL_FREE = ["world_model.enabled=false"]
OBSERVATION = ["world_model.architecture=observation"]
ENVS: dict[str, EnvBench] = {
    "mpe2_spread": EnvBench(
        "spread-gnn-wm-slow",
        {"model_free": MODEL_FREE, "observation": OBSERVATION,
         "observation_horizon_5": [*OBSERVATION, "world_model.horizon=5"],
         "observation_next_reward": [*OBSERVATION, "world_model.reward_from=next"],
         "observation_horizon_5_hidden_64": [*OBSERVATION, "world_model.horizon=5",
                                             "world_model.hidden=64"],
         "observation_horizon_5_hidden_128": [*OBSERVATION, "world_model.horizon=5",
                                              "world_model.hidden=128"]},
        -45.0, 409_600, 25_600, 3, 300.0, "team return, PettingZoo mpe2 simple_spread_v3 N=3",
    ),
    "speaker_listener": EnvBench(
        "speaker-listener-wm", {"model_free": MODEL_FREE, "observation": []},
        -35.0, 307_200, 25_600, 5, 300.0,
        "team return (speaker + listener, a group each), mpe2 simple_speaker_listener_v4",
    ),
    "tag": EnvBench(
        "tag-wm",
        {"model_free": MODEL_FREE, "observation": [],
         "observation_horizon_5": ["world_model.horizon=5"],
         "observation_ratio_6": ["world_model.ratio=6"]},
        120.0, 614_400, 51_200, 5, 300.0,
        "predators' team return against frozen prey, native tag (30 per tag: 120 = 4 tags)",
        eval_episodes=1000,
    ),
    "navigation": EnvBench(
        "navigation-wm",
        {"model_free": MODEL_FREE, "observation": [],
         "observation_horizon_15": ["world_model.horizon=15"]},
        9.0, 307_200, 25_600, 5, 300.0,
        "team return, VMAS navigation (discrete actions unless env.continuous_actions=true)",
    ),
    "spread": EnvBench(
        "spread-gnn-wm",
        {"model_free": MODEL_FREE, "entity": ["world_model.architecture=entity"],
         "entity_fit_process": ["world_model.architecture=entity", "world_model.fit_process=true"],
         "observation": OBSERVATION},
        -45.0, 460_800, 25_600, 3, 200.0, "team return, evaluated on mpe2 simple_spread_v3 N=3",
    ),
}  # fmt: skip


def reference_returns(
    preset: str, overrides: list[str], episodes: int = 100, seed: int = 12345
) -> dict[str, float]:
    """Mean return of uniformly random and of zero ("no-op") actions on a preset's env.

    Summed over the agents that learn (every agent, or those of groups with ``train``); every
    agent acts so, frozen groups too.
    """
    from orchestrator.config import load_config

    cfg = load_config(preset, overrides)
    env = cfg.env.make(episodes, seed, torch.device("cpu"))
    model = cfg.build_policy(env)
    groups = getattr(model, "groups", None)
    learn = [i for g in groups if g.train for i in g.agents] if groups else range(env.n_agents)
    out = {}
    for name in ("random", "noop"):
        gen = torch.Generator().manual_seed(seed)
        obs = env.reset(seed=seed).as_dict()
        total = torch.zeros(episodes, env.n_agents)
        done = torch.zeros(episodes, dtype=torch.bool)
        while not done.all():
            act = env.random_actions(gen)
            if "action_mask" in obs:  # agents with fewer actions than the widest: legal ones
                legal = obs["action_mask"].flatten(0, 1).float()
                act = torch.multinomial(legal, 1, generator=gen).view(act.shape)
            if name == "noop":
                act = torch.zeros_like(act)
                if env.action_kind != "discrete":
                    act = act.clamp(env.action_low, env.action_high)
            res = env.step(act)
            total += res.reward.float() * (~done).unsqueeze(-1)
            done |= res.done
            obs = res.observation.as_dict()
        out[name] = float(total[:, list(learn)].sum(-1).mean())
    env.close()
    return out


def _time_split(run_dir: Path, sink: dict[str, Any]) -> None:
    """Seconds per iteration: collecting, waiting for the fit, imagining, learning."""
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))

    def mean(key: str) -> float:
        values = [float(r[key]) for r in rows if r.get(key)]
        return sum(values) / len(values) if values else 0.0

    fit, imagine = mean("wm_fit_s"), mean("wm_imagine_s")
    # Why imagination ran or not: the share imagined, and the model's held-out 1-step errors
    # (in units of the targets' scale) over the run's last 5 scored rows, against max_error.
    scored = [r for r in rows if r.get("wm_holdout_reward_mse")][-5:]
    if scored:
        sink["imagined_share"] = round(mean("imagined_share"), 3)
        sink["holdout_last"] = {
            key: round(sum(float(r[f"wm_holdout_{key}"]) for r in scored) / len(scored), 3)
            for key in ("delta_mse", "reward_mse")
        }
    sink["split"] = {
        "collect_s": round(mean("collect_s"), 3),
        "fit_wait_s": round(fit, 3),
        "imagine_s": round(imagine, 3),
        "learn_s": round(mean("update_s") - fit - imagine, 3),
    }


def run_env(name: str, bench: EnvBench, args: argparse.Namespace, ctx: dict[str, Any]) -> None:
    """Every arm of one env, seeds interleaved; emits per seed, per arm and the gains."""
    ctx = {**ctx, "env": name, "target": bench.target, "what": bench.what}
    seeds = args.seeds if args.seeds_given else bench.seeds
    # Native spread is evaluated on real mpe2, so its references are mpe2's.
    refs = (  # with the run's overrides: e.g. env.continuous_actions changes what random does
        baseline_returns()
        if name == "spread"
        else reference_returns(bench.preset, [*MODEL_FREE, *args.overrides])
    )
    for ref, value in refs.items():
        emit(f"{name}_{ref}_return", value, "return", **ctx)
    first = next(iter(bench.arms))  # model-free: no model to dream with
    arms = {a: x for a, x in bench.arms.items() if a == first or a in (args.env_arms or bench.arms)}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed in range(seeds):
        for arm, extra in arms.items():
            sink: dict[str, Any] = {}

            def inspect(
                run_dir: Path, sink: dict[str, Any] = sink, k: bool = seed == 0 and arm != first
            ) -> None:
                _time_split(run_dir, sink)
                if k:
                    res = dream(run_dir, steps=15, worlds=200, out=run_dir / "dream.png")
                    sink["k_step"] = {n: [round(e[i - 1], 4) for i in (1, 5, 15)]
                                      for n, e in res["errors"].items()}  # fmt: skip

            res = train_and_evaluate(
                bench.preset, bench.time_limit,
                [f"train.seed={seed}", "run.eval_every_s=null", *extra, *args.overrides],
                inspect=inspect, env_steps=bench.max_env_steps, eval_every_steps=bench.every,
                eval_episodes=bench.eval_episodes,
            )  # fmt: skip
            reach = _reach(res["evals"], bench.target)
            means = [e["mean"] for e in res["evals"]]
            runs[arm].append({"evals": res["evals"], "reach": reach})
            emit(f"{name}_{arm}_seed_run", reach["env_steps"] or math.nan, "env_steps_to_target",
                 seed=seed, seconds_to_target=reach["seconds"], env_steps_per_s=round(res["sps"]),
                 eval_fall=round(largest_drop(means), 2) if means else None,
                 returns=[[e["env_steps"], round(e["mean"], 2)] for e in res["evals"]],
                 stderr=[round(e["stderr"], 2) for e in res["evals"]],
                 eval_episodes=bench.eval_episodes, **sink, **ctx)  # fmt: skip
    medians = {
        arm: summarize(f"{name}_{arm}", arm_runs, bench.every, bench.max_env_steps, "return", ctx)
        for arm, arm_runs in runs.items()
    }
    free = medians[first]
    for arm in list(arms)[1:]:
        emit(f"{name}_sample_efficiency_gain", free["env_steps"] / medians[arm]["env_steps"],
             "ratio",
             arm=arm, wall_time_ratio=medians[arm]["seconds"] / free["seconds"],
             **ctx)  # fmt: skip


def _reach(evals: list[dict[str, Any]], target: float = TARGET_RETURN) -> dict[str, float | None]:
    hit = next((e for e in evals if e["mean"] >= target), None)
    return {
        "env_steps": hit["env_steps"] if hit else None,
        "seconds": hit["wall_time"] if hit else None,
    }


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def run_arm(
    arm: str, preset: str, extra: list[str], args: argparse.Namespace, ctx: dict[str, Any]
) -> dict[str, float]:
    """Every seed of one arm; emits a line per seed and the arm's summary lines.

    Returns the medians over seeds of real env steps and seconds to -45.
    """
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
    return summarize(arm, runs, args.every, args.max_env_steps, "team_return",
                     {**ctx, "target": TARGET_RETURN})  # fmt: skip


def summarize(
    prefix: str,
    runs: list[dict[str, Any]],
    every: int,
    max_env_steps: int,
    unit: str,
    ctx: dict[str, Any],
) -> dict[str, float]:
    """One arm's lines: real env steps and seconds to the target (median, range, how many
    seeds reached it) and the IQM [95 % CI] at every mark; returns the two medians."""
    medians = {}
    for key, key_unit in (("env_steps", "env_steps"), ("seconds", "s")):
        reached = [r["reach"][key] for r in runs if r["reach"][key] is not None]
        medians[key] = _median(reached)
        emit(f"{prefix}_{key}_to_target", medians[key], key_unit, reached=len(reached),
             of_seeds=len(runs), range=[min(reached), max(reached)] if reached else None,
             **ctx)  # fmt: skip
    for mark in range(every, max_env_steps + 1, every):
        # A run counts at the marks it trained to (a time limit may end it sooner). A
        # checkpoint falls at the first iteration past its mark, up to a batch later: half the
        # spacing of the marks is the slack that keeps it at its own mark.
        trained = [r for r in runs if r["evals"] and r["evals"][-1]["env_steps"] >= mark]
        values = [
            v
            for r in trained
            if (v := at_mark(r["evals"], "env_steps", mark, every / 2)) is not None
        ]
        if values:
            lo, hi = bootstrap_ci(values)
            emit(f"{prefix}_iqm_return_at_{mark}_steps", iqm(values), unit,
                 ci95=[round(lo, 3), round(hi, 3)], seeds=len(values), **ctx)  # fmt: skip
    return medians


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
    p.add_argument("--seeds", type=int, help="seeds per arm (default 5; with --envs each env's)")
    p.add_argument("--envs", nargs="*", choices=list(ENVS), metavar="ENV",
                   help=f"measure these envs instead: {', '.join(ENVS)}")  # fmt: skip
    p.add_argument("--every", type=int, default=25_600, help="real env steps per checkpoint")
    p.add_argument("--max-env-steps", type=int, default=600_000)
    p.add_argument("--time-limit", type=float, default=300.0, help="wall seconds cap a run")
    p.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS),
                   help="native-spread arms (none, with --slow: only the slow path)")  # fmt: skip
    p.add_argument(
        "--env-arms",
        nargs="*",
        default=[],
        metavar="ARM",
        help="with --envs: only these arms of each env (and its model-free reference)",
    )
    p.add_argument("--slow", action="store_true", help="also the PettingZoo path, two arms")
    p.add_argument("--slow-seeds", type=int, default=2, help="seeds of each slow arm")
    p.add_argument("--slow-max-env-steps", type=int,
                   help="real env steps cap of a slow run (default: --max-env-steps)")  # fmt: skip
    p.add_argument("--memory", type=float, metavar="SECONDS",
                   help="only: peak RSS of one spread-gnn-wm run this long")  # fmt: skip
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every arm, e.g. world_model.ratio=3")  # fmt: skip
    args = p.parse_args(argv)
    unknown = sorted(set(args.env_arms) - {a for e in args.envs or ENVS for a in ENVS[e].arms})
    if unknown:
        p.error(f"--env-arms: no arm {', '.join(unknown)} in {', '.join(args.envs or ENVS)}")
    args.seeds_given = args.seeds is not None
    args.seeds = args.seeds or 5
    ctx: dict[str, Any] = {"machine": platform.machine(), "overrides": args.overrides}
    if args.envs:
        for name in args.envs:
            run_env(name, ENVS[name], args, ctx)
        return
    if args.memory:
        memory(args.memory, ctx, args.overrides)
        return
    for name, value in baseline_returns().items():
        emit(f"mpe2_spread_{name}_team_return", value, "team_return", **ctx)
    medians: dict[str, float] = {}
    for arm in args.arms:
        preset, extra = ARMS[arm]
        medians[arm] = run_arm(arm, preset, extra, args, ctx)["env_steps"]
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
            slow_medians[arm] = run_arm(arm, preset, ["run.eval_every_s=null", *extra], slow, ctx)
        free, model = slow_medians["slow_model_free"], slow_medians["slow_world_model"]
        emit("pettingzoo_spread_sample_efficiency_gain", free["env_steps"] / model["env_steps"],
             "ratio", wall_time_ratio=model["seconds"] / free["seconds"], **ctx)  # fmt: skip


if __name__ == "__main__":
    main()
