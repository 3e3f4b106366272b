"""``shoal render``: an episode of a trained policy, drawn frame by frame into a GIF or MP4.

The frames come from :mod:`orchestrator.runtime.video`: the env's own ``rgb_array`` renderer
for PettingZoo envs that have one (mpe2's scenarios), otherwise the env's entity positions
(native ``spread`` and ``tag``, VMAS). An env with neither is a one-line error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from orchestrator.config import Config
from orchestrator.runtime.checkpoint import BEST, load_checkpoint, policy_from_checkpoint
from orchestrator.runtime.video import film, film_env, require_ffmpeg, write_video


def _yaml(text: str) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    return data


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
            or an env that cannot be drawn (:class:`~orchestrator.runtime.video.CannotDraw`).
    """
    run = Path(run)
    out_path = Path(out) if out is not None else run / "episode.gif"
    video = out_path.suffix.lower() == ".mp4"
    if not video and out_path.suffix.lower() != ".gif":
        raise ValueError(f"--out {out_path}: shoal render writes .gif or .mp4; name one of those")
    if video:
        require_ffmpeg(f"--out {out_path}: MP4", "write a .gif")
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
    env = film_env(on, seed, torch.device("cpu"))
    try:
        overrides: dict[str, Any] = {}
        if not grouped:
            overrides = {"obs_dim": env.obs_dim, "state_dim": env.state_dim}
        model = policy_from_checkpoint(ckpt, "cpu", **overrides)
        episode = film(model, env, cfg.env.name, seed=seed, greedy=greedy)
    finally:
        env.close()
    write_video(episode.frames, out_path, fps)
    return {
        "out": str(out_path),
        "frames": len(episode.frames),
        "team_return": episode.team_return,
        "group_returns": episode.group_returns,
        "checkpoint": str(ckpt["path"]),
    }
