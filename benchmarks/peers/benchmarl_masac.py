"""BenchMARL's own MASAC on VMAS ``balance`` or ``transport``, a peer of shoal's MASAC here.

Run it from the repository root with the Python of a separate environment that has
``pip install benchmarl==1.5.2 vmas`` (BenchMARL pins its own torch and torchrl; keep them
out of shoal's, and this module imports nothing of shoal's)::

    PEER_PYTHON -m benchmarks.peers.benchmarl_masac --seeds 0 1 2 \\
        --max-env-steps 300000 --eval-every 30000

It builds BenchMARL's ``Experiment`` from its own yaml defaults (``ExperimentConfig``,
``MasacConfig``, ``MlpConfig`` for actor and critics, ``VmasTask.BALANCE`` or, with
``--task transport``, ``VmasTask.TRANSPORT``) and changes only what makes the env shoal's
``balance-masac`` preset: on balance VMAS's default 3 agents (BenchMARL's yaml says 4),
``max_steps`` 25 (shoal's ``env.max_cycles``; BenchMARL's yaml says 100); on transport
nothing (4 agents, one package of mass 50, 100 steps: the suite runs shoal with
``env.max_cycles=100``, VMAS's other defaults being BenchMARL's yaml's); and the
action kind (``--continuous-actions``; the preset leaves ``env.continuous_actions`` at its
default, false, so by default both learn VMAS's 5 discrete actions), plus what a run on this
machine needs: CPU devices, ``max_n_frames`` = ``--max-env-steps``, no rendering, no wandb
(``loggers=[]``; its marl-eval json goes to a temporary ``save_folder`` unless
``--save-folder`` keeps it), no checkpoints. ``--set KEY=VALUE`` changes any other field of
``ExperimentConfig`` or ``MasacConfig`` (e.g. ``--set off_policy_n_optimizer_steps=50`` for a
quick try); every changed field is listed in the output under ``changed``.

``--seconds S`` gives each seed the same training wall clock a shoal arm had (the issue's
"same wall clock" comparison): the run stops at the first evaluation after ``S`` seconds of
training (evaluations and setup excluded), so evaluate every batch with it
(``--eval-every 6000``).

Evaluation is BenchMARL's own: after the first collected batch and then every
``--eval-every`` env steps (BenchMARL requires a multiple of its
``off_policy_collected_frames_per_batch``, 6000; other values are rounded up, and the value
used is printed), ``--eval-episodes`` VMAS worlds each run one episode with deterministic
actions (the policy's mode; ``--stochastic-eval`` samples), inside the run's wall clock.
A callback's ``on_evaluation_end`` reads the rollouts: each is cut at its first ``done`` (as
BenchMARL's logger does) and its **team return** is
``sum over steps and agents of ("next", group, "reward")``, summed over agent groups (balance
has one, ``agents``): shoal's team return, each agent's reward summed over the episode and
then over agents. BenchMARL's own ``eval/reward/episode_reward_mean`` is the *mean* over the
agents of a group (and over groups) instead; it is printed as ``benchmarl_return``. balance
gives every agent the same reward, so ``team_return = 3 * benchmarl_return`` with 3 agents.

Env steps are BenchMARL's frames: one step of one VMAS world (``batch.numel()`` of a
``[n_envs, T]`` batch), as shoal counts them. A JSON line per seed goes to stdout (BenchMARL's
own prints go to stderr) with ``env_steps``, ``wall_s`` (the whole run, setup and
evaluations included), ``setup_s``, ``eval_s``, ``train_wall_s`` (wall less setup and
evaluations: collection and gradient steps only, as shoal's ``train_seconds``),
``env_steps_per_s`` (training throughput: ``env_steps / train_wall_s``) and ``records``,
one per evaluation: ``env_steps``, ``wall_s`` (since the run began), ``train_wall_s`` (the
same, less setup and earlier evaluations), ``team_return`` (mean over episodes),
``team_return_stderr``, ``episodes``, ``episode_len_mean`` and ``benchmarl_return``.

Left as BenchMARL has them (printed under ``masac``): 6000 frames a batch from 10 worlds,
1000 gradient steps of 128 transitions a batch, a 1M replay, no random warm-up, lr 5e-5,
gamma 0.99, polyak tau 0.005, alpha from 1.0, 256x256 tanh MLPs (shoal's preset: 64 worlds x
25 steps = 1600 a batch, 32 steps of 256, a 500k replay, 10k warm-up steps, lr 1e-3, gamma
0.95, tau 0.01, alpha from 0.2, 2x64 MLPs). torchrl's VMAS wrapper marks the 25-step time
limit as a termination, so BenchMARL does not bootstrap across it; shoal does (a truncation).
shoal's suite evaluates its checkpoints afterwards on 100 *sampled* episodes, outside the
training clock: ``--stochastic-eval`` and ``train_wall_s`` give the like-for-like figures.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Each task as shoal builds it (envs/registry.py ``_vmas``: VMAS's max_steps =
# env.max_cycles, default 25; n_agents is the scenario's own default: 3 on balance, 4 on
# transport, whose suite row sets env.max_cycles=100 as BenchMARL's yaml does).
SHOAL_TASKS = {
    "balance": {"n_agents": 3, "max_steps": 25},
    "transport": {"n_agents": 4, "max_steps": 100},
}


try:
    from benchmarl.experiment.callback import Callback  # type: ignore[import-not-found]
except ImportError:  # importable without BenchMARL (e.g. by shoal's tests); ``run`` needs it
    Callback = object  # type: ignore[assignment,misc]


def _require_benchmarl() -> None:
    if Callback is object:
        raise SystemExit(
            "BenchMARL is not importable here; run this module with the Python of an "
            "environment that has `pip install benchmarl==1.5.2 vmas`"
        )


class TimeUp(Exception):
    """Raised by :class:`EvalRecorder` when the run's training wall clock is spent."""


