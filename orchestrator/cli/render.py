"""``shoal render``: an episode of a trained policy, drawn frame by frame into a GIF or MP4.

Frames are drawn from what the env already reports, its entity graph: ``node_pos`` and
``node_type`` place every agent and every other entity (landmarks, obstacles). That covers
the native ``spread`` and ``tag``, mpe2's ``simple_spread`` through ``mpe2-spread`` and VMAS
scenarios (whose adapter places entities at their simulated positions). Agents are coloured by
group (or by the env's own group names), other entities are grey, and the step and the
return so far (the team's, or each group's) are written on every frame. An env whose
entities have no positions is a one-line error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch

from envs import Observation, VecMultiAgentEnv, name_group
from orchestrator.config import Config
from orchestrator.runtime.checkpoint import BEST, load_checkpoint, policy_from_checkpoint

_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


def _frame(obs: Observation, env: VecMultiAgentEnv, colours: list[str], title: str) -> Any:
    """One RGB frame (a PIL image) of world 0."""
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


def _write_mp4(frames: list[Any], out: Path, fps: float) -> None:
    """H.264 in an MP4 through imageio-ffmpeg's bundled ffmpeg, frames padded to 16 px blocks."""
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


def render(
    run: str | Path,
    out: str | Path | None = None,
    n_agents: int | None = None,
    seed: int = 0,
    greedy: bool = False,
    which: str | None = None,
    fps: int = 10,
) -> dict[str, Any]:
    """Play one episode of a run's policy on its own env and write it as a GIF.

    Args:
        run: run or checkpoint directory.
        out: the GIF or MP4 (default ``RUN/episode.gif``); MP4 needs imageio-ffmpeg.
        n_agents: another team size (graph and transformer policies).
        seed: the episode's reset and sampling seed.
        greedy: most likely actions instead of sampled ones.
        which: ``best`` or ``latest`` (default: best when the run kept one).
        fps: frames per second of the GIF or video.

    Returns:
        ``out``, ``frames`` (steps + 1: the first observation, then one per step),
        ``team_return`` (with agent groups: the trained groups'), ``group_returns``,
        ``checkpoint``.

    Raises:
        ValueError: an output that is neither .gif nor .mp4 (or .mp4 without imageio-ffmpeg),
            or an env without entity positions.
    """
    run = Path(run)
    out_path = Path(out) if out is not None else run / "episode.gif"
    video = out_path.suffix.lower() == ".mp4"
    if not video and out_path.suffix.lower() != ".gif":
        raise ValueError(f"--out {out_path}: shoal render writes .gif or .mp4; name one of those")
    if video and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise ValueError(
            f"--out {out_path}: MP4 needs imageio-ffmpeg; pip install imageio-ffmpeg "
            "(or write a .gif)"
        )
    if which is None:
        which = BEST if (run / "checkpoints" / BEST).is_dir() else "latest"
    ckpt = load_checkpoint(run, which=which)
    cfg = Config.model_validate(_yaml(ckpt["config"]))
    grouped = "policy_groups" in ckpt["meta"]
    if n_agents is not None and (grouped or ckpt["meta"]["policy_spec"]["kind"] == "mlp"):
        raise ValueError(
            "--n-agents needs a graph or transformer policy without agent groups; this run's "
            "policy is tied to its team"
        )
    on = cfg.env.model_copy(update={"n_agents": n_agents or cfg.env.n_agents})
    env = on.make(1, seed, torch.device("cpu"))
    try:
        overrides: dict[str, Any] = {}
        if not grouped:
            overrides = {"obs_dim": env.obs_dim, "state_dim": env.state_dim}
        model = policy_from_checkpoint(ckpt, "cpu", **overrides)
        model.eval()
        infos = env.agent_info()
        groups = getattr(model, "groups", None)
        if groups:
            by_slot = {i: gi for gi, g in enumerate(groups) for i in g.agents}
            colours = [_COLOURS[by_slot[i] % len(_COLOURS)] for i in range(env.n_agents)]
        else:
            kinds = list(dict.fromkeys(name_group(a.name) for a in infos))
            colours = [_COLOURS[kinds.index(name_group(a.name)) % len(_COLOURS)] for a in infos]
        obs = env.reset(seed=seed)
        if not bool(obs.node_pos.abs().sum() > 0):
            raise ValueError(
                f"env '{cfg.env.name}' gives its entities no positions to draw; shoal render "
                "draws native spread and tag, mpe2-spread and VMAS scenarios"
            )
        torch.manual_seed(seed)
        per_agent = torch.zeros(env.n_agents)
        slots = {g.name: list(g.agents) for g in groups} if groups else {}
        counted = [i for g in groups if g.train for i in g.agents] if groups else None

        def title(t: int) -> str:
            if not slots:
                return f"{cfg.env.name}  step {t}  return {float(per_agent.sum()):.2f}"
            each = "  ".join(f"{g} {float(per_agent[a].sum()):.1f}" for g, a in slots.items())
            return f"{cfg.env.name}  step {t}  {each}"

        frames = [_frame(obs, env, colours, title(0))]
        current = getattr(model, "current_only", contextlib.nullcontext)
        with torch.no_grad(), current():
            for t in range(1, 100_000):
                d = model.dist(model.prepare(obs.as_dict()))
                res = env.step(d.mode() if greedy else d.sample())
                per_agent += (res.reward[0] * obs.alive[0]).float().cpu()
                done = bool(res.done[0])
                view = res.final if done else res.observation
                frames.append(_frame(view, env, colours, title(t)))
                if done:
                    break
                obs = res.observation
    finally:
        env.close()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if video:
        _write_mp4(frames, out_path, fps)
    else:
        frames[0].save(
            out_path,
            save_all=True,
            append_images=frames[1:],
            duration=math.ceil(1000 / fps),
            loop=0,
        )
    ret = float(per_agent[counted].sum() if counted is not None else per_agent.sum())
    return {
        "out": str(out_path),
        "frames": len(frames),
        "team_return": ret,
        "group_returns": {g: float(per_agent[a].sum()) for g, a in slots.items()},
        "checkpoint": str(ckpt["path"]),
    }
