"""QMIX and VDN: the mixers' properties, targets, the replay, acting, and learning end to end."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import envs
from agents.replay import Replay
from agents.rollout import RolloutBatch, RolloutWorker
from agents.value_decomposition import QConfig, ValueDecomposition, split_chunks, td_targets
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import ConfigError, load_config
from orchestrator.runtime.checkpoint import load_checkpoint, policy_from_checkpoint
from orchestrator.runtime.driver import preflight, run_training
from policies.actor_critic import PolicySpec
from policies.groups import AgentGroup
from policies.memory import KEEP, MEMORY, chunk_keep
from policies.q import TAKEN, GroupedQPolicy, QMixer, QPolicy, VDNMixer
from tests.agents.relay import RELAY, RUN, train_on_relay


def _spec(kind: str = "mlp", n_actions: int = 4) -> PolicySpec:
    return PolicySpec(kind=kind, obs_dim=5, state_dim=7, node_dim=5, action_kind="discrete",
                      action_dim=n_actions, hidden=16)  # fmt: skip


def _batch(b: int = 6, n: int = 3, a: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, n, a, generator=g) > 0.4
    mask[..., 0] = True  # one legal action at least
    return {
        "obs": torch.randn(b, n, 5, generator=g),
        "state": torch.randn(b, 7, generator=g),
        "alive": torch.rand(b, n, generator=g) > 0.2,
        "action_mask": mask,
    }


@pytest.mark.parametrize("seed", range(5))
def test_qmix_is_monotonic_in_every_agent_utility(seed: int) -> None:
    torch.manual_seed(seed)
    mixer = QMixer(n_agents=4, state_dim=7, embed=8)
    for p in mixer.parameters():  # far from the initialisation, too
        p.data.mul_(3.0)
    q = torch.randn(64, 4, requires_grad=True) * 5
    state = torch.randn(64, 7)
    total = mixer(q, state)
    (grad,) = torch.autograd.grad(total.sum(), q)
    assert (grad >= 0).all()
    for i in range(4):  # raising one agent's utility never lowers the team's
        raised = q.detach().clone()
        raised[:, i] += torch.rand(64) * 10
        assert (mixer(raised, state) >= total.detach() - 1e-5).all()


def test_vdn_sums_the_living_agents_utilities() -> None:
    model = QPolicy(_spec(), "vdn", n_agents=3)
    batch = _batch()
    chosen = torch.randn(6, 3)
    expected = (chosen * batch["alive"]).sum(-1)
    torch.testing.assert_close(model.mix(chosen, batch), expected)
    assert list(VDNMixer().parameters()) == []


@pytest.mark.parametrize("kind", ["mlp", "gnn", "transformer"])
def test_acting_is_epsilon_greedy_over_legal_actions_and_evaluation_is_greedy(kind: str) -> None:
    torch.manual_seed(0)
    model = QPolicy(_spec(kind), "qmix", n_agents=3)
    batch = _batch(b=400)
    if kind != "mlp":  # entity encoders read the agents as the first nodes
        batch |= {"nodes": batch["obs"], "node_pos": batch["obs"][..., :2],
                  "node_mask": torch.ones(400, 3, dtype=torch.bool)}  # fmt: skip
    q = model.utilities(batch)
    greedy = q.argmax(-1)
    assert torch.isinf(q[~batch["action_mask"]]).all()
    model.epsilon.fill_(1.0)
    action, logp, value, memory = model.act(batch)
    assert memory is None and torch.isfinite(logp).all()
    assert batch["action_mask"].gather(-1, action.unsqueeze(-1)).all()  # never illegal
    assert (action != greedy).float().mean() > 0.3  # explores
    torch.testing.assert_close(value, q.amax(-1))
    model.epsilon.fill_(0.2)
    with model.evaluating():
        assert torch.equal(model.act(batch)[0], greedy)
    assert model.epsilon.item() == pytest.approx(0.2)  # the schedule's ε comes back


def test_targets_value_the_online_choice_with_the_target_network_over_legal_actions() -> None:
    torch.manual_seed(1)
    online = QPolicy(_spec(), "qmix", n_agents=3)
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.data.add_(torch.randn_like(p) * 0.5)
    nxt = _batch(b=32, seed=2)
    reward, ended = torch.randn(32), torch.rand(32) > 0.7
    y = td_targets(target, online, nxt, reward, ended, gamma=0.9)
    q_online, q_target = online.utilities(nxt), target.utilities(nxt)
    choice = q_online.argmax(-1)
    assert nxt["action_mask"].gather(-1, choice.unsqueeze(-1)).all()  # a legal action
    chosen = q_target.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    expected = reward + 0.9 * (~ended) * target.mix(chosen, nxt)
    torch.testing.assert_close(y, expected)
    assert torch.equal(y[ended], reward[ended])  # a real end is not bootstrapped
    # Without double Q the target network both chooses and values.
    single = td_targets(target, None, nxt, reward, ended, gamma=0.9)
    best = target.mix(q_target.amax(-1), nxt)
    torch.testing.assert_close(single, reward + 0.9 * (~ended) * best)


def _rollout(t: int = 5, b: int = 4, n: int = 3) -> RolloutBatch:
    terminated = torch.zeros(t, b, n, dtype=torch.bool)
    truncated = torch.zeros(t, b, dtype=torch.bool)
    terminated[1, 0] = True  # env 0 ends for real after step 1
    truncated[2, 1] = True  # env 1 is cut by a time limit after step 2
    terminated[2, 2, 0] = True  # an agent of env 2 dies; the episode goes on
    z = torch.zeros(t, b, n)
    return RolloutBatch(
        obs={"obs": torch.randn(t, b, n, 5), "alive": torch.ones(t, b, n, dtype=torch.bool)},
        actions=torch.zeros(t, b, n, dtype=torch.long), logp=z, values=z,
        rewards=torch.ones(t, b, n), terminated=terminated, truncated=truncated,
        next_values=z, episode_returns=torch.zeros(0), episode_lengths=torch.zeros(0),
    )  # fmt: skip


def test_the_replay_keeps_only_transitions_whose_next_observation_it_holds() -> None:
    replay = Replay(capacity_steps=40, keys=frozenset({"obs", "alive"}))
    batch = _rollout()
    replay.add(batch)
    valid, ended = replay.data["valid"][0], replay.data["ended"][0]
    assert not valid[-1].any()  # the batch's last step has no next observation here
    assert not valid[2, 1]  # a time limit cut it: its final observation is not stored
    assert valid[1, 0] and ended[1, 0]  # a real end: replayed, not bootstrapped
    assert valid[2, 2] and not ended[2, 2]  # one agent died: the team goes on
    assert replay.transitions == 4 * 4 - 1
    torch.testing.assert_close(replay.data["reward"][0], torch.full((5, 4), 3.0))
    now, nxt, rest = replay.take(torch.tensor([0]), torch.tensor([3]), torch.tensor([2]))
    assert torch.equal(now["obs"][0], batch.obs["obs"][3, 2])
    assert torch.equal(nxt["obs"][0], batch.obs["obs"][4, 2])
    for _ in range(3):  # a ring of two batches: the oldest goes first
        replay.add(_rollout())
    assert replay.slots == 2 and replay.filled == 2


def _vdn_learner(
    seed: int, gamma: float, **settings: Any
) -> tuple[QPolicy, ValueDecomposition, RolloutBatch]:
    """A VDN learner taking one gradient step per batch from the start, and a batch for it."""
    torch.manual_seed(seed)
    model = QPolicy(_spec(), "vdn", n_agents=3)
    cfg = QConfig(replay_size=10_000, learning_starts=0, updates_per_batch=1, **settings)
    train = type("T", (), {**cfg.model_dump(), "lr": 1e-2, "gamma": gamma, "max_grad_norm": 10.0})
    batch = _rollout()
    batch.obs["action_mask"] = torch.ones(5, 4, 3, 4, dtype=torch.bool)
    batch.obs["state"] = torch.randn(5, 4, 7)
    return model, ValueDecomposition(model, train), batch


def test_a_gradient_step_moves_the_taken_actions_value_towards_its_target() -> None:
    model, learner, batch = _vdn_learner(
        3, gamma=0.0, replay_batch=64, epsilon_steps=100, standardise_rewards=False
    )
    losses = [learner.update(batch)["q_loss"] for _ in range(80)]
    assert losses[-1] < losses[0] * 0.2  # γ = 0: Q_tot of the taken actions -> the reward
    now = {k: v[0] for k, v in batch.obs.items()}
    _, q_tot = model({**now, TAKEN: batch.actions[0]})
    torch.testing.assert_close(q_tot, torch.full((4,), 3.0), atol=0.3, rtol=0)
    assert model.epsilon.item() == pytest.approx(0.05)  # 600 env steps > epsilon_steps


def test_targets_are_in_units_of_the_standardised_team_reward() -> None:
    model, learner, batch = _vdn_learner(4, gamma=0.0, replay_batch=64, epsilon_steps=100)
    team = torch.arange(20.0).view(5, 4)  # each step's team reward, spread over 3 agents
    batch.rewards = team.unsqueeze(-1).expand(5, 4, 3) / 3
    for _ in range(120):
        learner.update(batch)
    torch.testing.assert_close(
        learner.reward_moments[0], torch.tensor(120 * 20.0, dtype=torch.float64)
    )
    expected = (team - team.mean()) / team.std(unbiased=False)
    now = {k: v[1] for k, v in batch.obs.items()}
    _, q_tot = model({**now, TAKEN: batch.actions[1]})
    torch.testing.assert_close(q_tot, expected[1], atol=0.3, rtol=0)  # γ = 0: Q_tot -> r̃
    restored = _vdn_learner(4, gamma=0.0)[1]
    restored.load_state_dict(learner.state_dict())
    torch.testing.assert_close(restored.reward_moments, learner.reward_moments)


def test_uncentred_rewards_are_only_divided_by_their_deviation() -> None:
    # train.reward_center=false: a step with no reward stays at zero (no per-step cost that
    # would make ending an episode sooner pay), and rewards keep their signs and ratios.
    _, learner, batch = _vdn_learner(4, gamma=0.0, reward_center=False)
    team = torch.arange(20.0).view(5, 4)
    batch.rewards = team.unsqueeze(-1).expand(5, 4, 3) / 3
    learner.observe(batch)
    scaled = learner._scaled(team)
    torch.testing.assert_close(scaled, team / team.std(unbiased=False))
    assert scaled[0, 0] == 0


def test_a_fresh_qmix_mixer_is_near_zero_whatever_the_state_scale() -> None:
    torch.manual_seed(0)
    mixer = QMixer(n_agents=3, state_dim=24, embed=32)
    state = torch.randint(0, 8, (256, 24)).float()  # raw grid coordinates, as LBF's
    q = torch.randn(256, 3)
    assert mixer(q, state).abs().max() < 0.1 * q.abs().max()


def test_config_errors_name_the_key_before_anything_starts() -> None:
    with pytest.raises(ConfigError, match=r"train.algorithm=qmix does not learn continuous"):
        preflight(load_config("spread-mlp", ["train.algorithm=qmix",
                                             "env.continuous_actions=true"]))  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.algorithm=masac does not train policies with"):
        preflight(load_config("spread-mlp", ["train.algorithm=masac", "model.memory=gru"]))
    with pytest.raises(ConfigError, match=r"train.chunk_len \(25\) must be below"):
        load_config("spread-mlp", ["train.algorithm=vdn", "model.memory=gru",
                                   "train.chunk_len=25"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.burn_in \(24\) \+ train.chunk_len \(def"):
        load_config("spread-mlp", ["train.algorithm=qmix", "model.memory=gru",
                                   "train.burn_in=24"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"train.algorithm=qmix does not train with world_model"):
        preflight(load_config("spread-gnn-wm", ["train.algorithm=qmix"]))
    with pytest.raises(ConfigError, match=r"train.epsilon_end"):
        load_config("spread-mlp", ["train.algorithm=qmix", "train.epsilon_end=2"])


@pytest.mark.parametrize("algorithm", ["vdn", "qmix"])
def test_learns_a_cooperative_task_checkpoints_and_evaluates_greedily(
    algorithm: str, tmp_path: Path
) -> None:
    run_dir, ckpt = train_on_relay(tmp_path, algorithm, 12000, "train.epsilon_steps=4000")
    assert ckpt["meta"]["q_policy"]["mixer"] == algorithm
    assert ckpt["learner"]["gradient_steps"] > 0
    model = policy_from_checkpoint(ckpt)
    assert isinstance(model, QPolicy) and model.epsilon.item() < 0.1
    # a0 and a1 learn first; QMIX's hypernetwork takes longer to credit a2's two steps.
    assert evaluate(run_dir, episodes=16)["mean"] >= 10.0


def test_resume_continues_from_the_same_replay(tmp_path: Path) -> None:
    def cfg(steps: int):  # noqa: ANN202
        return load_config("spread-mlp", [
            *RUN, f"env.name={RELAY}", "env.num_envs=8", "train.rollout_len=10",
            "train.algorithm=vdn", f"train.total_env_steps={steps}", "train.learning_starts=0",
            "train.replay_batch=64", "train.updates_per_batch=1",
        ])  # fmt: skip

    run_dir = tmp_path / "vdn"
    run_dir.mkdir()
    run_training(cfg(800), run_dir)
    ckpt = load_checkpoint(run_dir)
    held = ckpt["learner"]["replay"]
    # Relay's time limit cuts every 5th step, and a batch's last step has no next observation
    # here: 8 of each env's 10 steps are replayed.
    assert held["filled"] == 10 and held["data"]["valid"].sum() == 10 * 8 * 8
    before = _metric_rows(run_dir)
    run_training(cfg(1200), run_dir, resume=str(run_dir))
    after = _metric_rows(run_dir)[len(before) :]
    assert float(after[0]["replay_transitions"]) == 11 * 64  # the old batches and one more
    assert load_checkpoint(run_dir)["learner"]["gradient_steps"] == 15


def _metric_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("every", [None, 3])
def test_the_target_network_follows_by_polyak_steps_or_hard_copies(every: int | None) -> None:
    model, learner, batch = _vdn_learner(4, gamma=0.9, replay_batch=32, target_every=every)
    gaps = []
    for _ in range(6):
        before = [q.clone() for q in learner.target.parameters()]
        learner.update(batch)
        online, target = list(model.parameters()), list(learner.target.parameters())
        same = all(torch.equal(p, q) for p, q in zip(online, target, strict=True))
        moved = any(not torch.equal(b, q) for b, q in zip(before, target, strict=True))
        gaps.append((same, moved))
    if every is None:  # a small step towards the online network at every gradient step
        assert all(moved and not same for same, moved in gaps)
    else:  # untouched, then a copy at every third gradient step
        assert gaps == [(False, False), (False, False), (True, True)] * 2


# -- memory: recurrent utilities trained on replayed chunks ------------------------------


@pytest.mark.parametrize("memory", ["gru", "lstm"])
@pytest.mark.parametrize("kind", ["mlp", "gnn", "transformer"])
def test_replayed_chunks_unroll_to_what_acting_gave_step_by_step(kind: str, memory: str) -> None:
    # Episodes of 3 steps: chunks straddle episode ends, so the state must reset inside a
    # chunk exactly where acting reset it, and start from the state acting stored.
    torch.manual_seed(0)
    env = envs.make("cue", num_envs=6, n_agents=2, max_cycles=3, seed=0)
    spec = PolicySpec(kind, env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, hidden=16, memory=memory)  # fmt: skip
    model = QPolicy(spec, "qmix", n_agents=2)
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    assert MEMORY in batch.obs  # acting stored each step's entering state
    replay = Replay(10_000, model.input_keys)
    replay.add(batch)
    envs_ = torch.arange(6)
    acted_keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    for start, length in ((0, 11), (2, 7), (4, 4)):
        at = (torch.zeros(6, dtype=torch.long), torch.full((6,), start), envs_)
        obs, rest = replay.take_chunks(*at, length)
        steps = slice(start, start + length + 1)
        assert torch.equal(obs[KEEP][1:], acted_keep[steps][1:])
        assert torch.equal(rest["actions"], batch.actions[steps])
        with torch.no_grad():
            greedy = model.utilities(obs).amax(-1).view(length + 1, 6, 2)
            cold = model.utilities({**obs, MEMORY: torch.zeros_like(obs[MEMORY])})
        torch.testing.assert_close(greedy, batch.values[steps], atol=1e-5, rtol=0)
        if start % 3:  # mid-episode: the stored state matters
            assert not torch.allclose(cold.amax(-1).view_as(greedy), greedy, atol=1e-4)


def test_a_burnt_in_tail_continues_the_whole_unroll_exactly() -> None:
    # Whatever the weights (here: not the acting ones), unrolling the first steps to a state
    # and the rest from it gives the whole chunk's unroll, resets between them included.
    torch.manual_seed(0)
    env = envs.make("cue", num_envs=6, n_agents=2, max_cycles=3, seed=0)
    spec = PolicySpec("mlp", env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, hidden=16, memory="lstm")  # fmt: skip
    model = QPolicy(spec, "qmix", n_agents=2)
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    replay = Replay(10_000, model.input_keys)
    replay.add(batch)
    torch.manual_seed(1)
    other = QPolicy(spec, "qmix", n_agents=2)
    at = (torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 3, 0, 1]), torch.arange(6))
    obs, _ = replay.take_chunks(*at, 8)
    for burn in (1, 2, 3, 4):  # episodes of 3 steps: some cuts fall on a reset
        head, tail, keep = split_chunks(obs, burn)
        with torch.no_grad():
            whole = other.utilities(obs).view(9, 6, 2, -1)[burn:]
            rest = other.utilities({**tail, MEMORY: other.state_after(head) * keep})
        torch.testing.assert_close(rest.view_as(whole), whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("burn", [0, 2])
def test_recurrent_targets_bootstrap_from_the_next_step_of_the_same_unroll(burn: int) -> None:
    # A fresh target network is the online one, so a chunk's target at step t is the team
    # reward plus gamma times the summed greedy utilities acting recorded at t + 1 (VDN) -
    # nothing at a real end, and a step a time limit cut is not replayed. Burn-in steps
    # unroll the same weights from the stored state, so they reach acting's state too.
    torch.manual_seed(0)
    env = envs.make("cue", num_envs=8, n_agents=2, max_cycles=4, seed=0)
    spec = PolicySpec("mlp", env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, hidden=16, memory="gru")  # fmt: skip
    model = QPolicy(spec, "vdn", n_agents=2)
    cfg = QConfig(replay_size=10_000, learning_starts=0, replay_batch=60,
                  standardise_rewards=False)  # fmt: skip
    train = type("T", (), {**cfg.model_dump(), "lr": 1e-2, "gamma": 0.9, "max_grad_norm": 10.0,
                           "chunk_len": 5, "burn_in": burn})  # fmt: skip
    learner = ValueDecomposition(model, train)
    batch = RolloutWorker(env, model, rollout_len=10, seed=2).collect()
    batch.truncated[6, 3] = True  # as if a time limit had cut env 3 after step 6
    learner.replay.add(batch)
    start = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4]) if not burn else torch.tensor([0, 1, 2] * 3)[:8]
    at = (torch.zeros(8, dtype=torch.long), start, torch.arange(8))
    learner.draw = lambda width, device, length=1: at  # type: ignore[method-assign]
    q_tot, y, valid = learner._sequences(8, torch.device("cpu"))
    assert q_tot.shape == y.shape == valid.shape == (5, 8)
    alive = batch.obs["alive"].float()
    team = (batch.rewards * alive).sum(-1)  # [T, B]
    ended = batch.terminated.all(-1)
    assert ended.any()
    later = (batch.values * alive).sum(-1)  # what acting valued each step at
    for i, t0 in enumerate(start.tolist()):
        for step in range(5):
            t = t0 + burn + step
            assert bool(valid[step, i]) == (not (t == 6 and i == 3))
            if i == 3 and t >= 6:  # the unroll reset after the cut, where acting did not
                continue
            expected = team[t, i] + 0.9 * (~ended[t, i]).float() * later[t + 1, i]
            torch.testing.assert_close(y[step, i], expected, atol=1e-5, rtol=0, msg=f"{t} {i}")


def test_the_cue_task_is_learned_with_recurrent_utilities_and_stays_at_chance_without(
    tmp_path: Path,
) -> None:
    # The cue is shown at the first of 4 steps and must be named at the last: chance is 0.5 of
    # a possible 2.0, and feed-forward utilities see the same last observation every episode.
    results = {}
    for memory in ("none", "gru"):
        cfg = load_config("spread-mlp", [
            *RUN, "env.name=cue", "env.n_agents=2", "env.max_cycles=4", "env.num_envs=32",
            "model.kind=mlp", "model.hidden=32", "train.rollout_len=16", "train.algorithm=qmix",
            "train.total_env_steps=48000", "train.learning_starts=500", "train.lr=0.003",
            "train.replay_batch=256", "train.updates_per_batch=8", "train.epsilon_steps=6000",
            f"model.memory={memory}",
        ])  # fmt: skip
        run = tmp_path / memory
        run.mkdir()
        run_training(cfg, run)
        results[memory] = evaluate(run, episodes=400, which="latest")["mean"]  # carries memory
    assert results["gru"] > 1.8, results
    assert abs(results["none"] - 0.5) < 0.15, results


# -- agent groups: a utility network per group, one mixer --------------------------------

SPEAKER_LISTENER = "pettingzoo:mpe2.simple_speaker_listener_v4"


def test_grouped_utilities_keep_each_groups_widths_actions_and_rate() -> None:
    # speaker: 3 observations, 3 actions; listener: 11 and 5 (the adapter pads to the widest).
    cfg = load_config("spread-mlp", [
        *RUN, f"env.name={SPEAKER_LISTENER}", "env.num_envs=4", "train.algorithm=qmix",
        "groups.speaker.lr=0.01", "groups.listener.model.hidden=24", "model.hidden=16",
        "train.rollout_len=8", "train.learning_starts=0", "train.replay_batch=16",
    ])  # fmt: skip
    env = cfg.env.make(4, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    assert isinstance(model, GroupedQPolicy) and model.n_agents == 2
    speaker, listener = model.units
    assert speaker.encoder.body[0].in_features == 3 and speaker.q_head.out_features == 3
    assert listener.encoder.body[0].in_features == 11 and listener.q_head.out_features == 5
    assert listener.q_head.in_features == 24
    # One ε and one mixer for the team; a checkpoint whose units still carried ε loads.
    assert [k for k in model.state_dict() if k.endswith("epsilon")] == ["epsilon"]
    older = {
        **model.state_dict(),
        "units.0.epsilon": torch.ones(()),
        "units.1.epsilon": torch.ones(()),
    }
    model.load_state_dict(older)

    obs = env.reset(seed=1).as_dict()
    q = model.utilities(obs)
    assert q.shape == (4, 2, 5) and bool((q[:, 0, 3:] == float("-inf")).all())
    padded = {**obs, "obs": obs["obs"].clone()}
    padded["obs"][:, 0, 3:] = 7.0  # the speaker's padding: its utilities must not read it
    padded["obs"][:, 1] += 1.0  # the listener's observation moves only the listener's
    moved = model.utilities(padded)
    torch.testing.assert_close(moved[:, 0], q[:, 0])
    assert not torch.allclose(moved[:, 1], q[:, 1])
    for _ in range(10):  # ε = 1 at first: the speaker's random actions stay in its own 3
        action = model.act(obs)[0]
        assert int(action[:, 0].max()) < 3
        obs = env.step(action).observation.as_dict()

    learner = ValueDecomposition(model, cfg.train)
    worker = RolloutWorker(env, model, cfg.train.rollout_len, seed=0)
    stats = learner.update(worker.collect(), lr_frac=0.5)
    assert stats["gradient_steps"] > 0 and all(v == v for v in stats.values())
    rates = [g["lr"] for g in learner.optimizer.param_groups]
    assert rates == [0.005, cfg.train.lr * 0.5, cfg.train.lr * 0.5]  # speaker, listener, mixer
    env.close()


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("second", ["none", "lstm"])
def test_grouped_recurrent_chunks_unroll_to_what_acting_gave(kind: str, second: str) -> None:
    # Two groups with different memories (a GRU beside no memory or a wider LSTM state): each
    # slot's state is padded to the widest, and each unit unrolls its own part of it.
    torch.manual_seed(0)
    env = envs.make("cue", num_envs=6, n_agents=2, max_cycles=3, seed=0)
    spec = PolicySpec(kind, env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, hidden=16, memory="gru")  # fmt: skip
    groups = [AgentGroup("first", (0,), spec),
              AgentGroup("second", (1,), replace(spec, memory=second))]  # fmt: skip
    model = GroupedQPolicy(groups, "qmix", env.action_dim)
    assert model.memory_size == max(u.memory_size for u in model.units)
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    replay = Replay(10_000, model.input_keys)
    replay.add(batch)
    at = (torch.zeros(6, dtype=torch.long), torch.tensor([0, 1, 2, 3, 2, 1]), torch.arange(6))
    obs, _ = replay.take_chunks(*at, 8)
    with torch.no_grad():
        greedy = model.utilities(obs).amax(-1).view(9, 6, 2)
        for burn in (1, 2):
            head, tail, keep = split_chunks(obs, burn)
            rest = model.utilities({**tail, MEMORY: model.state_after(head) * keep})
            torch.testing.assert_close(rest.amax(-1).view(-1, 6, 2), greedy[burn:], atol=1e-6,
                                       rtol=0)  # fmt: skip
    starts = at[1].tolist()
    acted = torch.stack([batch.values[t : t + 9, i] for i, t in enumerate(starts)], dim=1)
    torch.testing.assert_close(greedy, acted, atol=1e-5, rtol=0)


def test_grouped_qmix_learns_checkpoints_and_refuses_what_a_team_value_cannot_be(
    tmp_path: Path,
) -> None:
    groups = ["groups.pair.agents=a[01]", "groups.pair.share=false", "groups.last.agents=a2"]
    run_dir, ckpt = train_on_relay(tmp_path, "qmix", 12000, "train.epsilon_steps=4000",
                                   *groups)  # fmt: skip
    assert [g["name"] for g in ckpt["meta"]["policy_groups"]] == ["pair", "last"]
    model = policy_from_checkpoint(ckpt)
    assert isinstance(model, GroupedQPolicy) and len(model.units) == 3  # a0, a1 unshared
    assert evaluate(run_dir, episodes=16)["mean"] >= 10.0

    frozen = [*groups, "groups.last.train=false", "train.algorithm=qmix"]
    with pytest.raises(ConfigError, match=r"groups.last.train=false: qmix learns one team"):
        preflight(load_config("spread-mlp", [*RUN, f"env.name={RELAY}", *frozen]))
    with pytest.raises(ConfigError, match=r"groups.last.pool.size: qmix learns one team"):
        preflight(
            load_config(
                "spread-mlp",
                [
                    *RUN,
                    f"env.name={RELAY}",
                    *groups,
                    "train.algorithm=qmix",
                    "groups.last.pool.size=2",
                ],
            )
        )
