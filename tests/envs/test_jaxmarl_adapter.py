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


def _reference(max_steps: int):
    from jaxmarl.environments.smax import map_name_to_scenario

    return jaxmarl.make("HeuristicEnemySMAX", scenario=map_name_to_scenario("3m"),
                        max_steps=max_steps)  # fmt: skip


def _stack(d: dict, agents: list[str]) -> np.ndarray:
    return np.stack([np.asarray(d[a]) for a in agents])


def test_smax_steps_as_jaxmarl_does_with_masks_alive_and_time_limits() -> None:
    from envs.jax_envs import split_keys

    b, seed = 4, 3
    env = envs.make("jaxmarl:smax:3m", num_envs=b, seed=seed, max_steps=20)
    ref = _reference(20)
    agents = env.agents
    first = env.reset(seed=seed)
    key, keys = split_keys(jax.random.PRNGKey(seed), b)
    worlds = [ref.reset(k) for k in keys]
    for i, (obs, _) in enumerate(worlds):
        np.testing.assert_allclose(first.obs[i].numpy(), _stack(obs, agents), atol=1e-6)
        np.testing.assert_allclose(first.state[i].numpy(), np.asarray(obs["world_state"]),
                                   atol=1e-6)  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seen = {"won_or_lost": 0, "truncated": 0, "died": 0}
    mask = first.action_mask
    for _ in range(100):
        m = mask.float().view(-1, env.action_dim)
        actions = torch.multinomial(m, 1, generator=gen).view(b, env.n_agents)
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
                if a_side_fell:
                    assert bool(res.terminated[i].all())
                    seen["won_or_lost"] += 1
                else:
                    assert not res.terminated[i][res.final.alive[i]].any()
                    seen["truncated"] += 1
                worlds[i] = ref.reset(k_reset)
                np.testing.assert_allclose(res.observation.obs[i].numpy(),
                                           _stack(worlds[i][0], agents), atol=1e-6)  # fmt: skip
            else:
                worlds[i] = (obs, st)
        mask = res.observation.action_mask
    assert all(v > 0 for v in seen.values()), seen


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
