"""MASAC / ISAC: the squashed policy, soft targets, the temperature, learning and the seams."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from agents.algorithm import ALGORITHMS
from agents.rollout import RolloutBatch, RolloutWorker
from agents.soft_actor_critic import SACConfig, SoftActorCritic, soft_targets
from agents.value_decomposition import QConfig
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import ConfigError, load_config
from orchestrator.runtime.checkpoint import policy_from_checkpoint
from orchestrator.runtime.driver import preflight
from policies.actor_critic import PolicySpec
from policies.groups import AgentGroup
from policies.sac import GroupedSACPolicy, SACPolicy, SquashedGaussian
from tests.agents.relay import RELAY, RUN, train_on_relay


def _spec(kind: str = "mlp", action_kind: str = "continuous", a: int = 2) -> PolicySpec:
    return PolicySpec(kind=kind, obs_dim=5, state_dim=7, node_dim=5, action_kind=action_kind,
                      action_dim=a, hidden=32, action_low=0.0, action_high=1.0)  # fmt: skip


def _train(**settings: Any) -> Any:
    fields = {**QConfig().model_dump(), **SACConfig().model_dump()}
    fields.update(lr=3e-3, gamma=0.0, max_grad_norm=10.0, learning_starts=0,
                  updates_per_batch=1, replay_batch=128)  # fmt: skip
    fields.update(settings)
    return type("T", (), fields)


def _batch(actions: torch.Tensor, rewards: torch.Tensor, t: int = 5, b: int = 8) -> RolloutBatch:
    n = rewards.shape[-1]
    g = torch.Generator().manual_seed(1)
    z = torch.zeros(t, b, n)
    return RolloutBatch(
        obs={"obs": torch.randn(t, b, n, 5, generator=g),
             "state": torch.randn(t, b, 7, generator=g),
             "alive": torch.ones(t, b, n, dtype=torch.bool)},
        actions=actions, logp=z, values=z, rewards=rewards,
        terminated=torch.zeros(t, b, n, dtype=torch.bool),
        truncated=torch.zeros(t, b, dtype=torch.bool), next_values=z,
        episode_returns=torch.zeros(0), episode_lengths=torch.zeros(0),
    )  # fmt: skip


def test_the_squashed_gaussian_stays_in_the_box_and_scores_its_own_samples() -> None:
    torch.manual_seed(0)
    d = SquashedGaussian(torch.randn(256, 3) * 3, torch.randn(256, 3).clamp(-2, 1), -2.0, 0.5)
    action, logp = d.rsample()
    assert ((action >= -2.0) & (action <= 0.5)).all()
    inside = (action > -1.99) & (action < 0.49)  # away from the edges, where atanh is exact
    rows = inside.all(-1)
    torch.testing.assert_close(d.log_prob(action)[rows], logp[rows], atol=2e-3, rtol=1e-4)
    assert ((d.mode() >= -2.0) & (d.mode() <= 0.5)).all()
    # A 1-D density integrates to one over the box.
    one = SquashedGaussian(torch.tensor([[0.3]]), torch.tensor([[-0.5]]), -1.0, 3.0)
    grid = torch.linspace(-1.0, 3.0, 20001)[1:-1].view(-1, 1)
    mass = torch.trapezoid(
        one.log_prob(grid.unsqueeze(0).transpose(0, 1)).exp().squeeze(), grid.squeeze()
    )
    assert mass.item() == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("action_kind", ["discrete", "continuous"])
def test_soft_targets_bootstrap_from_the_target_critics_only_where_agents_go_on(
    action_kind: str,
) -> None:
    torch.manual_seed(0)
    model = SACPolicy(_spec(action_kind=action_kind, a=3), n_agents=2)
    target = SACPolicy(_spec(action_kind=action_kind, a=3), n_agents=2).critics
    nxt = {"obs": torch.randn(64, 2, 5), "state": torch.randn(64, 7),
           "alive": torch.ones(64, 2, dtype=torch.bool)}  # fmt: skip
    rewards = torch.randn(64, 2)
    done = torch.rand(64, 2) > 0.5
    alpha = torch.tensor(0.3)
    torch.manual_seed(1)
    y = soft_targets(model, target, nxt, rewards, done, alpha, 0.9)
    torch.testing.assert_close(y[done], rewards[done])  # a terminated agent's target is r
    for p in model.critics.parameters():  # the online critics play no part
        p.data.add_(1.0)
    torch.manual_seed(1)
    torch.testing.assert_close(soft_targets(model, target, nxt, rewards, done, alpha, 0.9), y)
    target[0].mlp[-1].bias.data.add_(5.0)  # a target critic's value rises by 5 ...
    target[1].mlp[-1].bias.data.add_(5.0)
    torch.manual_seed(1)
    raised = soft_targets(model, target, nxt, rewards, done, alpha, 0.9)
    torch.testing.assert_close((raised - y)[~done], torch.full_like(y[~done], 4.5))  # ... γ·5


def test_the_temperature_falls_while_the_policy_is_more_random_than_its_target() -> None:
    torch.manual_seed(0)
    model = SACPolicy(_spec(action_kind="discrete", a=5), n_agents=3)
    learner = SoftActorCritic(model, _train())
    assert learner.target_entropy.tolist() == pytest.approx([0.89 * math.log(5)])
    batch = _batch(torch.randint(5, (5, 8, 3)), torch.zeros(5, 8, 3))
    alphas = [learner.update(batch)["alpha"] for _ in range(5)]
    assert alphas[-1] < alphas[0] < 0.2  # a fresh policy is near uniform: entropy log 5
    fixed = SoftActorCritic(SACPolicy(_spec(), n_agents=3), _train(autotune_alpha=False))
    assert fixed.target_entropy == -2.0  # -|A| for continuous actions
    fixed.update(_batch(torch.rand(5, 8, 3, 2), torch.zeros(5, 8, 3)))
    assert fixed.log_alpha.exp().item() == pytest.approx(0.2)


@pytest.mark.parametrize("centralised", [True, False], ids=["masac", "isac"])
def test_continuous_actor_moves_towards_the_best_action(centralised: bool) -> None:
    # γ = 0 and each agent's reward -(a - 0.8)² summed over action dims: the critics learn
    # the bowl from uniformly random actions and the actor's mode moves towards its bottom.
    torch.manual_seed(0)
    model = SACPolicy(_spec(), n_agents=3, centralised=centralised)
    learner = SoftActorCritic(model, _train(alpha_init=0.01, autotune_alpha=False))
    actions = torch.rand(5, 64, 3, 2)
    batch = _batch(actions, -(actions - 0.8).square().sum(-1), b=64)
    before = model.policy({k: v[0] for k, v in batch.obs.items()}).mode()
    assert (before - 0.5).abs().max() < 0.05  # a fresh policy is centred in the box
    for _ in range(300):
        stats = learner.update(batch)
    assert all(math.isfinite(v) for v in stats.values())
    after = model.policy({k: v[0] for k, v in batch.obs.items()}).mode()
    assert (after > before + 0.05).all()  # every agent's action rose towards the bottom
    assert (after - 0.8).abs().mean() < 0.2  # from 0.3 at the start


@pytest.mark.parametrize("algorithm", ["masac", "isac"])
def test_learns_a_cooperative_task_checkpoints_and_evaluates_with_the_mode(
    algorithm: str, tmp_path: Path
) -> None:
    run_dir, ckpt = train_on_relay(tmp_path, algorithm, 8000)  # best 12, chance 4
    assert ckpt["meta"]["sac_policy"]["centralised"] == (algorithm == "masac")
    assert ckpt["learner"]["gradient_steps"] > 0 and "log_alpha" in ckpt["learner"]
    assert isinstance(policy_from_checkpoint(ckpt), SACPolicy)
    assert evaluate(run_dir, episodes=16)["mean"] >= 10.0


def test_config_names_the_key_and_presets_list_the_algorithms() -> None:
    assert {"masac", "isac"} <= set(ALGORITHMS)
    preflight(load_config("spread-mlp", ["train.algorithm=masac", "env.continuous_actions=true"]))
    with pytest.raises(ConfigError, match=r"train.algorithm=isac does not train policies with"):
        preflight(load_config("spread-mlp", ["train.algorithm=isac", "model.memory=gru"]))
    with pytest.raises(ConfigError, match=r"train.algorithm=masac does not train with world_model"):
        preflight(load_config("spread-gnn-wm", ["train.algorithm=masac"]))
    with pytest.raises(ConfigError, match=r"train.target_entropy_scale"):
        load_config("spread-mlp", ["train.algorithm=masac", "train.target_entropy_scale=2"])


def test_a_restored_learner_takes_the_same_next_step() -> None:
    # Everything a step draws (transitions and Gaussian noise) comes from the learner's own
    # generator, which its state holds with the replay, the target critics, α and the three
    # optimisers: a learner restored from a checkpoint continues exactly.
    def learner() -> SoftActorCritic:
        torch.manual_seed(0)
        return SoftActorCritic(SACPolicy(_spec(), n_agents=3), _train(updates_per_batch=2))

    actions = torch.rand(5, 8, 3, 2)
    batch = _batch(actions, -(actions - 0.8).square().sum(-1))
    first = learner()
    for _ in range(3):
        first.update(batch)
    second = learner()
    # A checkpoint is a copy (optimiser state tensors must not be shared between the two).
    second.model.load_state_dict(copy.deepcopy(first.model.state_dict()))
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    assert second.replay.transitions == first.replay.transitions == 3 * 4 * 8
    for one in (first, second):
        one.update(batch)
    for name, value in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], value, rtol=0, atol=0)
    assert second.log_alpha.item() == first.log_alpha.item()


# -- agent groups: an actor and twin critics per group ------------------------------------


@pytest.mark.parametrize("centralised", [True, False], ids=["masac", "isac"])
@pytest.mark.parametrize("action_kind", ["discrete", "continuous"])
def test_one_group_of_every_agent_learns_as_the_shared_policy(
    action_kind: str, centralised: bool
) -> None:
    a = 4 if action_kind == "discrete" else 2
    torch.manual_seed(0)
    shared = SACPolicy(_spec(action_kind=action_kind, a=a), n_agents=3, centralised=centralised)
    grouped = GroupedSACPolicy([AgentGroup("team", (0, 1, 2), shared.spec)], centralised,
                               action_kind, a)  # fmt: skip
    grouped.units[0].load_state_dict(shared.state_dict())
    if action_kind == "discrete":
        actions = torch.randint(a, (5, 8, 3))
        rewards = (actions == 1).float()
    else:
        actions = torch.rand(5, 8, 3, a)
        rewards = -(actions - 0.8).square().sum(-1)
    batch = _batch(actions, rewards)
    learners = [SoftActorCritic(m, _train(updates_per_batch=2)) for m in (shared, grouped)]
    for _ in range(3):
        stats = [one.update(batch) for one in learners]
    assert stats[0] == pytest.approx(stats[1], rel=1e-5, abs=1e-6)
    for name, value in shared.state_dict().items():
        torch.testing.assert_close(grouped.units[0].state_dict()[name], value, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


def test_groups_act_in_their_own_actions_and_a_frozen_group_learns_nothing() -> None:
    # speaker: 3 observations, 3 actions; listener: 11 and 5 (the adapter pads to the widest).
    cfg = load_config("spread-mlp", [
        *RUN, "env.name=pettingzoo:mpe2.simple_speaker_listener_v4", "env.num_envs=4",
        "train.algorithm=masac", "groups.speaker.train=false", "groups.listener.lr=0.01",
        "model.hidden=16", "train.rollout_len=8", "train.learning_starts=0",
        "train.replay_batch=32", "train.updates_per_batch=2",
    ])  # fmt: skip
    env = cfg.env.make(4, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    assert isinstance(model, GroupedSACPolicy)
    speaker, listener = model.units
    assert speaker.pi.out_features == 3 and listener.pi.out_features == 5
    obs = env.reset(seed=1).as_dict()
    with torch.no_grad():
        probs = model.policy(obs).logits.exp()
    assert probs.shape == (4, 2, 5) and float(probs[:, 0, 3:].max()) == 0.0
    q1, q2 = model.q(obs)
    assert q1.shape == q2.shape == (4, 2, 5)

    frozen = copy.deepcopy(speaker.state_dict())
    trained = copy.deepcopy(listener.state_dict())
    learner = SoftActorCritic(model, cfg.train)
    worker = RolloutWorker(env, model, cfg.train.rollout_len, seed=0)
    for _ in range(3):
        stats = learner.update(worker.collect())
    assert all(math.isfinite(v) for v in stats.values())
    for name, value in speaker.state_dict().items():
        assert torch.equal(value, frozen[name]), name
    assert any(not torch.equal(v, trained[k]) for k, v in listener.state_dict().items())
    for opt in (learner.optimizer, learner.critic_optimizer):  # the listener's own rate
        assert [g["lr"] for g in opt.param_groups] == [0.01]
    alphas = learner.log_alpha.detach().exp()
    assert alphas[0].item() == pytest.approx(0.2) and alphas[1].item() != pytest.approx(0.2)
    assert learner.target_entropy.tolist() == pytest.approx([0.89 * math.log(3),
                                                             0.89 * math.log(5)])  # fmt: skip
    env.close()


def test_grouped_masac_learns_checkpoints_and_refuses_what_it_cannot_be(tmp_path: Path) -> None:
    groups = ["groups.pair.agents=a[01]", "groups.pair.share=false", "groups.last.agents=a2"]
    run_dir, ckpt = train_on_relay(tmp_path, "masac", 8000, *groups)  # best 12, chance 4
    model = policy_from_checkpoint(ckpt)
    assert isinstance(model, GroupedSACPolicy) and len(model.units) == 3
    assert ckpt["learner"]["log_alpha"].shape == (3,)  # a temperature per policy
    assert evaluate(run_dir, episodes=16)["mean"] >= 10.0

    with pytest.raises(ConfigError, match=r"groups.last.pool.size: masac does not play past"):
        preflight(load_config("spread-mlp", [*RUN, f"env.name={RELAY}", *groups,
                                             "train.algorithm=masac",
                                             "groups.last.pool.size=2"]))  # fmt: skip
    spec = _spec()
    one = AgentGroup("one", (0,), spec)
    narrow = AgentGroup("narrow", (1,), replace(spec, action_dim=1))
    with pytest.raises(ValueError, match=r"groups.narrow: its 1 continuous actions differ"):
        GroupedSACPolicy([one, narrow], True, "continuous", 2)
