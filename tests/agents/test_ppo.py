"""GAE on hand-computed trajectories and PPO learner properties."""

from __future__ import annotations

import math

import pytest
import torch

import envs
from agents.ppo import Learner, PPOConfig, compute_gae
from agents.rollout import RolloutBatch, RolloutWorker
from policies import ActorCritic, PolicySpec


def test_gae_by_hand_mixing_truncation_and_termination() -> None:
    # Step 1 is truncated (bootstrap from the final observation's value 10),
    # step 3 terminates (its next value 7 must be ignored).
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    v = torch.tensor([0.5, 1.0, 1.5, 2.0])
    nv = torch.tensor([1.0, 10.0, 2.0, 7.0])
    term = torch.tensor([False, False, False, True])
    done = torch.tensor([False, True, False, True])
    adv, ret = compute_gae(r, v, nv, term, done, gamma=0.9, lam=0.8)
    # deltas: 1.4, 10.0, 3.3, 2.0; A3=2, A2=3.3+.72*2, A1=10 (boundary), A0=1.4+.72*10
    torch.testing.assert_close(adv, torch.tensor([8.6, 10.0, 4.74, 2.0]))
    torch.testing.assert_close(ret, torch.tensor([9.1, 11.0, 6.24, 4.0]))


def test_gae_with_lambda_one_is_the_discounted_return() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(6, 3, generator=g)
    v = torch.randn(6, 3, generator=g)
    nv = torch.cat([v[1:], torch.zeros(1, 3)])
    term = torch.zeros(6, 3, dtype=torch.bool)
    term[-1] = True
    _, ret = compute_gae(r, v, nv, term, term, gamma=0.95, lam=1.0)
    mc = torch.zeros(3)
    for t in reversed(range(6)):
        mc = r[t] + 0.95 * mc
        torch.testing.assert_close(ret[t], mc)


