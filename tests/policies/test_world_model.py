"""The entity world model: equivariant over entities, the same weights for any team size."""

from __future__ import annotations

import torch

import envs
from policies.world_model import EntityWorldModel


def _world(n: int, b: int = 4, seed: int = 0):
    env = envs.make("spread", num_envs=b, n_agents=n, seed=seed)
    obs = env.reset(seed=seed)
    actions = env.random_actions(torch.Generator().manual_seed(seed))
    return obs, actions


def test_permuting_agents_and_landmarks_permutes_the_predictions() -> None:
    torch.manual_seed(0)
    model = EntityWorldModel(node_dim=5, action_kind="discrete", action_dim=5, hidden=32)
    obs, actions = _world(3)
    n = 3
    agents, landmarks = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    order = torch.cat([agents, n + landmarks])
    delta, reward, cont = model(obs.nodes, obs.node_mask, actions, obs.alive)
    p_delta, p_reward, p_cont = model(
        obs.nodes[:, order], obs.node_mask[:, order], actions[:, agents], obs.alive[:, agents]
    )
    torch.testing.assert_close(p_delta, delta[:, :, order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_reward, reward[:, :, agents], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_cont, cont, atol=1e-5, rtol=1e-5)


def test_the_same_weights_predict_for_three_and_for_six_agents() -> None:
    torch.manual_seed(0)
    model = EntityWorldModel(node_dim=5, action_kind="discrete", action_dim=5, hidden=32)
    for n in (3, 6):
        obs, actions = _world(n)
        nxt, reward, cont, doubt = model.predict(obs.nodes, obs.node_mask, actions, obs.alive)
        assert nxt.shape == (4, 2 * n, 5) and reward.shape == (4, n)
        assert cont.shape == (4,) and doubt.shape == (4,) and bool((doubt >= 0).all())
        assert torch.isfinite(nxt).all() and torch.isfinite(reward).all()


def test_padded_entities_do_not_change_the_others() -> None:
    torch.manual_seed(0)
    model = EntityWorldModel(node_dim=5, action_kind="discrete", action_dim=5, hidden=32)
    obs, actions = _world(3)
    pad_nodes = torch.cat([obs.nodes, torch.randn(4, 2, 5) * 10], dim=1)
    pad_mask = torch.cat([obs.node_mask, torch.zeros(4, 2, dtype=torch.bool)], dim=1)
    delta, reward, _ = model(obs.nodes, obs.node_mask, actions, obs.alive)
    p_delta, p_reward, _ = model(pad_nodes, pad_mask, actions, obs.alive)
    torch.testing.assert_close(p_delta[:, :, :6], delta, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p_reward, reward, atol=1e-5, rtol=1e-5)
    nxt, *_ = model.predict(pad_nodes, pad_mask, actions, obs.alive)
    assert torch.equal(nxt[:, 6:], pad_nodes[:, 6:])  # padding is never moved