class EvalRecorder(Callback):
    """Team returns of every evaluation, each stamped with env steps and wall seconds.

    Module-level, as BenchMARL pickles an experiment's callbacks into its ``config.pkl``.
    """

    def __init__(self, start: float, seconds: float | None = None) -> None:
        super().__init__()
        self.start = start
        self.seconds = seconds
        self.setup_s = 0.0
        self.eval_s = 0.0
        self.last_train_end = start
        self.records: list[dict[str, Any]] = []

    def on_train_end(self, training_td: Any, group: str) -> None:
        self.last_train_end = time.perf_counter()

    def on_evaluation_end(self, rollouts: list[Any]) -> None:
        now = time.perf_counter()
        self.eval_s += now - self.last_train_end
        returns, lengths, per_agent = [], [], []
        groups = list(self.experiment.group_map)
        for td in rollouts:
            done = td.get(("next", "done")).reshape(td.batch_size[0], -1).any(-1)
            ends = done.nonzero()
            if ends.numel():  # cut at the first done, as BenchMARL's logger does
                td = td[: int(ends[0, 0]) + 1]
            team, agent_mean = 0.0, 0.0
            for group in groups:
                reward = td.get(("next", group, "reward"))  # [T, n_agents, 1]
                team += float(reward.sum())
                agent_mean += float(reward.sum(0).mean())
            returns.append(team)
            per_agent.append(agent_mean / len(groups))
            lengths.append(td.batch_size[0])
        n = len(returns)
        mean = sum(returns) / n
        var = sum((r - mean) ** 2 for r in returns) / max(n - 1, 1)
        wall = now - self.start
        self.records.append({
            "env_steps": int(self.experiment.total_frames),
            "wall_s": round(wall, 2),
            "train_wall_s": round(wall - self.setup_s - self.eval_s, 2),
            "team_return": mean,
            "team_return_stderr": math.sqrt(var / n),
            "episodes": n,
            "episode_len_mean": sum(lengths) / n,
            "benchmarl_return": sum(per_agent) / n,
        })  # fmt: skip
        self.last_train_end = time.perf_counter()  # evaluation is not training time
        if self.seconds is not None and self.records[-1]["train_wall_s"] >= self.seconds:
            raise TimeUp


