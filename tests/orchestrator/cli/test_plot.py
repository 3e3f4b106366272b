"""`shoal plot` overlays runs with random and no-op lines; references match the env's own."""

from __future__ import annotations

from orchestrator.cli.evaluate import reference_returns
from orchestrator.cli.main import main as shoal
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "train.total_env_steps=240",
    "model.hidden=16",
    "run.progress=false",
    "redis.enabled=false",
    "run.eval_every_s=null",
]
PNG = b"\x89PNG\r\n\x1a\n"


def test_several_runs_overlay_in_one_png(tmp_path, capsys) -> None:
    runs = []
    for lr in ("1e-3", "3e-3"):
        run_dir = tmp_path / f"lr-{lr}"
        run_dir.mkdir()
        run_training(load_config("spread-mlp", [*TINY, f"train.lr={lr}"]), run_dir)
        runs.append(str(run_dir))
    out = tmp_path / "both.png"
    assert shoal(["plot", *runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG
    assert shoal(["plot", *runs]) == 0  # default: comparison.png beside the first run
    assert (tmp_path / "comparison.png").read_bytes()[:8] == PNG
    assert shoal(["plot", runs[0], str(tmp_path / "missing")]) == 2
    assert "no metrics.csv" in capsys.readouterr().err


def test_references_are_the_envs_random_and_no_op_returns() -> None:
    refs = reference_returns(load_config("spread-mlp"), episodes=100)
    assert refs["random"] < 0 and refs["no-op"] < 0 and refs["random"] != refs["no-op"]
    # With groups the return counted is the trained groups': predators are paid only for tags,
    # and moving at random they tag more than standing still.
    tag = reference_returns(load_config("tag-mlp", ["groups.agent.train=false"]), episodes=100)
    assert tag["random"] > tag["no-op"] >= 0
