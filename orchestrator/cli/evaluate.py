"""``shoal eval`` and ``shoal plot``: mean team return ± stderr of a checkpoint, a run's curve.

Agent-group runs are evaluated on their own env with a return per group, and
:func:`cross_play` plays a run's checkpoints against each other.

A run trained on the native ``spread`` is evaluated by default on the real mpe2
``simple_spread_v3`` through the PettingZoo adapter, so numbers are comparable with any other
library evaluated on the same env; any other run on the env it trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from agents.rollout import agent_returns, episode_returns
from envs import VecMultiAgentEnv
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import (
    BEST,
    copy_group,
    list_checkpoints,
    load_checkpoint,
    policy_from_checkpoint,
)
from policies.actor_critic import Policy


def evaluate(
    checkpoint: str | Path,
    env_name: str | None = None,
    n_agents: int | None = None,
    episodes: int = 100,
    greedy: bool = False,
    seed: int = 12345,
    parallel: int = 100,
    which: str | None = None,
) -> dict[str, Any]:
    """Roll out ``episodes`` full episodes and report team returns.

    Args:
        checkpoint: checkpoint or run directory.
        env_name: env to evaluate on; by default the real mpe2 package (``mpe2-spread``) for
            runs on ``spread``, else the run's own env with its settings.
        n_agents: evaluate with a different team size (graph and transformer policies only).
        episodes: how many episodes.
        greedy: act with the most likely action instead of sampling.
        seed: seeds env resets and action sampling.
        parallel: sub-envs stepped together.
        which: for a run directory, ``best`` (``checkpoints/best``) or ``latest``; by
            default the best when the run has one, else the latest.

    Returns:
        ``mean``, ``stderr``, ``episodes``, ``n_agents``, ``which`` (``best``, ``latest`` or
        ``given`` for a checkpoint directory), ``checkpoint``, ``returns`` (list), ...
    """
    if which is None:
        which = BEST if (Path(checkpoint) / "checkpoints" / BEST).is_dir() else "latest"
    ckpt = load_checkpoint(checkpoint, which=which)
    if (Path(checkpoint) / "meta.json").is_file() or Path(checkpoint).is_file():
        which = "given"
    cfg = Config.model_validate(_yaml(ckpt["config"]))
    if "policy_groups" in ckpt["meta"]:
        return _evaluate_groups(
            ckpt, cfg, env_name, n_agents, episodes, greedy, seed, parallel, which
        )
    spec = ckpt["meta"]["policy_spec"]
    n = n_agents or cfg.env.n_agents
    if n != cfg.env.n_agents and spec["kind"] == "mlp":
        raise ValueError(
            f"this checkpoint's MLP policy was trained with {cfg.env.n_agents} agents and cannot "
            f"act with {n}; graph (gnn) and transformer policies can"
        )
    trained_on = cfg.env.name
    if env_name is None:
        env_name = "mpe2-spread" if trained_on == "spread" else trained_on
    width = min(parallel, episodes)
    # env.kwargs belong to the env the run trained on; another env starts from none.
    kwargs = dict(cfg.env.kwargs) if env_name == trained_on else {}
    if env_name.startswith("vmas:") and n_agents is not None:  # a scenario argument there
        kwargs["n_agents"] = n_agents
    on = cfg.env.model_copy(update={"name": env_name, "n_agents": n, "kwargs": kwargs})
    env = on.make(width, seed, torch.device("cpu"))
    width_key = "obs_dim" if spec["kind"] == "mlp" else "node_dim"
    if spec[width_key] != getattr(env, width_key):
        raise ValueError(
            f"this checkpoint's policy was trained on env '{trained_on}' with {width_key}="
            f"{spec[width_key]}, but '{env_name}' gives {getattr(env, width_key)}; evaluate it "
            f"on its own env (--env {trained_on}) or one with the same observations"
        )
    model = policy_from_checkpoint(ckpt, obs_dim=env.obs_dim, state_dim=env.state_dim)
    model.eval()
    returns = episode_returns(model, env, episodes, seed=seed, greedy=greedy)
    env.close()
    mean = sum(returns) / len(returns)
    var = sum((r - mean) ** 2 for r in returns) / max(len(returns) - 1, 1)
    return {
        "mean": mean,
        "stderr": math.sqrt(var / len(returns)),
        "episodes": len(returns),
        "n_agents": env.n_agents,
        "env": env_name,
        "checkpoint": str(ckpt["path"]),
        "which": which,
        "env_steps": ckpt["meta"]["counters"]["env_steps"],
        "wall_time": ckpt["meta"]["counters"].get("wall_time"),
        "returns": returns,
    }


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((r - mean) ** 2 for r in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var / len(values))


def _group_env(
    cfg: Config, env_name: str | None, n_agents: int | None, width: int, seed: int
) -> VecMultiAgentEnv:
    if n_agents is not None:
        raise ValueError("--n-agents is for shared policies; an agent-group run keeps its teams")
    if env_name is not None and env_name != cfg.env.name:
        raise ValueError(
            f"this run's agent groups were trained on '{cfg.env.name}'; evaluate it there "
            "(its groups are assigned by the env's agent names and widths)"
        )
    return cfg.env.make(width, seed, torch.device("cpu"))


def group_returns(model: Policy, per_agent: torch.Tensor) -> dict[str, list[float]]:
    """Each group's per-episode return (its agents' returns summed) from ``[episodes, N]``."""
    return {
        g.name: per_agent[:, list(g.agents)].sum(-1).tolist() for g in getattr(model, "groups", [])
    }


def _evaluate_groups(
    ckpt: dict[str, Any],
    cfg: Config,
    env_name: str | None,
    n_agents: int | None,
    episodes: int,
    greedy: bool,
    seed: int,
    parallel: int,
    which: str,
) -> dict[str, Any]:
    """:func:`evaluate` for an agent-group run: a return per group on the run's own env."""
    env = _group_env(cfg, env_name, n_agents, min(parallel, episodes), seed)
    model = policy_from_checkpoint(ckpt)
    model.eval()
    per_agent = agent_returns(model, env, episodes, seed=seed, greedy=greedy)
    env.close()
    per_group = group_returns(model, per_agent)
    trained = [i for g in getattr(model, "groups", []) if g.train for i in g.agents]
    mean, stderr = _mean_stderr(per_agent[:, trained].sum(-1).tolist())
    return {
        "mean": mean,
        "stderr": stderr,
        "groups": {
            name: dict(zip(("mean", "stderr"), _mean_stderr(v), strict=True))
            for name, v in per_group.items()
        },
        "episodes": per_agent.shape[0],
        "n_agents": env.n_agents,
        "env": cfg.env.name,
        "checkpoint": str(ckpt["path"]),
        "which": which,
        "env_steps": ckpt["meta"]["counters"]["env_steps"],
        "wall_time": ckpt["meta"]["counters"].get("wall_time"),
        "returns": per_agent[:, trained].sum(-1).tolist(),
    }


