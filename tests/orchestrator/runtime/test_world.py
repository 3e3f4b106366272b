"""A run with a world model: it trains it, practises in it, checkpoints and resumes it."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from orchestrator.cli.main import main as shoal
from orchestrator.config import ConfigError, load_config
from orchestrator.config.loading import config_to_yaml
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import run_training

pytestmark = pytest.mark.slow  # end-to-end: trains, or fits in a child process

TINY = [
    "env.num_envs=16",
    "train.rollout_len=10",
    "train.total_env_steps=640",
    "train.minibatches=2",
    "run.progress=false",
    "run.log_every_s=0.000001",
    "run.eval_every_s=null",
    "model.hidden=16",
    "redis.enabled=false",
    "world_model.enabled=true",
    "world_model.hidden=16",
    "world_model.horizon=4",
    "world_model.warmup_steps=160",
    "world_model.updates_per_iter=3",
    "world_model.batch_size=64",
    "world_model.max_error=null",
]


def _rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("oracle", [False, True], ids=["learned", "oracle"])
def test_a_run_practises_after_warm_up_and_resumes_its_model(tmp_path, capsys, oracle) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("spread-gnn", [*TINY, f"world_model.oracle={str(oracle).lower()}"])
    summary = run_training(cfg, run_dir)
    assert summary["counters"]["env_steps"] == 640  # only real steps count
    rows = _rows(run_dir)
    shares = [float(r["imagined_share"]) for r in rows]
    assert shares[0] == 0.0 and shares[-1] == pytest.approx(0.5)  # ratio 1 after warm-up
    if oracle:
        assert "wm_delta_mse" not in rows[-1]  # nothing is learned: the env is the model
        return
    assert float(rows[-1]["wm_delta_mse"]) > 0
    # Open-loop errors on the new batch before training on it: 1, 5 and H (4) steps.
    assert all(float(rows[-1][f"wm_holdout_{k}step_error"]) > 0 for k in (1, 4, 5))
    # ... and "repeat"'s beside them; the gate reads the model's against it at the horizon.
    repeat = {k: float(rows[-1][f"wm_holdout_{k}step_repeat"]) for k in (1, 4, 5)}
    assert 0 < repeat[1] < repeat[5]  # nothing-changes drifts further from the truth
    ratio = float(rows[-1]["wm_holdout_horizon_ratio"])
    assert ratio == pytest.approx(float(rows[-1]["wm_holdout_5step_error"]) / repeat[5])
    saved = load_checkpoint(run_dir)["extra"]["world_model"]
    assert saved["trainer"]["updates"] == 4 * 3  # 4 iterations x 3 model steps
    # 16 worlds x the steps with a next state in each 10-step batch (a batch's last step has
    # none, nor does the 25th step of an episode, which truncates): the replay travels along.
    assert saved["replay"]["nodes"].shape == (16 * (9 + 9 + 8 + 9), 6, 5)

    more = load_config(str(run_dir / "config.yaml"), ["train.total_env_steps=800"])
    run_training(more, run_dir, resume=run_dir)
    resumed = load_checkpoint(run_dir)["extra"]["world_model"]
    assert resumed["trainer"]["updates"] == 5 * 3  # the model's learning continued
    moved = any(not torch.equal(saved["model"][k], v) for k, v in resumed["model"].items())
    assert moved

    # `shoal dream`: the model beside the real env, k-step errors and a picture.
    assert shoal(["dream", str(run_dir), "--steps", "4", "--worlds", "8", "--start-step", "2"]) == 0
    out = capsys.readouterr().out
    assert "world model" in out and "constant velocity" in out
    assert (run_dir / "dream.png").stat().st_size > 0
    assert shoal(["dream", str(run_dir), "--steps", "30"]) == 2  # longer than an episode
    assert "must fit in the episode" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override, message",
    [
        ("world_model.horizon=0", r"world_model\.horizon: .*greater than or equal to 1"),
        ("world_model.ratio=-1", r"world_model\.ratio: .*greater than or equal to 0"),
        ("world_model.heads=3", r"world_model\.hidden \(64\) must be divisible"),
        (
            "learner.num_ranks=2 world_model.fit_process=true",
            r"world_model\.fit_process needs learner\.num_ranks=1 or rollout\.num_workers",
        ),
        ("world_model.size=3", r"world_model\.size: unknown key"),
    ],
)
def test_bad_world_model_settings_are_one_line(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config("spread-gnn", ["world_model.enabled=true", *override.split()])


def test_a_model_that_predicts_new_batches_badly_is_not_imagined_in(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("spread-gnn", [*TINY, "world_model.max_error=1e-9"]), run_dir)
    rows = _rows(run_dir)
    assert all(float(r["imagined_share"]) == 0.0 for r in rows)
    # Scored on each new batch before training on it: a real held-out error, never zero.
    scored = [float(r["wm_holdout_reward_mse"]) for r in rows if r.get("wm_holdout_reward_mse")]
    assert len(scored) >= 3 and min(scored) > 0


def test_the_gate_opens_only_for_a_model_that_beats_repeat_at_the_horizon(tmp_path) -> None:
    from types import SimpleNamespace

    from agents.world_model import Practice

    practice = object.__new__(Practice)  # the gate alone: its inputs set by hand
    practice.world, practice.max_error = SimpleNamespace(learned=True), 1.0
    practice.holdout = {}
    assert not practice.trusted()  # never scored yet
    practice.holdout = {"delta_mse": 0.8, "reward_mse": 0.4, "horizon_ratio": 0.9}
    assert practice.trusted()
    practice.holdout["horizon_ratio"] = 1.2  # loses to "nothing changes" where it matters
    assert not practice.trusted()
    practice.max_error = 1e6  # whatever the 1-step threshold
    assert not practice.trusted()
    practice.holdout = {"delta_mse": 1.1, "reward_mse": 0.4, "horizon_ratio": 0.1}
    practice.max_error = 1.0
    assert not practice.trusted()
    practice.max_error = math.inf  # the horizon test alone
    assert practice.trusted()
    practice.holdout["horizon_ratio"] = 1.2
    assert not practice.trusted()
    practice.max_error = None  # ungated
    assert practice.trusted()
    # inf (the default: the horizon test alone) survives the run directory's config.yaml; a
    # preset's own bound stays, and a user can lift it
    assert load_config("spread-gnn-wm").world_model.max_error == 0.2
    lifted = load_config("spread-gnn-wm", ["world_model.max_error=inf"])
    assert lifted.world_model.max_error == math.inf
    cfg = load_config("tag-wm")
    assert cfg.world_model.max_error == math.inf
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert load_config(str(saved)).world_model.max_error == math.inf


def test_dream_needs_a_run_with_a_world_model(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("spread-gnn", [*TINY, "world_model.enabled=false"]), run_dir)
    assert shoal(["dream", str(run_dir)]) == 2
    assert "holds no world model" in capsys.readouterr().err


def test_the_entity_model_on_an_env_without_entity_views_is_refused(tmp_path, capsys) -> None:
    args = ["run", "spread-mlp", "env.name=vmas:navigation", "world_model.enabled=true"]
    args += ["world_model.architecture=entity", f"run.dir={tmp_path / 'runs'}"]
    assert shoal(args) == 2
    err = capsys.readouterr().err
    assert "cannot turn imagined entity graphs into observations" in err
    assert "world_model.architecture=observation" in err  # and says what runs instead
    assert not (tmp_path / "runs").exists()


def test_a_next_reward_head_on_the_entity_model_is_refused(tmp_path, capsys) -> None:
    args = ["run", "spread-gnn-wm", "world_model.reward_from=next", f"run.dir={tmp_path / 'r'}"]
    assert shoal(args) == 2  # auto gives native spread the entity model
    err = capsys.readouterr().err
    assert "world_model.reward_from=next" in err and "architecture=observation" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "env, extra",
    [
        ("tag", []),
        ("pettingzoo:mpe2.simple_speaker_listener_v4", []),
        (
            "pettingzoo:mpe2.simple_speaker_listener_v4",
            ["groups.speaker.share=true", "groups.listener.share=true"],
        ),
        ("vmas:navigation", ["env.num_envs=8", "train.total_env_steps=320"]),
        ("tag", ["world_model.fit_process=true", "model.memory=gru"]),
        ("tag", ["world_model.fit_process=true", "world_model.reward_from=next"]),
    ],
    ids=[
        "tag",
        "speaker-listener",
        "speaker-listener-groups",
        "vmas-navigation",
        "tag-fit-behind-memory",
        "tag-next-reward-fit-behind",
    ],  # fmt: skip
)
def test_every_formerly_refused_env_practises_in_an_observation_model(tmp_path, env, extra) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("spread-mlp", [*TINY, f"env.name={env}", *extra])
    summary = run_training(cfg, run_dir)
    rows = _rows(run_dir)
    assert float(rows[-1]["imagined_share"]) == pytest.approx(0.5)  # practised after warm-up
    assert float(rows[-1]["wm_delta_mse"]) > 0 and float(rows[-1]["wm_reward_mse"]) > 0
    saved = load_checkpoint(run_dir)["extra"]["world_model"]
    assert "next_obs" in saved["replay"] and "agent_cont" in saved["replay"]
    assert "memory" not in saved["replay"]  # a resumed run's memory restarts at zero
    assert summary["counters"]["env_steps"] == cfg.train.total_env_steps


def test_groups_practise_in_a_model_and_a_frozen_group_learns_nothing_from_it(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("tag-mlp", [*TINY, "groups.agent.train=false"])
    run_training(cfg, run_dir)
    rows = _rows(run_dir)
    assert float(rows[-1]["imagined_share"]) == pytest.approx(0.5)
    assert rows[-1]["return/adversary"] and rows[-1]["return/agent"]  # a return per group
    # The run's initial weights, built as the learner builds them.
    torch.manual_seed(cfg.train.seed)
    initial = cfg.build_policy(cfg.env.make(1, cfg.train.seed, torch.device("cpu")))
    start, end = initial.state_dict(), load_checkpoint(run_dir)["model"]

    def moved(unit: int) -> bool:
        prefix = f"units.{unit}."
        return any(
            not torch.equal(v, start[k])
            for k, v in end.items()
            if k.startswith(prefix) and "value_norm" not in k
        )

    trained = {u: initial.groups[g].train for u, g in enumerate(initial.unit_group)}
    assert not any(moved(u) for u, t in trained.items() if not t)  # prey: real or imagined
    assert all(moved(u) for u, t in trained.items() if t)  # predators learned


def test_dream_shows_an_observation_model_beside_repeating_the_state(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_training(load_config("spread-mlp", [*TINY, "env.name=tag"]), run_dir)
    assert shoal(["dream", str(run_dir), "--steps", "4", "--worlds", "8"]) == 0
    out = capsys.readouterr().out
    assert "agent observation error" in out and "world model" in out and "repeat" in out
    assert (run_dir / "dream.png").stat().st_size > 0
