"""``shoal dream RUN``: the run's world model next to the real env, from the same start.

The run's policy plays real episodes. From each episode's first state the world model
replays the same actions on its own, feeding nothing real back, so errors compound as they
would in imagination. ``dream`` prints the k-step error of agent positions beside two
baselines that need no model (the state stays as it was; agents keep their velocity) and
writes a picture: one world's agents and landmarks, real and imagined paths, and the error
per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from agents.imagination import open_loop
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import load_checkpoint, policy_from_checkpoint
from orchestrator.runtime.world import model_from_checkpoint


@torch.no_grad()
def dream(
    run: str | Path,
    steps: int = 15,
    worlds: int = 100,
    seed: int = 4242,
    which: str = "latest",
    out: str | Path | None = None,
    start_step: int = 5,
) -> dict[str, Any]:
    """Roll policy and model side by side; returns the errors and where the picture went.

    Args:
        run: a run directory or checkpoint.
        steps: steps to dream (at most the env's episode length).
        worlds: real episodes the errors average over.
        seed: seeds the real episodes and the policy's sampling.
        which: ``latest`` or ``best`` checkpoint of a run directory.
        out: the PNG's path (default ``RUN/dream.png``).
        start_step: real steps played before dreaming starts, so agents are moving (at a
            reset they stand still, and "constant velocity" would be "repeat").

    Returns:
        ``errors`` (``{name: [error after 1..steps steps]}`` for ``world_model``, ``repeat``,
        ``constant_velocity``), ``picture`` and ``checkpoint``.

    Raises:
        ValueError: the run has no world model, or ``steps`` exceeds the episode.
        FileNotFoundError: no checkpoint there.
    """
    ckpt = load_checkpoint(run, which=which)
    cfg = Config.model_validate(yaml.safe_load(ckpt["config"]))
    env = cfg.env.make(worlds, seed, torch.device("cpu"))
    model = model_from_checkpoint(ckpt, cfg, env)
    limit = env.max_episode_steps or steps + start_step
    if start_step < 0 or not 1 <= steps <= limit - start_step:
        raise ValueError(
            f"--start-step ({start_step}) plus --steps ({steps}) must fit in the episode "
            f"({limit} steps), with --steps at least 1"
        )
    policy = policy_from_checkpoint(ckpt)
    torch.manual_seed(seed)
    obs = env.reset(seed=seed)
    for _ in range(start_step):
        obs = env.step(policy.dist(obs.as_dict()).sample()).observation
    start = obs
    real, actions = [obs.nodes], []
    for _ in range(steps):
        a = policy.dist(obs.as_dict()).sample()
        res = env.step(a)
        obs = res.final  # the episode's own last view, even at a time limit
        actions.append(a)
        real.append(obs.nodes)
        obs = res.observation
    env.close()
    truth = torch.stack(real)  # [K+1, B, E, F]
    imagined = open_loop(model, truth[0], start.node_mask, start.alive, actions)
    n = start.alive.shape[1]
    pos, vel = truth[0, :, :n, 2:4], truth[0, :, :n, 0:2]
    dt = _dt(truth)
    errors: dict[str, list[float]] = {"world_model": [], "repeat": [], "constant_velocity": []}
    for k in range(1, steps + 1):
        true_pos = truth[k, :, :n, 2:4]
        guesses = {
            "world_model": imagined[k, :, :n, 2:4],
            "repeat": pos,
            "constant_velocity": pos + k * dt * vel,
        }
        for name, guess in guesses.items():
            errors[name].append(float((guess - true_pos).norm(dim=-1).mean()))
    picture = Path(out) if out else _run_dir(ckpt["path"]) / "dream.png"
    _draw(truth[:, 0], imagined[:, 0], n, errors, picture)
    return {"errors": errors, "picture": str(picture), "checkpoint": str(ckpt["path"])}


def _dt(truth: Tensor) -> float:
    """The env's step length, read off the data: position change over velocity."""
    moved = truth[1, :, :, 2:4] - truth[0, :, :, 2:4]
    vel = truth[0, :, :, 0:2]
    sel = vel.abs() > 1e-3
    return float((moved[sel] / vel[sel]).median()) if bool(sel.any()) else 0.0


def _run_dir(ckpt_path: Path) -> Path:
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path


def _draw(
    truth: Tensor, imagined: Tensor, n: int, errors: dict[str, list[float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i in range(n):
        (line,) = ax1.plot(truth[:, i, 2], truth[:, i, 3], "-", lw=2, label=f"agent {i} real")
        ax1.plot(imagined[:, i, 2], imagined[:, i, 3], "--", color=line.get_color(), lw=1.5)
        ax1.plot(truth[0, i, 2], truth[0, i, 3], "o", color=line.get_color())
    lm = truth[0, n:, 2:4]
    ax1.plot(lm[:, 0], lm[:, 1], "kx", ms=9, label="landmarks")
    ax1.set_title("real (solid) and imagined (dashed) paths, one world")
    ax1.set_aspect("equal")
    ax1.legend(fontsize=7, loc="best")
    ks = range(1, len(errors["world_model"]) + 1)
    for name, values in errors.items():
        ax2.plot(ks, values, marker=".", label=name.replace("_", " "))
    ax2.set_xlabel("steps dreamed")
    ax2.set_ylabel("agent position error (mean distance)")
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
