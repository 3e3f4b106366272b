"""Agent groups: each group's policy sees its own agents at its own widths; frozen ones stay."""

from __future__ import annotations

import pytest
import torch

import envs
from agents.ppo import Learner, PPOConfig
from agents.rollout import RolloutWorker
from envs.tag import TagEnv
from orchestrator.config import ConfigError, load_config
from orchestrator.config.groups import GroupConfig, assign_agents
from policies.actor_critic import ActorCritic
from policies.distributions import Categorical, DiagGaussian, GroupedDistribution
from policies.groups import GroupedActorCritic, policy_from_meta, policy_meta

TAG = ["env.name=tag", "env.num_envs=8", "model.hidden=16", "train.rollout_len=10"]


def tag_config(*overrides: str):  # noqa: ANN201 - a Config
    return load_config("tag-mlp", [*TAG, *overrides])


def test_groups_come_from_the_envs_own_agent_names() -> None:
    infos = TagEnv(1, num_adversaries=3, num_good=2).agent_info()
    groups = {"adversary": GroupConfig(), "agent": GroupConfig()}
    assert assign_agents(groups, infos) == {"adversary": [0, 1, 2], "agent": [3, 4]}


def test_groups_come_from_name_patterns() -> None:
    infos = TagEnv(1, num_adversaries=2, num_good=2).agent_info()
    groups = {
        "hunters": GroupConfig(agents=["adversary_*"]),
        "lead": GroupConfig(agents="agent_0"),
        "rest": GroupConfig(agents=["agent_[1-9]"]),
    }
    assert assign_agents(groups, infos) == {"hunters": [0, 1], "lead": [2], "rest": [3]}


def test_no_groups_is_one_shared_policy_as_before() -> None:
    cfg = load_config("spread-mlp", ["env.num_envs=2"])
    env = cfg.env.make(2, 0, torch.device("cpu"))
    assert type(cfg.build_policy(env)) is ActorCritic


def test_each_group_has_its_own_widths_without_padding() -> None:
    # speaker: 3 observations, 3 actions; listener: 11 and 5 (the adapter pads both to the widest).
    cfg = load_config(
        "spread-mlp",
        ["env.name=pettingzoo:mpe2.simple_speaker_listener_v4", "groups.speaker.share=true",
         "groups.listener.share=true", "model.hidden=16"],
    )  # fmt: skip
    env = cfg.env.make(4, 0, torch.device("cpu"))
    assert (env.obs_dim, env.action_dim) == (11, 5)
    model = cfg.build_policy(env)
    assert isinstance(model, GroupedActorCritic)
    speaker, listener = model.units
    assert speaker.actor.body[0].in_features == 3 and speaker.actor.head.linear.out_features == 3
    assert listener.actor.body[0].in_features == 11
    assert listener.actor.head.linear.out_features == 5

    obs = env.reset(seed=1).as_dict()
    before = model.dist(obs)
    padded = {**obs, "obs": obs["obs"].clone()}
    padded["obs"][:, 0, 3:] = 7.0  # the speaker's padding: its policy must not read it
    after = model.dist(padded)
    torch.testing.assert_close(after.parts[0].logits, before.parts[0].logits)
    for _ in range(20):  # speaker actions stay in its own 3, the listener uses all 5
        action = model.act(obs)[0]
        assert int(action[:, 0].max()) < 3
        obs = env.step(action).observation.as_dict()
    env.close()


def test_the_padded_adapter_masks_actions_an_agent_does_not_have() -> None:
    env = envs.make("pettingzoo:mpe2.simple_speaker_listener_v4", num_envs=2, seed=0)
    mask = env.reset(seed=0).action_mask
    assert mask is not None
    assert mask[:, 0].sum(-1).tolist() == [3, 3] and mask[:, 1].sum(-1).tolist() == [5, 5]
    assert [(a.name, a.obs_dim, a.action_dim) for a in env.agent_info()] == [
        ("speaker_0", 3, 3),
        ("listener_0", 11, 5),
    ]
    env.close()