def _setup(kind: str = "mlp", num_envs: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    env = envs.make("spread", num_envs=num_envs, n_agents=3, max_cycles=5, seed=seed)
    spec = PolicySpec(kind, env.obs_dim, env.state_dim, env.node_dim, "discrete", 5, hidden=32)
    return env, ActorCritic(spec)


def test_rollout_batch_shapes_and_bootstrap_values() -> None:
    env, model = _setup()
    worker = RolloutWorker(env, model, rollout_len=7, seed=0)
    batch = worker.collect()
    assert batch.actions.shape == (7, 16, 3) and batch.obs["obs"].shape == (7, 16, 3, 18)
    assert batch.env_steps == 7 * 16
    # Episodes of 5 steps: step index 4 truncates every env; 16 episodes finished.
    assert batch.truncated[4].all() and not batch.truncated[:4].any()
    assert batch.episode_returns.shape == (16,)
    torch.testing.assert_close(
        batch.episode_returns, batch.rewards[:5].sum(dim=(0, 2)), atol=1e-5, rtol=0
    )
    # Where no episode ended, the next value is the next step's value.
    torch.testing.assert_close(batch.next_values[:3], batch.values[1:4])
    assert not torch.allclose(batch.next_values[4], batch.values[5])


def test_update_improves_the_surrogate_and_is_finite() -> None:
    env, model = _setup()
    worker = RolloutWorker(env, model, rollout_len=10, seed=1)
    learner = Learner(model, PPOConfig(lr=1e-3, epochs=4, minibatches=2))
    batch = worker.collect()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = learner.update(batch)
    assert set(stats) >= {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_frac"}
    assert stats["policy_loss"] <= 0.0 + 1e-3  # the surrogate moves in the right direction
    assert stats["entropy"] > 0.0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("actor") for k in changed) and any("critic" in k for k in changed)
    assert float(model.value_norm.debias) > 0


def test_split_and_concat_round_trip() -> None:
    env, model = _setup(num_envs=8)
    batch = RolloutWorker(env, model, rollout_len=6, seed=2).collect()
    shards = batch.split_envs(2)
    assert shards[0].rewards.shape == (6, 4, 3)
    joined = RolloutBatch.concat_envs(shards)
    torch.testing.assert_close(joined.obs["obs"], batch.obs["obs"])
    torch.testing.assert_close(joined.episode_returns, batch.episode_returns)
    with pytest.raises(ValueError, match="do not split evenly"):
        batch.split_envs(3)


def test_sharded_learners_reproduce_one_learner() -> None:
    """Two shards with averaged gradients == one learner on the whole batch.

    This is the arithmetic DDP relies on; tests/orchestrator checks it with real processes.
    """
    env, model = _setup(num_envs=8, seed=3)
    batch = RolloutWorker(env, model, rollout_len=6, seed=3).collect()
    cfg = PPOConfig(lr=1e-3, epochs=2, minibatches=3)
    one = ActorCritic(model.spec)
    one.load_state_dict(model.state_dict())
    Learner(one, cfg).update(batch)

    shards = batch.split_envs(2)
    replicas = [ActorCritic(model.spec) for _ in shards]
    for r in replicas:
        r.load_state_dict(model.state_dict())
    # Simulate all-reduce by stepping both replicas with the averaged gradient by hand.
    learners = [Learner(r, cfg) for r in replicas]
    _lockstep_update(learners, shards)
    for k, v in one.state_dict().items():
        torch.testing.assert_close(replicas[0].state_dict()[k], v, atol=1e-5, rtol=1e-5)


def _lockstep_update(learners: list[Learner], shards: list[RolloutBatch]) -> None:
    """Run ``Learner.update`` on every shard in lock-step threads with a shared all-reduce."""
    import threading

    barrier = threading.Barrier(len(learners))
    slots: list = [None] * len(learners)

    def make_reduce(i: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[i] = t.detach().clone()
            barrier.wait()
            out = sum(slots) / len(slots)
            barrier.wait()
            return out

        return reduce

    for i, learner in enumerate(learners):
        learner.all_reduce_mean = make_reduce(i)
        params = list(learner.model.parameters())

        def hook(_opt, _args, _kwargs, i=i, params=params):
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            avg = learner_reduce[i](flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = avg[offset : offset + n].view_as(p).clone()
                offset += n

        learner.optimizer.register_step_pre_hook(hook)
    learner_reduce = [lrn.all_reduce_mean for lrn in learners]
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            learners[i].update(shards[i])
        except BaseException as e:  # noqa: BLE001 - surfaced to the test below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(learners))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors


def _clone(model: ActorCritic) -> ActorCritic:
    twin = ActorCritic(model.spec)
    twin.load_state_dict(model.state_dict())
    return twin


def test_behaviour_correction_is_the_identity_on_on_policy_data() -> None:
    env, model = _setup(num_envs=8, seed=4)
    batch = RolloutWorker(env, model, rollout_len=6, seed=4).collect()
    cfg = PPOConfig(lr=1e-3, epochs=2, minibatches=2)
    plain, corrected = _clone(model), _clone(model)
    Learner(plain, cfg).update(batch)
    stats = Learner(corrected, cfg).update(batch, staleness=1)  # claims stale, is not
    assert stats["behaviour_weight"] == pytest.approx(1.0, abs=1e-5)
    after = corrected.state_dict()
    for name, a in plain.state_dict().items():
        torch.testing.assert_close(a, after[name], atol=1e-5, rtol=1e-4, msg=name)


def test_refresh_is_the_current_policy_on_the_batch() -> None:
    env, model = _setup(num_envs=8, seed=5)
    batch = RolloutWorker(env, _clone(model), rollout_len=6, seed=5).collect()
    learner = Learner(model, PPOConfig(lr=3e-3, epochs=2, minibatches=2))
    learner.update(batch)  # the learner moves on; the batch is now one version old
    done = batch.terminated | batch.truncated.unsqueeze(-1)
    logp, values, next_values = learner.refresh(batch, done)
    flat = {k: v.flatten(0, 1) for k, v in batch.obs.items() if k in model.input_keys}
    with torch.no_grad():
        expect_logp = model.dist(flat).log_prob(batch.actions.flatten(0, 1)).view_as(logp)
        expect_values = model.raw_value(flat).view_as(values)
    torch.testing.assert_close(logp, expect_logp)
    torch.testing.assert_close(values, expect_values)
    assert not torch.allclose(logp, batch.logp)  # the policy did move
    inside = ~done[:-1]
    torch.testing.assert_close(next_values[:-1][inside], values[1:][inside])
    torch.testing.assert_close(next_values[:-1][~inside], batch.next_values[:-1][~inside])
    torch.testing.assert_close(next_values[-1], batch.next_values[-1])


def test_a_stale_batch_is_clipped_less_with_the_correction() -> None:
    env, model = _setup(num_envs=32, seed=6)
    cfg = PPOConfig(lr=3e-3, epochs=4, minibatches=4)
    stale = RolloutWorker(env, _clone(model), rollout_len=10, seed=6).collect()
    fresh = RolloutWorker(env, _clone(model), rollout_len=10, seed=7).collect()
    Learner(model, cfg).update(fresh)  # one version ahead of `stale`
    plain_cfg = cfg.model_copy(update={"behaviour_correction": False})
    uncorrected = Learner(_clone(model), plain_cfg)
    corrected = Learner(_clone(model), cfg)
    off = uncorrected.update(stale, staleness=1)
    on = corrected.update(stale, staleness=1)
    assert on["clip_frac"] < off["clip_frac"]
    assert on["behaviour_weight"] != 1.0 and off["behaviour_weight"] == 1.0


def test_a_kl_early_stop_ends_an_update_whose_kl_exceeds_the_target() -> None:
    env, model = _setup()
    batch = RolloutWorker(env, model, rollout_len=10, seed=3).collect()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    full = Learner(model, PPOConfig(lr=3e-2, epochs=4, minibatches=2)).update(batch)
    assert full["minibatches_done"] == 1.0 and full["approx_kl"] > 1e-3  # a big step moves

    model.load_state_dict(init)
    # The first minibatch starts at KL 0; after its step the policy has moved, so the second
    # one's KL exceeds a tiny target and the update stops there: 2 of 8 minibatches.
    stopped = Learner(model, PPOConfig(lr=3e-2, epochs=4, minibatches=2, target_kl=1e-6))
    stats = stopped.update(batch)
    assert stats["minibatches_done"] == 2 / 8

    model.load_state_dict(init)
    generous = Learner(model, PPOConfig(lr=3e-2, epochs=4, minibatches=2, target_kl=10.0))
    assert generous.update(batch)["minibatches_done"] == 1.0


def _one_sample_batch(advantage_sign: float, ratio: float) -> tuple[ActorCritic, RolloutBatch]:
    """A one-step batch whose one action's acting probability was ``1/ratio`` of today's."""
    env, model = _setup(num_envs=1, seed=4)
    batch = RolloutWorker(env, model, rollout_len=1, seed=4).collect()
    with torch.no_grad():
        dist, _ = model({k: v.flatten(0, 1) for k, v in batch.obs.items()})
        logp = dist.log_prob(batch.actions.flatten(0, 1)).view_as(batch.logp)
    batch.logp = logp - math.log(ratio)
    # Rewards far from the critic's guess give every agent an advantage of that sign.
    batch.rewards = torch.full_like(batch.rewards, 100.0 * advantage_sign)
    batch.truncated[:] = False
    batch.terminated[:] = True
    return model, batch


@pytest.mark.parametrize("dual_clip", [3.0, None])
def test_dual_clip_cuts_the_pull_of_a_grown_ratio_on_a_negative_advantage(dual_clip) -> None:
    # Ratio 75 (a once-rare action grown 75-fold) with a negative advantage: plain PPO's loss
    # is ratio * |A| and its gradient grows with the ratio; the dual clip holds it at 3 |A|.
    model, batch = _one_sample_batch(-1.0, 75.0)
    cfg = PPOConfig(epochs=1, minibatches=1, adv_norm=False, value_norm=False, vf_coef=0.0,
                    ent_coef=0.0, dual_clip=dual_clip, lr=1e-3)  # fmt: skip
    learner = Learner(model, cfg)
    actor = [p for n, p in model.named_parameters() if n.startswith("actor")]
    before = [p.detach().clone() for p in actor]
    stats = learner.update(batch)
    moved = any(not torch.equal(p, b) for p, b in zip(actor, before, strict=True))
    assert moved == (dual_clip is None)  # the guard triggers: no gradient reaches the actor
    if dual_clip is not None:
        assert stats["policy_loss"] == pytest.approx(dual_clip * 100.0, rel=0.05)


def test_dual_clip_leaves_positive_advantages_to_the_ordinary_clip() -> None:
    model, batch = _one_sample_batch(1.0, 75.0)  # clipped at 1 + clip already: no gradient
    cfg = PPOConfig(epochs=1, minibatches=1, vf_coef=0.0, ent_coef=0.0, value_norm=False,
                    adv_norm=False)  # fmt: skip
    stats = Learner(model, cfg).update(batch)
    assert stats["policy_loss"] < 0 and stats["clip_frac"] == 1.0


def test_update_log_records_every_minibatch() -> None:
    env, model = _setup()
    learner = Learner(model, PPOConfig(epochs=2, minibatches=3))
    learner.trace = []
    batch = RolloutWorker(env, model, rollout_len=6, seed=5).collect()
    learner.update(batch)
    learner.update(batch)
    first, second = learner.trace
    assert (first["update"], second["update"]) == (1, 2)
    assert all(len(v) == 6 for v in first["minibatches"].values())  # 2 epochs x 3
    assert first["minibatches"]["kl"][0] == 0.0  # the first step starts at the acting policy
    assert len(first["value_norm_before"]) == len(first["value_norm_after"]) == 2
    assert first["value_norm_before"] != first["value_norm_after"]
    assert first["terminated_share"] == 0.0 and first["episodes_ended"] == 16  # 5-step limits