def _parse_value(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a plain string, e.g. a loss name


def run(
    seed: int,
    max_env_steps: int,
    eval_every: int,
    eval_episodes: int = 100,
    continuous_actions: bool = False,
    stochastic_eval: bool = False,
    overrides: dict[str, Any] | None = None,
    save_folder: Path | None = None,
    seconds: float | None = None,
    task_name: str = "balance",
) -> dict[str, Any]:
    """One seed of BenchMARL's MASAC on a VMAS task: ``records`` of evaluations and timings.

    Args:
        seed: the experiment's seed (BenchMARL seeds torch, numpy and VMAS with it).
        max_env_steps: ``max_n_frames``; BenchMARL collects whole batches, so the run may
            end up to one batch (6000 frames by default) beyond it.
        eval_every: env steps between evaluations, rounded up to a multiple of the batch.
        eval_episodes: evaluation episodes (VMAS worlds stepped together).
        continuous_actions: VMAS's Box actions instead of its discrete ones.
        stochastic_eval: sample actions in evaluation instead of taking the mode.
        overrides: fields of ``ExperimentConfig`` or ``MasacConfig`` to change.
        save_folder: an existing folder for BenchMARL's own output; default a temporary one.
        seconds: stop at the first evaluation after this much training wall clock (setup and
            evaluations not counted), the same budget a shoal arm had; ``None``: run to
            ``max_env_steps``.
        task_name: ``balance`` or ``transport`` (:data:`SHOAL_TASKS`).
    """
    _require_benchmarl()
    from benchmarl.algorithms import MasacConfig  # type: ignore[import-not-found]
    from benchmarl.environments import VmasTask  # type: ignore[import-not-found]
    from benchmarl.experiment import Experiment, ExperimentConfig  # type: ignore[import-not-found]
    from benchmarl.models.mlp import MlpConfig  # type: ignore[import-not-found]

    for handler in logging.getLogger("torchrl").handlers:  # its INFO lines: off stdout too
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    exp = ExperimentConfig.get_from_yaml()
    algo = MasacConfig.get_from_yaml()
    changed: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        target = next((c for c in (exp, algo) if key in {f.name for f in dataclasses.fields(c)}),
                      None)  # fmt: skip
        if target is None:
            raise ValueError(f"--set {key}: not a field of ExperimentConfig or MasacConfig")
        setattr(target, key, value)
        changed[key] = value
    batch = exp.collected_frames_per_batch(on_policy=False)
    every = max(batch, -(-eval_every // batch) * batch)
    settings: dict[str, Any] = {
        "sampling_device": "cpu", "train_device": "cpu", "buffer_device": "cpu",
        "prefer_continuous_actions": continuous_actions,
        "max_n_frames": max_env_steps, "max_n_iters": None,
        "evaluation": True, "evaluation_interval": every,
        "evaluation_episodes": eval_episodes,
        "evaluation_deterministic_actions": not stochastic_eval,
        "render": False, "loggers": [], "create_json": True,
        "checkpoint_interval": 0, "checkpoint_at_end": False,
    }  # fmt: skip
    for key, value in settings.items():
        if key not in changed:
            setattr(exp, key, value)
    task = getattr(VmasTask, task_name.upper()).get_from_yaml()
    task_defaults = dict(task.config)
    task.config.update(SHOAL_TASKS[task_name])
    model = MlpConfig.get_from_yaml()

    with contextlib.ExitStack() as stack:
        folder = save_folder or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        exp.save_folder = str(folder)
        start = time.perf_counter()
        recorder = EvalRecorder(start, seconds)
        # BenchMARL prints (tqdm, its closing messages) stay off stdout, which holds the JSON.
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        experiment = Experiment(
            task=task, algorithm_config=algo, model_config=model, seed=seed, config=exp,
            callbacks=[recorder],
        )  # fmt: skip
        recorder.setup_s = time.perf_counter() - start
        recorder.last_train_end = time.perf_counter()
        with contextlib.suppress(TimeUp):
            experiment.run()
        wall = time.perf_counter() - start
        frames = int(experiment.total_frames)
        continuous = bool(experiment.continuous_actions)
    if not recorder.records:
        raise RuntimeError("BenchMARL ran no evaluation")
    train_wall = wall - recorder.setup_s - recorder.eval_s
    return {
        "env_steps": frames,
        "wall_s": round(wall, 2),
        "setup_s": round(recorder.setup_s, 2),
        "eval_s": round(recorder.eval_s, 2),
        "train_wall_s": round(train_wall, 2),
        "env_steps_per_s": round(frames / train_wall, 1) if train_wall > 0 else math.nan,
        "eval_every": every,
        "continuous_actions": continuous,
        "deterministic_eval": not stochastic_eval,
        "task": dict(task.config),
        "benchmarl_task_defaults": task_defaults,
        "changed": changed,
        "masac": {
            "frames_per_batch": batch,
            "n_envs": exp.n_envs_per_worker(on_policy=False),
            "optimizer_steps_per_batch": exp.n_optimizer_steps(on_policy=False),
            "train_batch_size": exp.train_batch_size(on_policy=False),
            "replay_size": exp.replay_buffer_memory_size(on_policy=False),
            "init_random_frames": exp.off_policy_init_random_frames,
            "lr": exp.lr,
            "gamma": exp.gamma,
            "polyak_tau": exp.polyak_tau,
            "clip_grad_norm": exp.clip_grad_val if exp.clip_grad_norm else None,
            "alpha_init": algo.alpha_init,
            "target_entropy": algo.target_entropy,
            "mlp": list(model.num_cells),
            "activation": model.activation_class.__name__,
        },  # fmt: skip
        "records": recorder.records,
    }


def main(argv: list[str] | None = None) -> None:
    """Seeds of BenchMARL's MASAC on a VMAS task, a JSON line per seed."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--task", choices=sorted(SHOAL_TASKS), default="balance")
    p.add_argument("--max-env-steps", type=int, default=300_000)
    p.add_argument(
        "--eval-every",
        type=int,
        default=30_000,
        help="env steps; rounded up to a multiple of BenchMARL's batch (6000)",
    )
    p.add_argument("--eval-episodes", type=int, default=100)
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop at the first evaluation after this much training wall clock (per seed)",
    )
    p.add_argument(
        "--continuous-actions",
        action="store_true",
        help="VMAS Box actions (shoal: env.continuous_actions=true)",
    )
    p.add_argument(
        "--stochastic-eval",
        action="store_true",
        help="sample evaluation actions instead of the deterministic mode",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a field of BenchMARL's ExperimentConfig or MasacConfig",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's own choice)",
    )
    p.add_argument(
        "--save-folder",
        type=Path,
        default=None,
        help="an existing folder to keep BenchMARL's output in (default: discarded)",
    )
    args = p.parse_args(argv)  # fmt: skip
    overrides: dict[str, Any] = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _parse_value(raw.strip())
    if args.save_folder is not None and not args.save_folder.is_dir():
        p.error(f"--save-folder: '{args.save_folder}' is not a folder")
    _require_benchmarl()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    for seed in args.seeds:
        res = run(
            seed,
            args.max_env_steps,
            args.eval_every,
            args.eval_episodes,
            args.continuous_actions,
            args.stochastic_eval,
            overrides,
            args.save_folder,
            args.seconds,
            args.task,
        )
        print(json.dumps({"metric": "benchmarl_masac_seed_run", "seed": seed,
                          "scenario": f"vmas:{args.task}", **res}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