def _train(cfg, updates: int = 3):  # noqa: ANN001, ANN202
    env = cfg.env.make(cfg.env.num_envs, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = cfg.build_policy(env)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    learner = Learner(model, cfg.train)
    worker = RolloutWorker(env, model, cfg.train.rollout_len, seed=0)
    for _ in range(updates):
        learner.update(worker.collect())
    return model, start


def test_a_frozen_groups_weights_do_not_change() -> None:
    model, start = _train(tag_config("groups.agent.train=false"))
    assert isinstance(model, GroupedActorCritic)
    now = model.state_dict()
    frozen = [k for k in now if k.startswith("units.1.")]
    trained = [k for k in now if k.startswith("units.0.") and now[k].is_floating_point()]
    assert frozen and trained
    for k in frozen:  # parameters and value normaliser alike
        assert torch.equal(now[k], start[k]), k
    assert max((now[k] - start[k]).abs().max().item() for k in trained) > 1e-4


def test_unshared_group_trains_one_policy_per_agent() -> None:
    model, start = _train(tag_config("groups.adversary.share=false"))
    assert isinstance(model, GroupedActorCritic)
    assert len(model.units) == 4 and model.unit_of_agent.tolist() == [0, 1, 2, 3]
    now = model.state_dict()
    key = "actor.body.0.weight"
    deltas = [now[f"units.{u}.{key}"] - start[f"units.{u}.{key}"] for u in range(3)]
    assert all(d.abs().max() > 0 for d in deltas)
    assert not torch.equal(deltas[0], deltas[1])  # each agent learnt from its own samples


def test_each_policy_normalises_its_own_values() -> None:
    # Predators earn +10 a tag, prey lose 10: one shared normaliser would fit neither.
    model, _ = _train(tag_config(), updates=4)
    assert isinstance(model, GroupedActorCritic)
    predators, prey = (u.value_norm for u in model.units)
    assert predators.mean.item() > 0 > prey.mean.item()


def test_grouped_policy_rebuilds_from_its_metadata() -> None:
    cfg = tag_config("groups.agent.model.hidden=8", "groups.adversary.model.kind=gnn")
    env = cfg.env.make(2, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    copy = policy_from_meta(policy_meta(model))
    copy.load_state_dict(model.state_dict())
    obs = env.reset(seed=3).as_dict()
    torch.testing.assert_close(copy.value(obs), model.value(obs))
    a = model.act(obs)[0]
    torch.testing.assert_close(copy.dist(obs).log_prob(a), model.dist(obs).log_prob(a))


def test_every_group_frozen_is_an_error() -> None:
    cfg = tag_config("groups.agent.train=false", "groups.adversary.train=false")
    env = cfg.env.make(2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="every agent group is frozen"):
        Learner(cfg.build_policy(env), PPOConfig())


def test_config_errors_name_the_group_key() -> None:
    cfg = tag_config("groups.agent.model.hidden=15", "groups.agent.model.heads=2")
    env = cfg.env.make(2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"groups.agent.model: hidden \(15\) must be divisible"):
        cfg.build_policy(env)


@pytest.mark.parametrize("continuous", [False, True])
def test_grouped_distribution_reads_each_agent_from_its_group(continuous: bool) -> None:
    torch.manual_seed(0)
    if continuous:
        parts = [DiagGaussian(torch.randn(4, 2, 3), torch.zeros(3)),
                 DiagGaussian(torch.randn(4, 1, 2), torch.zeros(2))]  # fmt: skip
    else:
        parts = [Categorical(torch.randn(4, 2, 3)), Categorical(torch.randn(4, 1, 5))]
    agents = [torch.tensor([0, 2]), torch.tensor([1])]
    d = GroupedDistribution(parts, agents, "continuous" if continuous else "discrete", 3)
    a = d.sample()
    assert a.shape == ((4, 3, 3) if continuous else (4, 3))
    lp, ent = d.log_prob(a), d.entropy()
    if continuous:
        own = [a[:, [0, 2]], a[:, [1], :2]]
        assert torch.all(a[:, 1, 2] == 0)  # a narrower group's actions are zero-padded
    else:
        own = [a[:, [0, 2]], a[:, [1]]]
    torch.testing.assert_close(lp[:, [0, 2]], parts[0].log_prob(own[0]))
    torch.testing.assert_close(lp[:, [1]], parts[1].log_prob(own[1]))
    torch.testing.assert_close(ent[:, [1]], parts[1].entropy())


# -- self-play: a group also plays past versions of itself -------------------------------------


def test_a_past_version_acts_in_its_share_of_the_worlds_and_never_reaches_the_loss() -> None:
    cfg = tag_config("groups.agent.pool.size=4", "groups.agent.pool.share=0.5")
    env = cfg.env.make(8, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    assert isinstance(model, GroupedActorCritic) and "1" in model.past
    past = model.snapshot("agent")
    model.load_past("agent", {k: torch.randn_like(v) if v.is_floating_point() else v
                              for k, v in past.items()})  # fmt: skip
    obs = model.prepare(env.reset(seed=0).as_dict())
    flags = obs["past_agents"]
    assert flags[4:, 3].all() and not flags[:4].any() and not flags[:, :3].any()
    d = model.dist(obs)
    prey_now = model.units[1].actor(model._view(obs, 1, True)).logits
    prey_past = model.past["1"].actor(model._view(obs, 1, True)).logits
    torch.testing.assert_close(d.parts[1].logits[:4], prey_now[:4])
    torch.testing.assert_close(d.parts[1].logits[4:], prey_past[4:])
    assert not model.learn_mask(obs)[4:, 3].any() and model.learn_mask(obs)[:, :3].all()
    with model.current_only():  # evaluation plays the current prey everywhere
        assert "past_agents" not in model.prepare(env.reset(seed=0).as_dict())


def test_a_group_playing_only_past_versions_does_not_learn() -> None:
    model, start = _train(tag_config("groups.agent.pool.size=2", "groups.agent.pool.share=1.0"))
    now = model.state_dict()
    prey = [k for k in now if k.startswith("units.1.") and "value_norm" not in k]
    predators = [k for k in now if k.startswith("units.0.") and now[k].is_floating_point()]
    assert all(torch.equal(now[k], start[k]) for k in prey)
    assert max((now[k] - start[k]).abs().max().item() for k in predators) > 1e-4


def test_a_frozen_group_cannot_have_a_pool() -> None:
    cfg = tag_config("groups.agent.pool.size=2", "groups.agent.train=false")
    env = cfg.env.make(2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"groups.agent.pool.size=2 needs groups.agent.train"):
        cfg.build_policy(env)
