"""`shoal render`: a GIF of one episode, a frame per step plus the first observation."""

from __future__ import annotations

import csv
import re

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
    toy = "pettingzoo:tests.envs.test_registry_and_adapter:_MaskedToy"  # no renderer
    blind = _run(tmp_path, "spread-mlp", f"env.name={toy}", name="blind")
    assert shoal(["render", str(blind)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rgb_array" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.avi").exists()


def test_render_films_a_pettingzoo_env_with_its_own_renderer(tmp_path) -> None:
    # speaker_listener's entities have no positions shoal knows of; mpe2 draws it itself.
    run_dir = _run(tmp_path, "spread-mlp", "env.name=pettingzoo:mpe2.simple_speaker_listener_v4")
    res = render(run_dir, out=tmp_path / "sl.gif")
    gif = Image.open(tmp_path / "sl.gif")
    assert res["frames"] == gif.n_frames == 26  # max_cycles 25, plus the first observation
    assert gif.size == (320, 342)  # mpe2's 700 x 700, scaled, under the title strip
    first = gif.convert("RGB")
    assert len(set(first.getdata())) > 10  # a picture, not a blank canvas


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


def test_videos_during_training_leave_the_training_as_it_was(tmp_path, capsys) -> None:
    steps = ["env.max_cycles=7", "train.total_env_steps=480", "run.log_every_s=0.001"]
    filmed = _run(tmp_path, "spread-gnn", *steps, "run.render_every_s=0.001", name="filmed")
    plain = _run(tmp_path, "spread-gnn", *steps, name="plain")
    videos = sorted((filmed / "videos").glob("step-*.gif"))
    # one after the first iteration, the next ones spaced so that videos cost at most a tenth
    # of the run, and the last the policy the run ended with
    assert len(videos) >= 2 and videos[-1].name == "step-000000000480.gif"
    assert all(Image.open(v).n_frames == 8 for v in videos)
    assert not (plain / "videos").exists()
    assert shoal(["run", "spread-gnn", f"run.dir={tmp_path}", "run.name=cli", *TINY[:-1],
                  "run.render_every_s=1000"]) == 0  # fmt: skip
    assert re.search(r"videos +1, the last ", capsys.readouterr().out)

    # Filming samples from a forked RNG: the filmed run trained exactly as the plain one did.
    def learning(run_dir):  # noqa: ANN001, ANN202
        with open(run_dir / "metrics.csv") as f:
            keys = ("policy_loss", "value_loss", "grad_norm", "episode_return")
            return [[row[k] for k in keys] for row in csv.DictReader(f)]

    assert len(learning(filmed)) == 6 and learning(filmed) == learning(plain)
