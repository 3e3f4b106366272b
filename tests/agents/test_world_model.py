"""Fitting a world model, imagining with it, and the oracle that imagines with the true env."""

from __future__ import annotations

import pytest
import torch

import envs
from agents.imagination import EntityWorld, EnvDynamics, LearnedDynamics, imagine
from agents.ppo import Learner, PPOConfig
from agents.rollout import RolloutBatch, RolloutWorker
from agents.world_model import TransitionBuffer, WorldModelTrainer
from policies import ActorCritic, PolicySpec
from policies.memory import MEMORY
from policies.world_model import EntityWorldModel

KEYS = frozenset({"nodes", "node_mask"})


def _policy(env, kind: str = "mlp") -> ActorCritic:
    spec = PolicySpec(kind, env.obs_dim, env.state_dim, env.node_dim, "discrete", 5, hidden=32)
    return ActorCritic(spec)


def _real(num_envs: int = 32, seed: int = 0, steps: int = 25):
    torch.manual_seed(seed)
    env = envs.make("spread", num_envs=num_envs, n_agents=3, seed=seed)
    policy = _policy(env)
    worker = RolloutWorker(env, policy, rollout_len=steps, seed=seed, extra_keys=KEYS)
    return env, policy, worker


def test_the_buffer_keeps_transitions_with_a_next_state_and_wraps() -> None:
    env, _, worker = _real(num_envs=4, steps=25)
    batch = worker.collect()  # one whole 25-step episode per world: the last step truncates
    buffer = TransitionBuffer(capacity=150)
    assert buffer.add(batch) == 24 * 4  # the truncated step has no next state
    first = buffer.data["nodes"][:4].clone()
    # The kept next state is the batch's next observation of the same world.
    torch.testing.assert_close(buffer.data["next_nodes"][0], batch.obs["nodes"][1, 0])
    buffer.add(batch)
    assert len(buffer) == 150 and buffer.next == (2 * 96) % 150
    assert not torch.equal(buffer.data["nodes"][:4], first)  # the oldest were overwritten
    # What a checkpoint keeps: the newest, in order, restored into a fresh buffer.
    kept = buffer.newest(100)
    again = TransitionBuffer(capacity=150)
    again.restore(kept)
    assert len(again) == 100
    torch.testing.assert_close(again.data["nodes"][:100], kept["nodes"])
    torch.testing.assert_close(kept["nodes"][-1], buffer.data["nodes"][buffer.next - 1])


@pytest.mark.slow
def test_the_model_fits_the_true_dynamics_far_better_than_no_change() -> None:
    torch.set_num_threads(1)
    _, _, worker = _real(num_envs=64)
    buffer = TransitionBuffer(capacity=20_000)
    for _ in range(4):
        buffer.add(worker.collect())
    torch.manual_seed(1)
    model = EntityWorldModel(5, "discrete", 5, hidden=64, members=2)
    trainer = WorldModelTrainer(model, lr=3e-3, batch_size=256)
    gen = torch.Generator().manual_seed(0)
    early = trainer.update(buffer, 1, gen)
    late = trainer.update(buffer, 300, gen)
    held_out = [buffer.sample(2000, torch.Generator().manual_seed(9)) for _ in range(2)]
    with torch.no_grad():
        _, final = trainer.loss(held_out)
    # In units of each target's scale: 1 is roughly what "no change" / "mean reward" scores.
    assert final["delta_mse"] < 0.1 * early["delta_mse"] and final["delta_mse"] < 0.1
    assert final["reward_mse"] < 0.5 * early["reward_mse"] and final["reward_mse"] < 0.35
    assert late["cont_bce"] < 0.05  # spread never terminates


def test_an_imagined_batch_keeps_the_rollout_batch_contract_and_learns() -> None:
    env, policy, worker = _real(num_envs=16)
    real = worker.collect()
    buffer = TransitionBuffer(capacity=1000)
    buffer.add(real)
    model = EntityWorldModel(5, "discrete", 5, hidden=32)
    starts = buffer.sample(40, torch.Generator().manual_seed(0))
    batch = imagine(policy, EntityWorld(LearnedDynamics(model), env.observe_entities), starts, 5)
    assert isinstance(batch, RolloutBatch) and batch.imagined and not real.imagined
    assert batch.actions.shape == (5, 40, 3) and batch.rewards.shape == (5, 40, 3)
    assert batch.truncated[-1].all() and not batch.truncated[:-1].any()  # bootstrapped at H
    assert batch.episode_returns.numel() == 0 and batch.env_steps == 200
    assert batch.obs.keys() == policy.input_keys & real.obs.keys()  # what the policy reads
    for key in batch.obs:
        assert batch.obs[key].shape[:2] == (5, 40), key
    stats = Learner(policy, PPOConfig(lr=1e-3, minibatches=5)).update(batch)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())


