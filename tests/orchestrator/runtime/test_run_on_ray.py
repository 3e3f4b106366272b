"""`shoal run --ray`: the in-process topology hosted by a local Ray instance."""

from __future__ import annotations

import csv

import pytest

from orchestrator.cli.main import build_parser, parse_with_overrides
from orchestrator.config import load_config
from orchestrator.runtime.driver import runs_on_ray
from orchestrator.runtime.learner import learner_threads
from tests.cli import shoal


def test_overrides_may_follow_options() -> None:
    parser = build_parser()
    args = parse_with_overrides(parser, ["run", "spread-gnn", "--ray", "train.lr=1e-3", "a.b=2"])
    assert args.ray and args.source == "spread-gnn"
    assert args.overrides == ["train.lr=1e-3", "a.b=2"]
    for stray in (["--bogus"], ["word"]):
        with pytest.raises(SystemExit):
            parse_with_overrides(parser, ["run", "spread-gnn", "--ray", *stray])
    with pytest.raises(SystemExit):  # a command without overrides takes none
        parse_with_overrides(parser, ["presets", "x=1"])


def test_force_goes_through_ray_and_a_lone_rank_uses_every_core() -> None:
    assert not runs_on_ray(load_config("spread-gnn"))
    alone = load_config("spread-gnn", ["ray.force=true"])
    assert runs_on_ray(alone)
    assert learner_threads(alone) >= 1
    assert learner_threads(load_config("spread-gnn", ["ray.force=true", "train.threads=3"])) == 3
    shared = load_config("spread-gnn", ["rollout.num_workers=1"])
    assert learner_threads(shared) == 1  # ranks and workers share the node's cores


@pytest.mark.ray
@pytest.mark.redis
@pytest.mark.slow
def test_shoal_run_with_ray_trains_on_a_local_instance(tmp_path) -> None:
    proc = shoal(
        "run", "spread-gnn", "--ray", "env.num_envs=8", "train.rollout_len=10",
        "train.total_env_steps=160", "model.hidden=16", "run.log_every_s=0.001",
        "ray.include_dashboard=false", "ray.log_to_driver=false",
        f"run.dir={tmp_path}", "run.name=on-ray",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "on-ray" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # Rows of the Ray path carry the weights version rank 0 published after each update.
    assert [int(float(r["weights_version"])) for r in rows][-1] == 2
    assert int(float(rows[-1]["env_steps"])) == 160
