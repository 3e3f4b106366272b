"""Config: presets load, overrides apply, every mistake is one line naming the key."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest

from orchestrator.config import Config, ConfigError, load_config, preset_names
from tests.cli import shoal


def test_presets_ship_and_default_is_gnn() -> None:
    assert {"spread-gnn", "spread-mlp", "spread-transformer"} <= set(preset_names())
    assert load_config("spread-gnn").model.kind == "gnn"
    assert load_config("spread-mlp").model.kind == "mlp"
    assert load_config("spread-transformer").model.kind == "transformer"


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config("spread-gnn", ["train.lr=1e-3", "env.n_agents=4", "model.edges=knn"])
    assert cfg.train.lr == pytest.approx(1e-3) and isinstance(cfg.train.lr, float)
    assert cfg.env.n_agents == 4 and cfg.model.edges == "knn"


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("train.lrr=1", r"^train\.lrr: unknown key; valid keys in train: .*\blr\b"),
        ("trian.lr=1", r"^trian: unknown key; valid keys in the top level: .*train"),
        ("train.lr=fast", r"^train\.lr: .*valid number.*'fast'"),
        ("train.lr=-1", r"^train\.lr: .*greater than 0"),
        ("model.kind=cnn", r"^model\.kind: .*'mlp', 'gnn' or 'transformer'.*'cnn'"),
        ("env.local_ratio=2", r"^env\.local_ratio: .*less than or equal to 1"),
        ("train.lr", r"must look like section\.key=value"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config("spread-gnn", [override])
    assert "\n" not in str(info.value)


def test_impossible_combination_names_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"env\.num_envs \(7\).*learner\.num_ranks \(2\)"):
        load_config("spread-gnn", ["env.num_envs=7", "learner.num_ranks=2"])


def test_unknown_preset_lists_presets(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown preset 'sprad'; available: .*spread-gnn"):
        load_config("sprad")
    f = tmp_path / "mine.yaml"
    f.write_text("env:\n  n_agents: 5\n")
    assert load_config(str(f)).env.n_agents == 5


def test_cli_config_error_exits_2_and_starts_nothing(tmp_path) -> None:
    proc = shoal("run", "spread-gnn", "train.lrr=1", f"run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 2
    assert "train.lrr: unknown key" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory was created


def test_run_files_never_hold_the_redis_password() -> None:
    from orchestrator.config import config_to_yaml

    cfg = load_config("spread-gnn", ["redis.url=redis://shoal:s3cret@10.0.0.5:6379/0"])
    text = config_to_yaml(cfg)
    assert "s3cret" not in text
    assert "redis://shoal:***@10.0.0.5:6379/0" in text
    assert load_config("spread-gnn", ["redis.url=redis://127.0.0.1:6379/0"]).redis.url == (
        "redis://127.0.0.1:6379/0"
    )


def test_resumed_config_gets_its_password_back_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_REDIS_PASSWORD", "s3cret")
    cfg = load_config("spread-gnn", ["redis.url=redis://shoal:***@10.0.0.5:6379/0"])
    assert cfg.redis.url == "redis://shoal:s3cret@10.0.0.5:6379/0"


def test_every_key_the_readme_documents_exists() -> None:
    """docs/usage.md's configuration table names real keys (docs drift shows up here)."""
    readme = (Path(__file__).parents[2] / "docs" / "usage.md").read_text()
    fields = Config.model_fields
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", readme, flags=re.MULTILINE)
    sections = {section for section, _ in rows}
    assert sections == set(fields) - {"preset"}, "a section is missing from the README table"
    for section, keys in rows:
        for name in re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", keys):
            owner, key = name.split(".") if "." in name else (section, name)
            model = fields[owner].annotation
            if typing.get_origin(model) is dict:  # named entries: groups.<name>.<key>
                model = typing.get_args(model)[1]
            assert key in model.model_fields, f"README documents {owner}.{key}, which is no key"


def test_shoal_envs_lists_what_env_name_accepts(capsys) -> None:
    import vmas

    from orchestrator.cli.main import main

    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    for name in ("spread", "mpe2-spread", "pettingzoo:<module>", "rllib:<module>:<Class>"):
        assert name in out
    assert all(scenario in out for scenario in vmas.scenarios)


@pytest.mark.parametrize("preset", preset_names())
def test_every_preset_builds_its_env_and_policy_and_steps(preset: str) -> None:
    from orchestrator.runtime.driver import preflight

    cfg = load_config(preset, ["redis.enabled=false"])
    groups = preflight(cfg)  # builds a sub-env and the policy, acts and steps once
    assert sum(len(agents) for agents in groups.values()) >= 1


def test_a_replay_learners_stream_keeps_about_one_replay_of_whole_batches() -> None:
    # 128 envs x 64 steps a worker's entry: 300k transitions are 37 entries, plus two rounds
    # of both workers in flight; a PPO run's small chunks keep redis.replay_maxlen.
    cfg = load_config("smax-3m-qmix", ["rollout.num_workers=2"])
    assert cfg.streams_batches() and cfg.replay_stream_entries() == 37 + 4
    tight = load_config("smax-3m-qmix", ["rollout.num_workers=2", "redis.replay_maxlen=20"])
    assert tight.replay_stream_entries() == 20
    off = load_config("smax-3m-qmix", ["rollout.num_workers=2", "redis.replay=false"])
    assert not off.streams_batches() and off.replay_stream_entries() == 2000
    assert load_config("spread-gnn", ["rollout.num_workers=2"]).replay_stream_entries() == 2000
