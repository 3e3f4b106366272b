"""The native Level-Based Foraging port must step as lbforaging 2.0 does, episode for episode.

Each world starts from the package's own reset (players, levels, food copied over); both then
take the same actions to the episode's end, and every observation, reward, end and action mask
must agree. The actions head for food and load when they can, so food is loaded (alone and
together), fails to load, and players collide. New episodes are the port's own draws: their
invariants (the package's spawn rules) are checked separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs
from envs.lbf import ForagingEnv, foraging_kwargs
from orchestrator.runtime import video

lbforaging = pytest.importorskip("lbforaging")
gymnasium = pytest.importorskip("gymnasium")
Action = pytest.importorskip("lbforaging.foraging.environment").Action

IDS = [
    "Foraging-8x8-2p-2f-coop-v3",
    "Foraging-2s-8x8-2p-2f-coop-v3",
    "Foraging-10x10-3p-3f-v3",
    "Foraging-2s-6x6-4p-2f-v3",
    "Foraging-5x5-3p-1f-v3",
]


def _greedy(env, rng: np.random.Generator) -> list[int]:
    """Mostly step toward the nearest food and load beside it; sometimes anything."""
    field = env.field
    foods = np.argwhere(field > 0)
    acts = []
    for p in env.players:
        r, c = p.position
        a = int(rng.integers(0, 6))
        if len(foods) and rng.random() < 0.8:
            d = np.abs(foods - (r, c)).sum(1)
            fr, fc = foods[d.argmin()]
            if d.min() == 1:
                a = 5
            elif abs(fr - r) > abs(fc - c) or (abs(fr - r) > 1 and fc == c):
                a = 1 if fr < r else 2
            else:
                a = 3 if fc < c else 4
        acts.append(a)
    return acts


def _episode(env_id: str, seed: int, kwargs: dict) -> dict:
    ref = gymnasium.make(env_id, disable_env_checker=True, **kwargs).unwrapped
    obs, _ = ref.reset(seed=seed)
    start = {
        "pos": np.array([p.position for p in ref.players]),
        "level": np.array([p.level for p in ref.players]),
        "field": ref.field.copy(),
    }
    rng = np.random.default_rng(seed)

    def masks() -> np.ndarray:
        legal = [ref._valid_actions[p] for p in ref.players]
        return np.array([[a in ok for a in Action] for ok in legal])

    steps = [{"obs": np.stack(obs), "mask": masks()}]
    while True:
        act = _greedy(ref, rng)
        obs, reward, done, _, _ = ref.step(act)
        cleared = int(ref.field.sum()) == 0
        steps.append({"act": act, "obs": np.stack(obs), "reward": np.array(reward),
                      "done": done, "cleared": cleared, "mask": masks()})  # fmt: skip
        if done:
            return {"start": start, "steps": steps}


@pytest.mark.parametrize("env_id", IDS)
def test_matches_lbforaging_for_whole_episodes(env_id: str) -> None:
    kwargs = {"penalty": 0.1} if "4p" in env_id else {}
    seeds = list(range(6))
    eps = [_episode(env_id, s, kwargs) for s in seeds]
    env = ForagingEnv(num_envs=len(seeds), **{**foraging_kwargs(env_id), **kwargs})
    first = env.reset_to(
        torch.tensor(np.stack([e["start"]["pos"] for e in eps])),
        torch.tensor(np.stack([e["start"]["level"] for e in eps])),
        torch.tensor(np.stack([e["start"]["field"] for e in eps])),
    )
    for i, e in enumerate(eps):
        np.testing.assert_array_equal(first.obs[i].numpy(), e["steps"][0]["obs"])
        np.testing.assert_array_equal(first.action_mask[i].numpy(), e["steps"][0]["mask"])
    longest = max(len(e["steps"]) for e in eps) - 1
    live = np.ones(len(seeds), bool)
    loads = 0
    for t in range(1, longest + 1):
        act = torch.tensor([e["steps"][min(t, len(e["steps"]) - 1)].get("act", [0] * env.n_agents)
                            for e in eps])  # fmt: skip
        res = env.step(act)
        for i, e in enumerate(eps):
            if not live[i]:
                continue
            want = e["steps"][t]
            msg = f"{env_id} seed {seeds[i]} step {t}"
            np.testing.assert_array_equal(res.final.obs[i].numpy(), want["obs"], err_msg=msg)
            np.testing.assert_allclose(
                res.reward[i].numpy(), want["reward"], rtol=1e-6, err_msg=msg
            )
            assert bool(res.terminated[i].all()) == (want["done"] and want["cleared"]), msg
            assert bool(res.truncated[i]) == (want["done"] and not want["cleared"]), msg
            loads += int((want["reward"] > 0).any())
            if want["done"]:
                live[i] = False
            else:
                np.testing.assert_array_equal(res.observation.action_mask[i].numpy(), want["mask"])
    assert loads > 0, "no food was ever loaded: the episodes test too little"


def test_cleared_and_timed_out_episodes_end_as_they_should() -> None:
    """Loading every food is a real end; the step limit a cut; both restart the world."""
    eps = [_episode("Foraging-8x8-2p-2f-coop-v3", s, {}) for s in range(12)]
    kinds = {(s["cleared"]) for e in eps for s in e["steps"][1:] if s["done"]}
    assert kinds == {True, False}, "the episodes should both clear the field and time out"


@pytest.mark.parametrize("env_id", IDS)
def test_new_episodes_follow_the_package_spawn_rules(env_id: str) -> None:
    kw = foraging_kwargs(env_id)
    env = ForagingEnv(num_envs=256, seed=3, **kw)
    for _ in range(3):
        env.reset()
        f, pos, level = env.field, env.pos, env.level
        b, p = level.shape
        assert ((level >= 1) & (level <= 2)).all()
        cells = pos[..., 0] * env.cols + pos[..., 1]
        assert (cells.sort(1).values.diff(1) != 0).all(), "two players on one cell"
        assert (f.flatten(1).gather(1, cells) == 0).all(), "a player on food"
        food = f > 0
        assert not food[:, [0, -1], :].any() and not food[:, :, [0, -1]].any(), "food on the border"
        count = food.flatten(1).sum(1)
        assert (count == kw["max_num_food"]).float().mean() > 0.9
        three = level.sort(1).values[:, :3].sum(1)
        if kw["force_coop"]:
            assert (f[food] == three.repeat_interleave(count)).all()
        else:
            assert (f[food] >= 1).all() and (f[food] <= three.repeat_interleave(count)).all()
        for w in range(16):  # no two foods adjacent (8-neighbourhood) or two apart in line
            rc = food[w].nonzero()
            d = (rc.unsqueeze(0) - rc.unsqueeze(1)).abs()
            off = ~torch.eye(len(rc), dtype=torch.bool)
            assert not ((d.amax(-1) <= 1) & off).any()
            in_line = d.amin(-1) == 0
            assert not (in_line & (d.amax(-1) == 2)).any()
        for _ in range(60):
            env.step(env.random_actions())


def test_auto_reset_returns_the_final_view_and_a_fresh_world() -> None:
    env = envs.make("lbf:Foraging-8x8-2p-2f-coop-v3", num_envs=64, seed=0, max_episode_steps=5)
    env.reset()
    gen = torch.Generator().manual_seed(0)  # the test's own draws, whatever ran before it
    for _ in range(5):
        res = env.step(env.random_actions(gen))
    assert bool((res.truncated | res.terminated.all(1)).all())
    assert torch.equal(env.steps, torch.zeros_like(env.steps))
    assert not torch.equal(res.final.obs, res.observation.obs)


@pytest.mark.parametrize(
    "name, kwargs, message",
    [
        ("lbf:Foraging-8x8-v9", {}, r"lbf: unknown env id 'Foraging-8x8-v9'"),
        ("lbf:Foraging-grid-8x8-2p-2f-v3", {}, r"grid-observation ids go through gym:"),
        ("lbf:Foraging-8x8-2p-2f-v3", {"grid_observation": True}, r"grid_observation is not"),
        ("lbf:Foraging-8x8-2p-2f-v3", {"sight": 0}, r"sight must be >= 1, got 0"),
        ("lbf:Foraging-8x8-2p-2f-v3", {"no_such": 1}, r"unexpected keyword argument 'no_such'"),
    ],
)
def test_bad_names_and_arguments_are_one_line(name, kwargs, message) -> None:
    with pytest.raises(envs.EnvError, match=message):
        envs.make(name, num_envs=1, **kwargs)


def test_frame_draws_world_zero_and_its_last_step() -> None:
    env = envs.make("lbf:Foraging-8x8-2p-2f-coop-v3", num_envs=2, seed=0, max_episode_steps=3)
    env.reset()
    first = env.frame()
    assert first.shape == (8 * 32 + 1, 8 * 32 + 1, 3) and first.dtype == np.uint8
    gen = torch.Generator().manual_seed(0)  # the test's own draws, whatever ran before it
    for _ in range(3):
        res = env.step(env.random_actions(gen))
    assert bool(res.done[0])
    ended = env.frame()  # the episode's end, not the next episode's start
    pos = env._view[0] if env._view is not None else None
    assert pos is not None and not torch.equal(pos, env.pos[0])
    assert not np.array_equal(first, ended)
    video.check_drawable(env, "lbf:Foraging-8x8-2p-2f-coop-v3")  # run.render_every_s takes it
