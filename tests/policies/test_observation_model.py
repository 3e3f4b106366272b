"""The observation world model: its layout, symmetry, size independence, and what it can fit."""

from __future__ import annotations

import threading

import pytest
import torch

from agents.imagination import ObservationWorld, imagine
from agents.observation_trainer import ObservationTrainer
from agents.ppo import Learner, PPOConfig
from agents.rollout import RolloutBatch
from agents.world_model import TransitionBuffer
from policies import ActorCritic, PolicySpec
from policies.observation_model import ObservationWorldModel, layout


def _world(b: int, n: int, d: int = 4, masks: bool = False) -> dict[str, torch.Tensor]:
    world = {"obs": torch.randn(b, n, d)}
    if masks:
        world["action_mask"] = torch.rand(b, n, 3) > 0.3
    return world


def _model(n: int, d: int = 4, masks: bool = False, **kw) -> ObservationWorldModel:
    torch.manual_seed(0)
    return ObservationWorldModel(layout(_world(1, n, d, masks), n), n, "discrete", 3, **kw)


def test_the_layout_sorts_fields_by_shape() -> None:
    example = {
        "obs": torch.zeros(1, 3, 4),
        "state": torch.zeros(1, 12),
        "nodes": torch.zeros(1, 6, 5),  # six entities for three agents: a world field
        "node_type": torch.zeros(1, 6, dtype=torch.long),
        "alive": torch.ones(1, 3, dtype=torch.bool),
        "action_mask": torch.ones(1, 3, 5, dtype=torch.bool),
    }
    kinds = {f.key: (f.kind, f.shape) for f in layout(example, 3)}
    assert kinds == {
        "obs": ("agent", (4,)),
        "state": ("world", (12,)),
        "nodes": ("world", (6, 5)),
        "node_type": ("fixed", (6,)),
        "action_mask": ("mask", (5,)),
    }  # alive is imagination's to track


@pytest.mark.parametrize("reward_from", ["transition", "next"])
def test_permuting_agents_permutes_every_prediction(reward_from: str) -> None:
    model = _model(4, masks=True, reward_from=reward_from)
    world = _world(6, 4, masks=True)
    actions, alive = torch.randint(0, 3, (6, 4)), torch.rand(6, 4) > 0.2
    perm = torch.tensor([2, 0, 3, 1])
    out = model(world, actions, alive)
    moved = model({k: v[:, perm] for k, v in world.items()}, actions[:, perm], alive[:, perm])
    for a, b in zip(out, moved, strict=True):
        if a.dim() >= 3 and a.shape[2] == 4:  # per-agent outputs [K, B, N, ...]
            torch.testing.assert_close(a[:, :, perm], b, atol=1e-5, rtol=1e-4)


def test_one_model_runs_with_any_number_of_agents() -> None:
    model = _model(3)
    for n in (1, 3, 7):
        world, alive = _world(5, n), torch.ones(5, n, dtype=torch.bool)
        nxt, reward, cont, doubt = model.predict(world, torch.randint(0, 3, (5, n)), alive)
        assert nxt["obs"].shape == (5, n, 4) and reward.shape == cont.shape == (5, n)
        assert doubt.shape == (5,)
        # Predictions are per agent: agent 0's does not depend on how many others exist
        # beyond what attention reads from them, so a lone agent is still predicted.
        assert torch.isfinite(nxt["obs"]).all()


def test_a_next_reward_head_reads_the_predicted_next_observation() -> None:
    model = _model(3, reward_from="next")
    rebuilt = ObservationWorldModel.from_config(model.config())
    rebuilt.load_state_dict(model.state_dict())
    world, actions = _world(5, 3), torch.randint(0, 3, (5, 3))
    alive = torch.ones(5, 3, dtype=torch.bool)
    torch.testing.assert_close(model(world, actions, alive), rebuilt(world, actions, alive))
    # The reward moves with the predicted change; the transition head's would not see it.
    with torch.no_grad():
        model.delta.bias.add_(1.0)
    moved = model(world, actions, alive)
    assert not torch.allclose(moved[2], rebuilt(world, actions, alive)[2])
    with pytest.raises(ValueError, match="reward_from"):
        _model(3, reward_from="state")


