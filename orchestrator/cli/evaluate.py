"""``shoal eval`` and ``shoal plot``: mean team return ± stderr of a checkpoint, a run's curve.

A run trained on the native ``spread`` is evaluated by default on the real mpe2
``simple_spread_v3`` through the PettingZoo adapter, so numbers are comparable with any other
library evaluated on the same env; any other run on the env it trained on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from agents.rollout import episode_returns
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import BEST, load_checkpoint, policy_from_checkpoint


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


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a PNG learning curve (team return and env-steps/s against env steps).

    Raises:
        FileNotFoundError: the run directory has no metrics.csv.
    """
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
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
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(steps, ret, color="tab:blue")
    ax1.set_xlabel("env steps")
    ax1.set_ylabel("team return (sum over agents and steps)")
    ax1.grid(alpha=0.3)
    ax2.plot(wall, ret, color="tab:green")
    ax2.set_xlabel("wall time (s)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"shoal: {run_dir.name}")
    fig.tight_layout()
    out_path = Path(out) if out else run_dir / "learning_curve.png"
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
