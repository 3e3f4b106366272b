"""JaxMARL envs through ``jaxmarl:<env>[:<map>]``: SMAX steps as JaxMARL steps it.

The reference is JaxMARL's own env, one world at a time, on the keys the adapter's schedule
gives each world (``split_keys``); the adapter runs the same functions vmapped and jitted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs

jax = pytest.importorskip("jax")
jaxmarl = pytest.importorskip("jaxmarl")

pytestmark = pytest.mark.slow  # each env compiles for ~10 s


def _reference(**kwargs):
    from jaxmarl.environments.smax import map_name_to_scenario

    return jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario("3m"), **kwargs)


def _random(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    m = mask.float().flatten(0, 1)
    return torch.multinomial(m, 1, generator=gen).view(mask.shape[:2])


def _shoot_or_go_east(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Attack whatever is in range, else move east (towards the enemy): wins against an enemy
    that does not shoot back."""
    attack = mask[..., 5:].float().argmax(-1) + 5
    return torch.where(mask[..., 5:].any(-1), attack, torch.ones_like(attack))


CASES = {
    # Random allies die, lose, or run out of time.
    "random": ({"max_steps": 20}, _random, ("lost", "truncated", "died")),
    # Allies that shoot an enemy that does not: won battles, survivors ending with them.
    "winning": ({"max_steps": 60, "enemy_shoots": False}, _shoot_or_go_east, ("won",)),
}


def _stack(d: dict, agents: list[str]) -> np.ndarray:
    return np.stack([np.asarray(d[a]) for a in agents])


@pytest.mark.parametrize("kwargs, policy, kinds", CASES.values(), ids=CASES.keys())
def test_smax_steps_as_jaxmarl_does_with_masks_alive_and_episode_ends(
    kwargs, policy, kinds
) -> None:
    from envs.jax_envs import split_keys

    b, seed = 4, 3
    env = envs.make("jaxmarl:smax:3m", num_envs=b, seed=seed, **kwargs)
    ref = _reference(**kwargs)
    agents = env.agents
    first = env.reset(seed=seed)
    key, keys = split_keys(jax.random.PRNGKey(seed), b)
    worlds = [ref.reset(k) for k in keys]
    for i, (obs, _) in enumerate(worlds):
        np.testing.assert_allclose(first.obs[i].numpy(), _stack(obs, agents), atol=1e-6)
        np.testing.assert_allclose(first.state[i].numpy(), np.asarray(obs["world_state"]),
                                   atol=1e-6)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seen = {"won": 0, "lost": 0, "truncated": 0, "died": 0}
    mask = first.action_mask
    for _ in range(100):
        actions = policy(mask, gen)
        res = env.step(actions)
        key, keys = split_keys(key, b)
        for i in range(b):
            k_step, k_reset = jax.random.split(keys[i])
            acts = {a: int(actions[i, j]) for j, a in enumerate(agents)}
            obs, st, rew, dones, _ = ref.step_env(k_step, worlds[i][1], acts)
            np.testing.assert_allclose(res.final.obs[i].numpy(), _stack(obs, agents), atol=1e-5)
            np.testing.assert_allclose(res.reward[i].numpy(), _stack(rew, agents), atol=1e-6)
            avail = _stack(ref.get_avail_actions(st), agents).astype(bool)
            assert (res.final.action_mask[i].numpy() == avail).all()  # after the step
            alive = np.asarray(st.state.unit_alive)
            assert (res.final.alive[i].numpy() == alive[:3]).all()
            seen["died"] += int((~alive[:3]).any())
            done = bool(dones["__all__"])
            assert bool(res.done[i]) == done
            if done:
                a_side_fell = not alive[:3].any() or not alive[3:].any()
                assert bool(res.truncated[i]) == (not a_side_fell)  # only a time limit
                if a_side_fell:  # a real end ends every ally, survivors of a win too
                    assert bool(res.terminated[i].all())
                    seen["won" if alive[:3].any() else "lost"] += 1
                else:
                    assert not res.terminated[i][res.final.alive[i]].any()
                    seen["truncated"] += 1
                worlds[i] = ref.reset(k_reset)
                np.testing.assert_allclose(res.observation.obs[i].numpy(),
                                           _stack(worlds[i][0], agents), atol=1e-6)  # fmt: skip
            else:
                worlds[i] = (obs, st)
        mask = res.observation.action_mask
    assert all(seen[kind] > 0 for kind in kinds), seen


@pytest.mark.parametrize(
    "name, message",
    [
        ("jaxmarl:smax:99m", r"unknown SMAX map '99m'; maps: .*3m"),
        ("jaxmarl:NoSuchEnv", r"unknown JaxMARL env 'NoSuchEnv'"),
    ],
)
def test_bad_jaxmarl_names_are_one_line(name, message) -> None:
    with pytest.raises(envs.EnvError, match=message):
        envs.make(name, num_envs=1)
