"""`shoal render`: a GIF of one episode, a frame per step plus the first observation."""

from __future__ import annotations

import pytest
from PIL import Image

from orchestrator.cli.main import main as shoal
from orchestrator.cli.render import render
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "train.total_env_steps=160",
    "model.hidden=16",
    "run.progress=false",
    "redis.enabled=false",
    "run.eval_every_s=null",
]


def _run(tmp_path, preset: str, *overrides: str, name: str | None = None):  # noqa: ANN202
    run_dir = tmp_path / (name or preset)
    run_dir.mkdir()
    run_training(load_config(preset, [*TINY, *overrides]), run_dir)
    return run_dir


def test_render_writes_one_frame_per_step_of_an_episode(tmp_path, capsys) -> None:
    run_dir = _run(tmp_path, "spread-gnn", "env.max_cycles=7")
    assert shoal(["render", str(run_dir)]) == 0
    gif = Image.open(run_dir / "episode.gif")
    assert gif.n_frames == 8 and gif.size[0] > 100
    assert "8 frames" in capsys.readouterr().out
    res = render(run_dir, out=tmp_path / "six.gif", n_agents=6)  # a graph policy, twice the team
    assert res["frames"] == 8 and res["team_return"] < 0


def test_render_reports_each_groups_return(tmp_path) -> None:
    run_dir = _run(tmp_path, "tag-mlp", "groups.agent.train=false")
    res = render(run_dir, seed=1)
    assert res["frames"] == 26 and set(res["group_returns"]) == {"adversary", "agent"}
    assert res["team_return"] == pytest.approx(res["group_returns"]["adversary"])


def test_render_mistakes_are_one_line(tmp_path, capsys) -> None:
    run_dir = _run(tmp_path, "spread-mlp")
    assert shoal(["render", str(run_dir), "--out", str(tmp_path / "x.avi")]) == 2
    assert ".gif or .mp4" in capsys.readouterr().err
    assert shoal(["render", str(run_dir), "--n-agents", "6"]) == 2  # an MLP is tied to its team
    assert "graph or transformer" in capsys.readouterr().err
    sl = _run(
        tmp_path, "spread-mlp", "env.name=pettingzoo:mpe2.simple_speaker_listener_v4", name="sl"
    )
    assert shoal(["render", str(sl)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no positions to draw" in err
    assert not (tmp_path / "x.avi").exists()


def test_render_writes_an_mp4_with_a_frame_per_step(tmp_path, capsys) -> None:
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    run_dir = _run(tmp_path, "spread-gnn", "env.max_cycles=7")
    out = tmp_path / "episode.mp4"
    assert shoal(["render", str(run_dir), "--out", str(out), "--fps", "8"]) == 0
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == 8 and seconds == pytest.approx(1.0, abs=0.2)


def test_an_mp4_without_imageio_ffmpeg_is_one_line(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    run_dir = _run(tmp_path, "spread-mlp")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "imageio_ffmpeg" else real(n, *a)
    )
    assert shoal(["render", str(run_dir), "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "pip install imageio-ffmpeg" in err
    assert not (tmp_path / "x.mp4").exists()
