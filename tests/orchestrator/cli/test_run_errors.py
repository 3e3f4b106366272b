"""A user's mistake in `shoal run` is one `error:` line and exit 2, before anything starts."""

from __future__ import annotations

import re
import socket

import pytest

from orchestrator.cli.main import main as shoal


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CASES = {
    "unknown-env": (["env.name=sprad"], r"unknown env 'sprad'; available: .*spread"),
    "pettingzoo-module": (
        ["env.name=pettingzoo:no_such_module"],
        r"cannot import PettingZoo env module 'no_such_module'",
    ),
    "pettingzoo-factory": (
        ["env.name=pettingzoo:mpe2.simple_spread_v3:nofactory"],
        r"'mpe2.simple_spread_v3' has no 'nofactory'",
    ),
    "pettingzoo-kwarg": (
        ["env.name=pettingzoo:mpe2.simple_spread_v3", "env.kwargs.bogus=1"],
        r"cannot build env 'pettingzoo:mpe2.simple_spread_v3': TypeError: .*'bogus'",
    ),
    "mpe2-kwarg": (
        ["env.name=mpe2-spread", "env.kwargs.bogus=1"],
        r"cannot build env 'mpe2-spread': TypeError: .*'bogus'",
    ),
    "rllib-module": (
        ["env.name=rllib:no_such_module:Env"],
        r"cannot import RLlib env module 'no_such_module'",
    ),
    "rllib-class": (["env.name=rllib:tests.envs.toy_rllib:Nope"], r"has no 'Nope'"),
    "vmas-scenario": (
        ["env.name=vmas:nonexistent_scenario"],
        r"unknown VMAS scenario 'nonexistent_scenario'; VMAS .* has .*navigation",
    ),
    "vmas-kwarg": (
        ["env.name=vmas:navigation", "env.kwargs.bogus=1"],
        r"VMAS scenario 'navigation' does not use \{'bogus': 1\} \(env.kwargs\)",
    ),
    "spread-kwarg": (["env.kwargs.bogus=1"], r"cannot build env 'spread': TypeError: .*'bogus'"),
    "render-blind-env": (
        [
            "env.name=pettingzoo:tests.envs.test_registry_and_adapter:_MaskedToy",
            "run.render_every_s=10",
        ],
        r"run.render_every_s: env '.*_MaskedToy' neither renders rgb_array frames nor gives",
    ),
    "render-format": (["run.render_format=avi"], r"run.render_format: .*'gif' or 'mp4'"),
    "model-kind": (["model.kind=cnn"], r"model.kind: .*'mlp', 'gnn' or 'transformer'"),
    "device": (["train.device=tpu"], r"train.device: not a torch device"),
    "redis-url": (["redis.url=notaurl"], r"redis.url: must start with redis://"),
    "ray-without-redis": (["redis.enabled=false", "--ray"], r"remove redis.enabled=false"),
    "wm-architecture": (
        ["world_model.architecture=rssm"],
        r"world_model.architecture: .*'auto', 'entity' or 'observation'",
    ),
    "too-few-cpus": (
        ["ray.num_cpus=1", "rollout.num_workers=2"],
        r"ray.num_cpus=1 but the run reserves 3 CPUs",
    ),
    "replay-stream-too-short": (
        ["train.algorithm=qmix", "rollout.num_workers=2", "redis.replay_maxlen=3"],
        r"redis.replay_maxlen=3: qmix's batches travel through the replay stream, one entry "
        r"per rollout worker; raise it to at least 4",
    ),
    # Agent groups are checked against the env's agent names, in preflight.
    "group-pattern": (
        ["env.name=tag", "groups.prey.agents=nobody_*", "groups.adversary.share=true"],
        r"groups.prey.agents: 'nobody_\*' matches no agent \(the env's agents: adversary_0",
    ),
    "group-missing-agent": (
        ["env.name=tag", "groups.adversary.train=true"],
        r"agent agent_0 is in no group: add groups.agent or a pattern",
    ),
    "group-claimed-twice": (
        ["env.name=tag", "groups.adversary.share=true", "groups.all.agents=*"],
        r"agent adversary_0 is claimed by groups.adversary and groups.all",
    ),
    "group-not-in-env": (
        ["env.name=tag", "groups.predator.train=true"],
        r"groups.predator: the env has no agents named predator_<i> \(its groups: adversary, agent",
    ),
    "group-widths": (
        ["env.name=tag", "groups.everyone.agents=*"],
        r"groups.everyone: its agents see different observation/action widths",
    ),
    "group-key": (
        ["env.name=tag", "groups.adversary.trian=false"],
        r"groups.adversary.trian: "
        r"unknown key; valid keys in groups.adversary: agents, share, train",
    ),
    "group-init": (
        ["env.name=tag", "groups.adversary.init=/nonexistent/run", "groups.agent.train=true"],
        r"groups.adversary.init: no run directory or checkpoint at '/nonexistent/run'",
    ),
}


@pytest.mark.parametrize("args, expected", CASES.values(), ids=CASES.keys())
def test_a_mistake_is_one_line_and_nothing_starts(tmp_path, capsys, args, expected) -> None:
    runs = tmp_path / "runs"
    assert shoal(["run", "spread-gnn", f"run.dir={runs}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert re.search(expected, err), err
    assert not runs.exists()  # no run directory, no half-started run


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, expected",
    [
        (lambda p: [f"--address=127.0.0.1:{p}"], r"ray.address=127.0.0.1:\d+: cannot connect"),
        (lambda p: [f"redis.url=redis://127.0.0.1:{p}/0"], r"redis.url=redis://127.0.0.1:\d+/0: "),
    ],
    ids=["ray-address", "redis-address"],
)
def test_a_service_that_does_not_answer_fails_in_seconds(tmp_path, capsys, args, expected) -> None:
    runs = tmp_path / "runs"
    assert shoal(["run", "spread-gnn", f"run.dir={runs}", *args(_closed_port())]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    assert re.search(expected, last), err
    assert not runs.exists()