def _toy(b: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Transitions of a known game: x moves by (a - 1) / 10, reward -|x|, 'right' illegal at
    x > 0.5, the agent ends when |x| > 0.9."""
    n = 2
    x = torch.rand(b, n, 1, generator=gen) * 2 - 1
    mask = torch.ones(b, n, 3, dtype=torch.bool)
    mask[..., 2] = x[..., 0] <= 0.5
    a = torch.randint(0, 3, (b, n), generator=gen)
    a = torch.where(mask.gather(-1, a.unsqueeze(-1)).squeeze(-1), a, torch.ones_like(a))
    nx = x + (a.unsqueeze(-1) - 1) / 10
    nmask = torch.ones_like(mask)
    nmask[..., 2] = nx[..., 0] <= 0.5
    return {
        "obs": x,
        "action_mask": mask,
        "alive": torch.ones(b, n, dtype=torch.bool),
        "actions": a,
        "rewards": -nx[..., 0].abs(),
        "cont": torch.ones(b),
        "agent_cont": (nx[..., 0].abs() <= 0.9).float(),
        "next_obs": nx,
        "next_action_mask": nmask,
    }


@pytest.mark.slow
@pytest.mark.parametrize("reward_from", ["transition", "next"])
def test_it_fits_known_dynamics_with_a_mask_that_changes_with_the_state(reward_from: str) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    example = {"obs": torch.zeros(1, 2, 1), "action_mask": torch.ones(1, 2, 3, dtype=torch.bool)}
    torch.manual_seed(0)
    model = ObservationWorldModel(
        layout(example, 2), 2, "discrete", 3, hidden=32, members=2, reward_from=reward_from
    )
    trainer = ObservationTrainer(model, lr=3e-3, batch_size=256)
    buffer = TransitionBuffer(20_000)
    buffer.append(_toy(20_000, gen))
    early = trainer.update(buffer, 1, gen)
    trainer.update(buffer, 400, gen)
    test = _toy(4_000, torch.Generator().manual_seed(9))
    with torch.no_grad():
        _, final = trainer.loss([test, test])
    assert final["delta_mse"] < 0.05 * early["delta_mse"]
    assert final["reward_mse"] < 0.1 and final["cont_bce"] < 0.15 and final["mask_bce"] < 0.1
    nxt, _, cont, _ = model.predict(
        {"obs": test["obs"], "action_mask": test["action_mask"]}, test["actions"], test["alive"]
    )
    torch.testing.assert_close(nxt["obs"], test["next_obs"], atol=0.03, rtol=0)
    right_ok = nxt["action_mask"][..., 2]
    near = (test["next_obs"][..., 0] - 0.5).abs() < 0.03  # the boundary itself is a coin flip
    assert (right_ok == test["next_action_mask"][..., 2])[~near].float().mean() > 0.98
    ends = test["agent_cont"] == 0
    clear = (test["next_obs"][..., 0].abs() - 0.9).abs() > 0.03
    assert ((cont < 0.5) == ends)[clear].float().mean() > 0.98


@pytest.mark.parametrize("memory", ["none", "gru"])
def test_imagined_batches_keep_the_batch_contract_on_an_env_without_entity_views(
    memory: str,
) -> None:
    import envs
    from agents.rollout import RolloutWorker

    env = envs.make("tag", num_envs=8, seed=0)
    spec = PolicySpec("mlp", env.obs_dim, env.state_dim, env.node_dim, "discrete", 5,
                      hidden=16, memory=memory)  # fmt: skip
    policy = ActorCritic(spec)
    keys = policy.input_keys
    real = RolloutWorker(env, policy, rollout_len=10, seed=0).collect()
    probe = {k: v[:1] for k, v in env.reset(seed=0).as_dict().items() if k in keys}
    model = ObservationWorldModel(layout(probe, env.n_agents), env.n_agents, "discrete", 5)
    world = ObservationWorld(model)
    buffer = TransitionBuffer(1000, kept=world.kept)
    buffer.add(real)
    starts = buffer.sample(12, torch.Generator().manual_seed(0))
    batch = imagine(policy, world, starts, horizon=4)
    assert isinstance(batch, RolloutBatch) and batch.imagined
    assert batch.obs.keys() == real.obs.keys()  # what the policy reads, nothing else
    for key in batch.obs:
        assert batch.obs[key].shape[2:] == real.obs[key].shape[2:], key
        assert batch.obs[key].dtype == real.obs[key].dtype, key
    assert batch.rewards.shape == (4, 12, env.n_agents) and batch.truncated[-1].all()
    if memory != "none":  # branches start from the states acting stored, and carry them on
        torch.testing.assert_close(batch.obs["memory"][0], starts["memory"])
        assert (batch.obs["memory"][1:] != 0).any()
    stats = Learner(policy, PPOConfig(lr=1e-3, minibatches=2)).update(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def _ranks_mean(k: int):
    """An all-reduce mean for ``k`` threads standing in for learner ranks."""
    barrier, parts = threading.Barrier(k), {}

    def mean(t: torch.Tensor) -> torch.Tensor:
        parts[threading.get_ident()] = t.clone()
        barrier.wait()
        out = torch.stack(list(parts.values())).mean(0)
        barrier.wait()  # everyone has read the parts before the next call writes them
        return out

    return mean


def test_two_ranks_fitting_their_shards_move_as_one_fitting_both() -> None:
    gen = torch.Generator().manual_seed(3)
    example = {"obs": torch.zeros(1, 2, 1), "action_mask": torch.ones(1, 2, 3, dtype=torch.bool)}
    steps = []
    for _ in range(3):  # per step: each member's sample, halves for the two ranks
        samples = [_toy(64, gen) for _ in range(2)]
        for s in samples:  # equal counts per half, so the mean of means is the mean
            s["agent_cont"] = torch.ones_like(s["agent_cont"])
        steps.append(samples)

    def trainer() -> ObservationTrainer:
        torch.manual_seed(0)
        model = ObservationWorldModel(layout(example, 2), 2, "discrete", 3, hidden=16, members=2)
        t = ObservationTrainer(model, lr=3e-3, batch_size=64, scale_beta=1.0)
        t.updates = 1  # scales held (beta 1): the test is about the gradients
        return t

    one = trainer()
    for samples in steps:
        one.step(samples)
    ranks = [trainer(), trainer()]
    mean = _ranks_mean(2)
    for r in ranks:
        r.all_reduce_mean = mean

    def fit(rank: int) -> None:
        for samples in steps:
            ranks[rank].step([{k: v[rank * 32 : rank * 32 + 32] for k, v in s.items()}
                              for s in samples])  # fmt: skip

    threads = [threading.Thread(target=fit, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Both replicas took the same averaged steps: equal to the bit.
    for name, value in ranks[0].model.state_dict().items():
        assert torch.equal(value, ranks[1].model.state_dict()[name]), name
    # And they predict what one model fitted on both shards predicts. (Weights are compared
    # through predictions: Adam turns float noise in gradients that are zero in exact
    # arithmetic, attention's key bias, into steps that change no output.)
    test = _toy(256, torch.Generator().manual_seed(9))

    def predict(t: ObservationTrainer) -> list[torch.Tensor]:
        world = {"obs": test["obs"], "action_mask": test["action_mask"]}
        with torch.no_grad():
            return [x for x in t.model(world, test["actions"], test["alive"]) if x is not None]

    want = predict(one)
    for got, ref in zip(predict(ranks[0]), want, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # Alone, a rank fits half the data and predicts otherwise.
    alone = trainer()
    for samples in steps:
        alone.step([{k: v[:32] for k, v in s.items()} for s in samples])
    gap = max((a - b).abs().max().item() for a, b in zip(predict(alone), want, strict=True))
    assert gap > 1e-3
