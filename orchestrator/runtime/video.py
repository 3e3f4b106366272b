"""Episodes of a policy as pictures: what ``shoal render`` and ``run.render_every_s`` write.

A frame comes from one of two places:

* **the env's own renderer**, for a PettingZoo env that offers ``rgb_array`` (every mpe2
  scenario, through ``pettingzoo:`` or the ``mpe2-*`` names): it is built with
  ``render_mode="rgb_array"`` and its picture gets a strip with the step and the return;
* **its entity graph** otherwise: ``node_pos`` and ``node_type`` place every agent and every
  other entity (landmarks, obstacles), drawn with matplotlib. That covers the native ``spread``
  and ``tag`` and VMAS scenarios (whose adapter places entities at their simulated positions).

Agents are coloured by group (or by the env's own group names), other entities are grey, and
the step and the return so far (the team's, or each group's) are written on every frame. An env
with neither is a :class:`CannotDraw` error.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agents.rollout import apart
from envs import Observation, VecMultiAgentEnv, name_group
from envs.pettingzoo import PettingZooVecEnv
from policies.memory import MemoryState

if TYPE_CHECKING:
    from orchestrator.config.sections import EnvConfig
    from orchestrator.runtime.learner import LearnerRank

log = logging.getLogger(__name__)

_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
WIDTH = 320
"""Width in pixels of a frame the env drew itself (mpe2 draws 700 x 700)."""


class CannotDraw(ValueError):
    """The env neither renders ``rgb_array`` nor gives its entities positions."""


def offers_frames(env: VecMultiAgentEnv) -> bool:
    """Whether ``env`` is a PettingZoo env whose renderer can return ``rgb_array`` frames."""
    if not isinstance(env, PettingZooVecEnv):
        return False
    return "rgb_array" in env.envs[0].metadata.get("render_modes", [])


def _positioned(obs: Observation) -> bool:
    return bool(obs.node_pos.abs().sum() > 0)


def _cannot(name: str) -> CannotDraw:
    return CannotDraw(
        f"env '{name}' neither renders rgb_array frames nor gives its entities positions to "
        "draw; shoal draws native spread, tag, lbf and rware, VMAS scenarios and PettingZoo "
        "envs with an rgb_array render mode"
    )


def require_ffmpeg(what: str, instead: str) -> None:
    """Raise ``ValueError`` naming ``what`` unless imageio-ffmpeg (MP4 output) is installed."""
    if importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(f"{what} needs imageio-ffmpeg; pip install imageio-ffmpeg (or {instead})")


def check_drawable(env: VecMultiAgentEnv, name: str) -> None:
    """Raise :class:`CannotDraw` unless episodes of ``env`` can be filmed (it is reset)."""
    obs = env.reset(seed=0)
    if not offers_frames(env) and env.frame() is None and not _positioned(obs):
        raise _cannot(name)


def film_env(env_cfg: EnvConfig, seed: int, device: torch.device) -> VecMultiAgentEnv:
    """One world of ``env_cfg`` to film: built with ``render_mode="rgb_array"`` if it has one."""
    env = env_cfg.make(1, seed, device)
    if not offers_frames(env) or "render_mode" in env_cfg.kwargs:
        return env
    env.close()
    kwargs = {**env_cfg.kwargs, "render_mode": "rgb_array"}
    return env_cfg.model_copy(update={"kwargs": kwargs}).make(1, seed, device)


def _drawn(obs: Observation, env: VecMultiAgentEnv, colours: list[str], title: str) -> Any:
    """World 0 drawn from its entity positions, as a PIL image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    pos = obs.node_pos[0].detach().cpu().float()
    mask = obs.node_mask[0].cpu()
    n = env.n_agents
    fig, ax = plt.subplots(figsize=(4, 4), dpi=80)
    others = [i for i in range(n, pos.shape[0]) if bool(mask[i])]
    if others:
        ax.scatter(pos[others, 0], pos[others, 1], s=160, c="lightgrey", edgecolors="grey")
    alive = obs.alive[0].cpu()
    for i in range(n):
        ax.scatter(pos[i, 0], pos[i, 1], s=90, c=colours[i], alpha=1.0 if alive[i] else 0.3)
    span = max(1.2, float(pos[mask].abs().max()) + 0.2) if bool(mask.any()) else 1.2
    ax.set_xlim(-span, span)
    ax.set_ylim(-span, span)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = fig.canvas.buffer_rgba()  # type: ignore[attr-defined]
    image = Image.frombuffer("RGBA", fig.canvas.get_width_height(), rgba)
    plt.close(fig)
    return image.convert("RGB")


