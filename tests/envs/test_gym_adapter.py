"""Gymnasium tuple-space envs (LBF, rware) through ``gym:<module>:<env id>``.

The adapter must step exactly as the package does on the same seeds and actions, over whole
episodes and their auto-resets, and must split the package's ``done`` into a real end and a
time limit, so GAE bootstraps where an episode was only cut off.
"""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
import torch

import envs
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

pytest.importorskip("lbforaging")
pytest.importorskip("rware")

CASES = {
    "lbf-coop": ("lbforaging", "Foraging-8x8-2p-2f-coop-v3", {}),
    "lbf-sight-2": ("lbforaging", "Foraging-2s-8x8-2p-2f-coop-v3", {}),
    "lbf-3p": ("lbforaging", "Foraging-10x10-3p-3f-v3", {"max_episode_steps": 20}),
    "rware-2ag": ("rware", "rware-tiny-2ag-v2", {"max_steps": 40}),
    "rware-4ag": ("rware", "rware-tiny-4ag-v2", {"max_steps": 40}),
}


@pytest.mark.parametrize("module, env_id, kwargs", CASES.values(), ids=CASES.keys())
def test_the_adapter_steps_as_the_package_does_over_whole_episodes(module, env_id, kwargs) -> None:
    b, seed, steps = 3, 7, 130
    env = envs.make(f"gym:{module}:{env_id}", num_envs=b, seed=seed, **kwargs)
    refs = [gymnasium.make(env_id, disable_env_checker=True, **kwargs) for _ in range(b)]
    # The adapter resets once when built (to learn its shapes) and once here: so does the
    # reference, since LBF's reset depends on where the last episode left its players.
    for i, r in enumerate(refs):
        r.reset(seed=seed + i)
    ref_obs = [np.stack(r.reset(seed=seed + i)[0]) for i, r in enumerate(refs)]
    first = env.reset(seed=seed)
    for i in range(b):
        np.testing.assert_array_equal(first.obs[i].numpy(), ref_obs[i])
    gen = torch.Generator().manual_seed(0)
    ends = 0
    for _ in range(steps):
        actions = torch.randint(0, env.action_dim, (b, env.n_agents), generator=gen)
        res = env.step(actions)
        for i, r in enumerate(refs):
            obs, reward, done, cut, _ = r.step(actions[i].tolist())
            done = done or cut  # gymnasium's TimeLimit (make's max_episode_steps) truncates
            np.testing.assert_array_equal(res.final.obs[i].numpy(), np.stack(obs))
            np.testing.assert_allclose(res.reward[i].numpy(), np.asarray(reward, np.float32))
            ended = bool(res.terminated[i].all()) or bool(res.truncated[i])
            assert ended == bool(done)
            if done:  # auto-reset: the package's own next episode
                ends += 1
                np.testing.assert_array_equal(
                    res.observation.obs[i].numpy(), np.stack(r.reset()[0])
                )
            else:
                np.testing.assert_array_equal(res.observation.obs[i].numpy(), np.stack(obs))
    assert ends >= b  # every instance ended an episode at least once


def test_lbf_ends_for_real_only_when_the_food_is_gone_and_masks_its_invalid_actions() -> None:
    env = envs.make("gym:lbforaging:Foraging-5x5-2p-1f-coop-v3", num_envs=8, seed=0)
    inner = [e.env.unwrapped for e in env.envs]
    gen = torch.Generator().manual_seed(1)
    obs = env.reset(seed=0)
    kinds = {"terminated": 0, "truncated": 0}
    t = torch.zeros(8, dtype=torch.long)
    for _ in range(600):
        for i, e in enumerate(inner):  # the mask is the package's valid actions, no more
            for j, player in enumerate(e.players):
                ok = {a.value for a in e._valid_actions[player]}
                assert set(obs.action_mask[i, j].nonzero().flatten().tolist()) == ok
        fields = [int(e.field.sum()) for e in inner]  # food left before the step
        actions = torch.randint(0, env.action_dim, (8, 2), generator=gen)
        res = env.step(actions)
        t += 1
        for i in range(8):
            if res.terminated[i].all():  # a real end: the last food was just loaded
                kinds["terminated"] += 1
                assert fields[i] > 0 and not res.truncated[i]
            if res.truncated[i]:  # the step limit with food left: bootstrapped, not terminal
                kinds["truncated"] += 1
                assert t[i] == 50 and not res.terminated[i].any()
            if res.terminated[i].all() or res.truncated[i]:
                t[i] = 0
        obs = res.observation
    assert kinds["terminated"] > 0 and kinds["truncated"] > 0, kinds


def test_a_time_limited_episode_is_bootstrapped_in_the_batch() -> None:
    from agents.rollout import RolloutWorker
    from policies import ActorCritic, PolicySpec

    env = envs.make("gym:rware:rware-tiny-2ag-v2", num_envs=4, seed=0, max_steps=6)
    spec = PolicySpec("mlp", env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, hidden=16)  # fmt: skip
    batch = RolloutWorker(env, ActorCritic(spec), rollout_len=8, seed=0).collect()
    assert batch.truncated[5].all() and not batch.truncated[:5].any()  # rware's limit: 6
    assert not batch.terminated.any()  # rware never ends for real
    assert batch.next_values[5].abs().sum() > 0  # the cut-off step is valued, not zeroed


@pytest.mark.parametrize(
    "name, message",
    [
        ("gym:lbforaging", r"name the env as 'gym:<module>:<env id>'"),
        ("gym:no_such_pkg:X-v0", r"cannot import 'no_such_pkg' for env 'X-v0'"),
        ("gym:lbforaging:Foraging-9x9-v9", r"unknown env id 'Foraging-9x9-v9'; 'lbforaging' "),
        ("gym:gymnasium:CartPole-v1", r"Tuples of per-agent spaces, got Box and Discrete"),
    ],
)
def test_bad_gym_names_are_one_line(name, message) -> None:
    with pytest.raises(envs.EnvError, match=message):
        envs.make(name, num_envs=1)


def test_a_policy_trains_on_lbf_end_to_end(tmp_path) -> None:
    cfg = load_config(
        "spread-mlp",
        [
            "env.name=gym:lbforaging:Foraging-5x5-2p-1f-coop-v3",
            "env.num_envs=8",
            "train.rollout_len=25",
            "train.total_env_steps=800",
            "model.hidden=16",
            "run.progress=false",
            "redis.enabled=false",
            "run.eval_every_s=null",
        ],
    )
    summary = run_training(cfg, tmp_path)
    assert summary["reason"] == "total_env_steps reached"
    assert summary["counters"]["env_steps"] == 800