def test_imagination_starts_from_the_recurrent_states_acting_stored() -> None:
    # With memory (actor and critic) the replay keeps each step's entering state, a branch
    # starts from it and carries it on; the model's fit never sees it.
    torch.manual_seed(0)
    env = envs.make("spread", num_envs=16, n_agents=3, seed=0)
    spec = PolicySpec("mlp", env.obs_dim, env.state_dim, env.node_dim, "discrete", 5,
                      hidden=16, memory="gru", critic_memory="lstm")  # fmt: skip
    policy = ActorCritic(spec)
    real = RolloutWorker(env, policy, rollout_len=10, seed=0, extra_keys=KEYS).collect()
    buffer = TransitionBuffer(capacity=1000)
    buffer.add(real)
    assert buffer.data[MEMORY].shape[1:] == (3, policy.memory_size)
    starts = buffer.sample(24, torch.Generator().manual_seed(1))
    assert starts[MEMORY].abs().sum() > 0  # real, mostly non-zero states
    model = EntityWorldModel(5, "discrete", 5, hidden=16)
    batch = imagine(policy, EntityWorld(LearnedDynamics(model), env.observe_entities), starts, 4)
    torch.testing.assert_close(batch.obs[MEMORY][0], starts[MEMORY])
    assert (batch.obs[MEMORY][1] != 0).all()
    # A checkpoint keeps transitions without the states (a resumed run's memory restarts at
    # zero): the restored rows start from zeros, new rows bring their states again.
    kept = {k: v for k, v in buffer.newest(50).items() if k != MEMORY}
    resumed = TransitionBuffer(capacity=1000)
    resumed.restore(kept)
    resumed.add(real)
    assert (resumed.data[MEMORY][:50] == 0).all()
    torch.testing.assert_close(
        resumed.data[MEMORY][50 : len(resumed)], buffer.data[MEMORY][: len(buffer)]
    )
    stats = Learner(policy, PPOConfig(minibatches=2)).update(batch)
    assert stats["minibatches_done"] > 0


def test_the_oracle_imagines_exactly_what_the_env_does() -> None:
    env, policy, worker = _real(num_envs=8)
    buffer = TransitionBuffer(capacity=1000)
    buffer.add(worker.collect())
    starts = buffer.sample(8, torch.Generator().manual_seed(0))
    oracle = EnvDynamics(envs.make("spread", num_envs=8, n_agents=3, seed=1))
    torch.manual_seed(3)
    batch = imagine(policy, EntityWorld(oracle, env.observe_entities), starts, horizon=4)
    # Replay the same actions in a fresh env placed in the same start states.
    twin = envs.make("spread", num_envs=8, n_agents=3, seed=2)
    twin.set_entities(starts["nodes"])
    for t in range(4):
        step = twin.step(batch.actions[t])
        torch.testing.assert_close(batch.rewards[t], step.reward)
        if t < 3:
            torch.testing.assert_close(batch.obs["obs"][t + 1], step.observation.obs)


def test_disagreement_cuts_a_branch_and_masks_what_follows() -> None:
    env, policy, worker = _real(num_envs=8)
    buffer = TransitionBuffer(capacity=1000)
    buffer.add(worker.collect())
    model = EntityWorldModel(5, "discrete", 5, hidden=32, members=3)  # untrained: unsure
    starts = buffer.sample(8, torch.Generator().manual_seed(0))
    world = EntityWorld(LearnedDynamics(model), env.observe_entities)
    batch = imagine(policy, world, starts, 5, max_disagreement=1e-9)
    assert batch.truncated[0].all()  # cut at the first step
    assert not batch.obs["alive"][1:].any()  # and nothing after it is learned from