def _titled(rgb: Any, title: str) -> Any:
    """The env's own picture, scaled to :data:`WIDTH`, under a strip carrying ``title``."""
    from PIL import Image, ImageDraw

    picture = Image.fromarray(rgb).convert("RGB")
    height = round(picture.height * WIDTH / picture.width)
    picture = picture.resize((WIDTH, height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (WIDTH, height + 22), "white")
    canvas.paste(picture, (0, 22))
    ImageDraw.Draw(canvas).text((6, 5), title, fill="black")
    return canvas


@dataclass
class Episode:
    """One filmed episode of world 0."""

    frames: list[Any]
    """PIL images: the first observation, then one per step."""
    per_agent: torch.Tensor
    """Each agent's return, ``[N]``."""
    slots: dict[str, list[int]] = field(default_factory=dict)
    """Agent slots by group (empty without agent groups)."""
    counted: list[int] | None = None
    """The slots of the groups being trained (``None``: every agent)."""

    @property
    def team_return(self) -> float:
        """The team's return (with agent groups: the trained groups')."""
        per = self.per_agent if self.counted is None else self.per_agent[self.counted]
        return float(per.sum())

    @property
    def group_returns(self) -> dict[str, float]:
        """Each group's return."""
        return {g: float(self.per_agent[a].sum()) for g, a in self.slots.items()}


def film(
    model: Any, env: VecMultiAgentEnv, name: str, seed: int = 0, greedy: bool = False
) -> Episode:
    """Play one episode of ``model`` on world 0 of ``env`` (see :func:`film_env`), frame by frame.

    Sampling draws from a forked RNG, so filming in the middle of training leaves the training's
    random stream as it was; every group acts with its current weights.

    Raises:
        CannotDraw: the env has no renderer and no entity positions.
    """
    infos = env.agent_info()
    groups = getattr(model, "groups", None)
    if groups:
        by_slot = {i: gi for gi, g in enumerate(groups) for i in g.agents}
        colours = [_COLOURS[by_slot[i] % len(_COLOURS)] for i in range(env.n_agents)]
    else:
        kinds = list(dict.fromkeys(name_group(a.name) for a in infos))
        colours = [_COLOURS[kinds.index(name_group(a.name)) % len(_COLOURS)] for a in infos]
    obs = env.reset(seed=seed)
    own = env.frame() is not None
    if not own and not _positioned(obs):
        raise _cannot(name)
    per_agent = torch.zeros(env.n_agents)
    slots = {g.name: list(g.agents) for g in groups} if groups else {}
    counted = [i for g in groups if g.train for i in g.agents] if groups else None

    def picture(view: Observation, t: int) -> Any:
        if slots:
            each = "  ".join(f"{g} {float(per_agent[a].sum()):.1f}" for g, a in slots.items())
            title = f"{name}  step {t}  {each}"
        else:
            title = f"{name}  step {t}  return {float(per_agent.sum()):.2f}"
        return _titled(env.frame(), title) if own else _drawn(view, env, colours, title)

    frames = [picture(obs, 0)]
    was_training = model.training
    model.eval()
    try:
        memory = MemoryState(model.memory_size)
        with torch.no_grad(), apart(model, env.device, seed):
            for t in range(1, 100_000):
                d, state = model.step(model.prepare(memory.feed(obs.as_dict())))
                res = env.step(d.mode() if greedy else d.sample())
                memory.advance(state, res.done, res.observation.alive)
                per_agent += (res.reward[0] * obs.alive[0]).float().cpu()
                done = bool(res.done[0])
                frames.append(picture(res.final if done else res.observation, t))
                if done:
                    break
                obs = res.observation
    finally:
        model.train(was_training)
    return Episode(frames, per_agent, slots, counted)


def write_video(frames: list[Any], out: Path, fps: float) -> None:
    """``frames`` as a looping GIF, or by ``out``'s suffix an H.264 MP4 (needs imageio-ffmpeg)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".mp4":
        _write_mp4(frames, out, fps)
        return
    frames[0].save(
        out, save_all=True, append_images=frames[1:], duration=math.ceil(1000 / fps), loop=0
    )


def _write_mp4(frames: list[Any], out: Path, fps: float) -> None:
    """H.264 through imageio-ffmpeg's bundled ffmpeg, frames padded to 16 px blocks."""
    import imageio_ffmpeg
    import numpy as np
    from PIL import Image

    width, height = frames[0].size
    size = (-(-width // 16) * 16, -(-height // 16) * 16)
    writer = imageio_ffmpeg.write_frames(str(out), size, fps=fps, macro_block_size=16)
    writer.send(None)  # start ffmpeg
    try:
        for frame in frames:
            canvas = Image.new("RGB", size, "white")
            canvas.paste(frame, (0, 0))
            writer.send(np.ascontiguousarray(np.asarray(canvas)))
    finally:
        writer.close()


def periodic_film(rank: LearnerRank) -> Callable[[], float] | None:
    """What ``run_loop`` calls every ``run.render_every_s`` on rank 0; ``None`` when unset.

    Every video plays the same episode start (the evaluation's seed), so videos of one run
    differ only by the weights. A video that fails is a warning and ends filming for the run;
    it never ends the training.

    Returns:
        A function writing ``RUN_DIR/videos/step-<env steps>.<run.render_format>`` and
        returning the seconds it took.
    """
    from orchestrator.runtime.best import EVAL_SEED

    cfg = rank.cfg
    if cfg.run.render_every_s is None:
        return None
    env = film_env(cfg.env, EVAL_SEED, rank.device)
    out = rank.run_dir / "videos"
    broken = False

    def record() -> float:
        nonlocal broken
        if broken:
            return 0.0
        t0 = time.perf_counter()
        path = out / f"step-{int(rank.counters['env_steps']):012d}.{cfg.run.render_format}"
        try:
            episode = film(rank.model, env, cfg.env.name, seed=EVAL_SEED)
            write_video(episode.frames, path, fps=10)
        except Exception as e:
            broken = True
            log.warning("run.render_every_s: no more videos in this run; %s", e, exc_info=True)
        return time.perf_counter() - t0

    return record
