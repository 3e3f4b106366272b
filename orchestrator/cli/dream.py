"""``shoal dream RUN``: the run's world model next to the real env, from the same start.

The run's policy plays real episodes. From each episode's first state the world model
replays the same actions on its own, feeding nothing real back, so errors compound as they
would in imagination. ``dream`` prints the k-step error of agent positions beside two
baselines that need no model (the state stays as it was; agents keep their velocity) and
writes a picture: one world's agents and landmarks, real and imagined paths, and the error
per step. For an observation model (any env) the error is that of each agent's observation
vector, beside "repeat", and the picture is the error per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from agents.imagination import EntityWorld, LearnedDynamics, ObservationWorld, open_loop
from envs import Observation, StepResult
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import load_checkpoint, policy_from_checkpoint
from orchestrator.runtime.world import model_from_checkpoint
from policies.memory import MemoryState
from policies.observation_model import ObservationWorldModel


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
        and for entity models ``constant_velocity``), what they measure (``measure``),
        ``picture`` and ``checkpoint``.

    Raises:
        ValueError: the run has no world model, or ``steps`` exceeds the episode.
        FileNotFoundError: no checkpoint there.
    """
    ckpt = load_checkpoint(run, which=which)
    cfg = Config.model_validate(yaml.safe_load(ckpt["config"]))
    env = cfg.env.make(worlds, seed, torch.device("cpu"))
    policy = policy_from_checkpoint(ckpt)
    model = model_from_checkpoint(ckpt, cfg, env, policy)
    limit = env.max_episode_steps or steps + start_step
    if start_step < 0 or not 1 <= steps <= limit - start_step:
        raise ValueError(
            f"--start-step ({start_step}) plus --steps ({steps}) must fit in the episode "
            f"({limit} steps), with --steps at least 1"
        )
    torch.manual_seed(seed)
    obs = env.reset(seed=seed)
    memory = MemoryState(policy.memory_size)  # the policy's memory, carried through the episode

    def act(view: Observation) -> tuple[Tensor, StepResult]:
        dist, state = policy.step(memory.feed(view.as_dict()))
        action = dist.sample()
        res = env.step(action)
        memory.advance(state, res.done, res.observation.alive)
        return action, res

    for _ in range(start_step):
        obs = act(obs)[1].observation
    start = obs
    seen, actions = [obs.as_dict()], []
    for _ in range(steps):
        a, res = act(obs)
        obs = res.final  # the episode's own last view, even at a time limit
        actions.append(a)
        seen.append(obs.as_dict())
        obs = res.observation
    env.close()
    picture = Path(out) if out else _run_dir(ckpt["path"]) / "dream.png"
    if isinstance(model, ObservationWorldModel):
        obs_errors = _observation_errors(model, seen, start.alive, actions)
        _draw_errors(obs_errors, picture, "agent observation error (mean distance)")
        return {
            "errors": obs_errors, "picture": str(picture), "checkpoint": str(ckpt["path"]),
            "measure": "agent observation",
        }  # fmt: skip
    truth = torch.stack([s["nodes"] for s in seen])  # [K+1, B, E, F]
    world = EntityWorld(LearnedDynamics(model), env.observe_entities)
    dreamt = open_loop(
        world, {"nodes": truth[0], "node_mask": start.node_mask}, start.alive, actions
    )
    imagined = torch.stack([s["nodes"] for s in dreamt])
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
    _draw(truth[:, 0], imagined[:, 0], n, errors, picture)
    return {
        "errors": errors, "picture": str(picture), "checkpoint": str(ckpt["path"]),
        "measure": "agent position",
    }  # fmt: skip


def _observation_errors(
    model: ObservationWorldModel,
    seen: list[dict[str, Tensor]],
    alive: Tensor,
    actions: list[Tensor],
) -> dict[str, list[float]]:
    """k-step errors of each agent's observation vector: the model against "repeat"."""
    world = ObservationWorld(model)
    keys = world.kept.keys
    dreamt = open_loop(world, {k: seen[0][k] for k in keys}, alive, actions)
    errors: dict[str, list[float]] = {"world_model": [], "repeat": []}
    for k in range(1, len(actions) + 1):
        truth = {key: seen[k][key] for key in keys}
        for name, guess in (("world_model", dreamt[k]), ("repeat", dreamt[0])):
            dist, weight = world.distance(guess, truth, alive)
            errors[name].append(float((dist * weight).sum() / weight.sum().clamp(min=1)))
    return errors


def _draw_errors(errors: dict[str, list[float]], path: Path, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ks = range(1, len(errors["world_model"]) + 1)
    for name, values in errors.items():
        ax.plot(ks, values, marker=".", label=name.replace("_", " "))
    ax.set_xlabel("steps dreamed")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