def cross_play(
    run: str | Path, episodes: int = 100, seed: int = 12345, parallel: int = 100
) -> dict[str, Any]:
    """Every kept checkpoint of an agent-group run against every other: progress made visible.

    Cell ``[i][j]`` is each group's mean return when the run's first group (e.g. the
    predators) acts with checkpoint ``i`` and every other group with checkpoint ``j``; the
    diagonal is the run as it trained. Rows are checkpoints, oldest first.

    Returns:
        ``checkpoints`` (env steps of each), ``groups`` (names; the first is the row group),
        ``table`` (``table[group][i][j]``), ``episodes``.
    """
    run_dir = Path(run)
    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no checkpoints/step-* in '{run_dir}': is it a shoal run?")
    ckpts = [load_checkpoint(c) for c in found]
    if "policy_groups" not in ckpts[0]["meta"]:
        raise ValueError(f"'{run_dir}' has no agent groups: cross-play needs a groups: run")
    cfg = Config.model_validate(_yaml(ckpts[0]["config"]))
    env = _group_env(cfg, None, None, min(parallel, episodes), seed)
    models = [policy_from_checkpoint(c) for c in ckpts]
    first = ckpts[0]["meta"]["policy_groups"][0]["name"]
    table: dict[str, list[list[float]]] = {}
    for i, row in enumerate(models):
        for j in range(len(models)):
            mixed = policy_from_checkpoint(ckpts[j])
            copy_group(mixed, row, first)
            mixed.eval()
            per_agent = agent_returns(mixed, env, episodes, seed=seed)
            for name, values in group_returns(mixed, per_agent).items():
                cell = table.setdefault(name, [[math.nan] * len(models) for _ in models])
                cell[i][j] = sum(values) / len(values)
    env.close()
    return {
        "checkpoints": [int(c["meta"]["counters"]["env_steps"]) for c in ckpts],
        "groups": list(table),
        "table": table,
        "episodes": episodes,
    }


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def reference_returns(cfg: Config, episodes: int = 100, seed: int = 12345) -> dict[str, float]:
    """Mean returns of uniformly random actions and of doing nothing on ``cfg``'s env.

    Random actions are uniform over each agent's own actions (or its action box); doing
    nothing is action 0 (mpe2's no-op) or a zero action vector. The return is the run's: the
    whole team's, or with agent groups that of the groups being trained.
    """
    width = min(episodes, 100)
    env = cfg.env.make(width, seed, torch.device("cpu"))
    infos = env.agent_info()
    if cfg.groups:
        from orchestrator.config.groups import assign_agents

        slots = assign_agents(cfg.groups, infos)
        counted = [i for g, agents in slots.items() if cfg.groups[g].train for i in agents]
    else:
        counted = list(range(env.n_agents))
    widths = torch.tensor([a.action_dim for a in infos])
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("random", "no-op"):
        env.reset(seed=seed)
        running = torch.zeros(width)
        done_returns: list[float] = []
        while len(done_returns) < episodes:
            if env.action_kind == "discrete":
                u = torch.rand((width, env.n_agents), generator=gen)
                act = (u * widths).long() if name == "random" else torch.zeros_like(u).long()
            elif name == "random":
                act = env.random_actions(gen)
            else:
                act = torch.zeros(width, env.n_agents, env.action_dim)
            res = env.step(act)
            running += res.reward[:, counted].float().sum(-1)
            for i in res.done.nonzero().flatten().tolist():
                done_returns.append(float(running[i]))
                running[i] = 0.0
        out[name] = sum(done_returns[:episodes]) / episodes
    env.close()
    return out


