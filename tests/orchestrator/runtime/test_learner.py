"""In-process training, a learner group of one: checkpoints are complete and atomic, resume
keeps counting."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from orchestrator.cli.evaluate import evaluate, plot_run
from orchestrator.config import load_config
from orchestrator.runtime import learner
from orchestrator.runtime.checkpoint import list_checkpoints, load_checkpoint
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.learner import LearnerRank, learner_threads

TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "train.total_env_steps=400",
    "run.progress=false",
    "run.log_every_s=0.001",
    "model.hidden=16",
    "redis.enabled=false",
]


@pytest.mark.parametrize(("cores", "alone", "beside_a_fit"), [(4, 4, 3), (2, 2, 1), (1, 1, 1)])
def test_a_lone_rank_leaves_a_core_to_its_world_models_fit_process(
    monkeypatch, cores: int, alone: int, beside_a_fit: int
) -> None:
    monkeypatch.setattr(learner.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert learner_threads(load_config("spread-gnn")) == alone
    assert learner_threads(load_config("spread-gnn-wm", ["world_model.fit_process=false"])) == alone
    fitting = load_config("spread-gnn-wm", ["world_model.fit_process=true"])
    assert learner_threads(fitting) == beside_a_fit
    oracle = load_config(
        "spread-gnn-wm", ["world_model.fit_process=true", "world_model.oracle=true"]
    )
    assert learner_threads(oracle) == alone  # nothing to fit: no child beside it
    threads = load_config("spread-gnn-wm", ["world_model.fit_process=true", "train.threads=2"])
    assert learner_threads(threads) == 2  # train.threads decides when it is set


def test_train_resume_continues_counters_and_state(tmp_path) -> None:
    cfg = load_config("spread-gnn", TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_training(cfg, run_dir)
    assert summary["counters"]["env_steps"] == 400 and summary["counters"]["iteration"] == 5
    # Where the time went: acting and learning, each a positive share of the iteration.
    assert summary["metrics"]["collect_s"] > 0 and summary["metrics"]["update_s"] > 0
    ckpt = load_checkpoint(run_dir)
    assert ckpt["meta"]["counters"]["env_steps"] == 400
    assert set(ckpt["learner"]) == {"optimizer", "updates"} and ckpt["learner"]["updates"] == 5
    assert "value_norm.debias" in ckpt["model"]

    cfg2 = load_config(str(run_dir / "config.yaml"), ["train.total_env_steps=800"])
    rank = LearnerRank(cfg2, run_dir=run_dir)
    rank.setup_model(resume=run_dir)
    # The resumed model is the checkpointed one, bit for bit.
    for k, v in rank.model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    summary2 = run_training(cfg2, run_dir, resume=run_dir)
    assert summary2["counters"]["env_steps"] == 800
    assert summary2["counters"]["iteration"] == 10
    assert load_checkpoint(run_dir)["learner"]["updates"] == 10
    steps = [
        float(line.split(",")[1]) for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]
    ]
    assert steps == sorted(steps) and steps[-1] == 800  # the CSV continues, monotonic
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names[-1] == "step-000000000800"


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch) -> None:
    cfg = load_config("spread-mlp", TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rank = LearnerRank(cfg, run_dir=run_dir)
    rank.setup_model()
    first = rank.checkpoint()
    rank.counters["env_steps"] = 10
    calls = {"n": 0}
    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", crash_midway)
    try:
        rank.checkpoint()
    except OSError:
        pass
    monkeypatch.setattr(torch, "save", real_save)
    assert list_checkpoints(run_dir / "checkpoints") == [first]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [first.name]  # no debris
    assert json.loads((first / "meta.json").read_text())["counters"]["env_steps"] == 0


def test_eval_on_real_mpe2_and_more_agents(tmp_path) -> None:
    cfg = load_config("spread-gnn", TINY)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(cfg, run_dir)
    res = evaluate(run_dir, episodes=6, parallel=3)
    assert res["episodes"] == 6 and res["n_agents"] == 3
    assert -200 < res["mean"] < 0 and res["stderr"] >= 0
    # A graph policy trained with 3 agents acts with 6 on the real env.
    res6 = evaluate(run_dir, n_agents=6, episodes=2, parallel=2)
    assert res6["n_agents"] == 6 and len(res6["returns"]) == 2
    png = plot_run(run_dir)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.critic=independent"],
        ["env.continuous_actions=true"],
        ["model.kind=transformer", "model.critic_kind=transformer"],
        ["model.edges=knn", "model.k=2", "model.critic_kind=gnn"],
    ],
    ids=["ippo", "continuous", "transformer", "gnn-knn-critic"],
)
def test_variants_train_and_checkpoint(tmp_path, overrides) -> None:
    cfg = load_config("spread-gnn", [*TINY, "train.minibatches=2", *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = run_training(cfg, run_dir)
    m = summary["metrics"]
    assert summary["counters"]["env_steps"] == 400
    assert all(math.isfinite(m[k]) for k in ("policy_loss", "value_loss", "entropy"))
    ckpt = load_checkpoint(run_dir)
    spec = ckpt["meta"]["policy_spec"]
    assert spec["centralised"] == ("model.critic=independent" not in overrides)
    assert spec["action_kind"] == (
        "continuous" if "env.continuous_actions=true" in overrides else "discrete"
    )


def test_the_in_process_path_needs_neither_ray_nor_redis(tmp_path) -> None:
    # A machine with torch and shoal's own dependencies but no Ray or Redis client (a GPU
    # box, a laptop) still trains in-process from the command line.
    code = (
        "import sys\n"
        "sys.modules['ray'] = None\n"
        "sys.modules['redis'] = None\n"
        "from orchestrator.cli.main import main\n"
        f"sys.exit(main(['run', 'spread-mlp', 'run.dir={tmp_path}', *{TINY!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert load_checkpoint(next(tmp_path.iterdir()))["meta"]["counters"]["env_steps"] == 400