def _curve(run_dir: Path) -> tuple[list[float], list[float], list[float]]:
    import csv

    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.csv in '{run_dir}': is it a shoal run directory?")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise FileNotFoundError(f"'{path}' has no rows yet")
    steps = [float(r["env_steps"]) for r in rows]
    ret = [float(r["episode_return"]) if r.get("episode_return") else math.nan for r in rows]
    wall = [float(r["wall_time"]) for r in rows]
    return steps, ret, wall


def plot_runs(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, references: bool = True
) -> Path:
    """Write a PNG of several runs' team returns against env steps and against wall time.

    Each run is a line labelled by its directory's name; the returns of random actions and of
    doing nothing on each run's env (:func:`reference_returns`) are dashed lines.

    Args:
        run_dirs: run directories (a sweep's trials, or runs to compare).
        out: the PNG; by default ``learning_curve.png`` in the first run (one run) or
            ``comparison.png`` beside the first run (several).
        references: draw the random and no-op lines.

    Raises:
        FileNotFoundError: a directory has no metrics.csv (its path is in the message).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dirs = [Path(d) for d in run_dirs]
    curves = [_curve(d) for d in dirs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for d, (steps, ret, wall) in zip(dirs, curves, strict=True):
        (line,) = ax1.plot(steps, ret, label=d.name)
        ax2.plot(wall, ret, color=line.get_color(), label=d.name)
    if references:
        seen: dict[str, dict[str, float]] = {}
        for d in dirs:
            cfg = Config.model_validate(_yaml((d / "config.yaml").read_text()))
            key = cfg.env.model_dump_json() + repr(sorted(cfg.groups))
            if key in seen:
                continue
            seen[key] = reference_returns(cfg)
            env_label = cfg.env.name if len(dirs) == 1 or len(seen) == 1 else d.name
            for (name, value), style in zip(seen[key].items(), ("--", ":"), strict=True):
                for ax in (ax1, ax2):
                    ax.axhline(value, color="grey", linestyle=style, linewidth=1,
                               label=f"{name} ({env_label}): {value:.1f}")  # fmt: skip
    ax1.set_xlabel("env steps")
    ax1.set_ylabel("team return (sum over agents and steps)")
    ax2.set_xlabel("wall time (s)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    title = dirs[0].name if len(dirs) == 1 else f"{len(dirs)} runs"
    fig.suptitle(f"shoal: {title}")
    fig.tight_layout()
    if out is None:
        out = (
            dirs[0] / "learning_curve.png" if len(dirs) == 1 else dirs[0].parent / "comparison.png"
        )
    out_path = Path(out)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def plot_run(run_dir: str | Path, out: str | Path | None = None, references: bool = True) -> Path:
    """Write one run's PNG learning curve (see :func:`plot_runs`)."""
    return plot_runs([run_dir], out, references)
