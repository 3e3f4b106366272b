"""Memory (``model.memory``): exact chunked training, resets where acting reset, the task that
needs it, and the equivariance of recurrent entity policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import envs
from agents.ppo import Learner, PPOConfig, _Steps, chunk_length
from agents.rollout import RolloutWorker, episode_returns
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import ConfigError, load_config
from orchestrator.runtime.driver import run_training
from policies import ActorCritic, PolicySpec
from policies.memory import MEMORY, MemoryState, chunk_keep


def _cue_policy(
    kind: str,
    memory: str,
    n_agents: int = 2,
    seed: int = 0,
    memory_norm: bool = False,
    memory_out_norm: bool = False,
    critic_memory: str = "none",
    centralised: bool = True,
    **kw,
):
    torch.manual_seed(seed)
    env = envs.make("cue", num_envs=6, n_agents=n_agents, max_cycles=3, seed=seed, **kw)
    spec = PolicySpec(kind, env.obs_dim, env.state_dim, env.node_dim, "discrete",
                      env.action_dim, centralised=centralised, hidden=16, memory=memory,
                      critic_memory=critic_memory, memory_norm=memory_norm,
                      memory_out_norm=memory_out_norm)  # fmt: skip
    return env, ActorCritic(spec)


def _chunk_pass(model, batch, obs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's actions' log-probabilities and the raw values from whole 4-step chunks,
    each started from the state stored in ``obs`` (default the batch's own) and reset where
    acting reset."""
    t_len, b = batch.rewards.shape[:2]
    steps = _Steps(torch.arange(t_len // 4), 4)
    keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    with torch.no_grad():
        dist, v = model(steps.obs(batch.obs if obs is None else obs, model.input_keys, keep))
        logp = steps.untake(dist.log_prob(steps.take(batch.actions)), (t_len, b))
        return logp, steps.untake(model.value_norm.denormalize(v), (t_len, b))


def _chunk_logp(model, batch, obs: dict | None = None) -> torch.Tensor:
    return _chunk_pass(model, batch, obs)[0]


@pytest.mark.parametrize("memory", ["gru", "lstm"])
@pytest.mark.parametrize("kind", ["mlp", "gnn", "transformer"])
def test_whole_chunks_give_what_acting_step_by_step_gave(kind: str, memory: str) -> None:
    # Episodes of 3 steps, chunks of 4: chunks straddle episode ends, so the reset inside a
    # chunk has to happen exactly where acting reset.
    env, model = _cue_policy(kind, memory)
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    torch.testing.assert_close(_chunk_logp(model, batch), batch.logp, atol=1e-5, rtol=0)
    # The states carried matter: the same chunks from zero states act differently.
    zeros = {**batch.obs, MEMORY: torch.zeros_like(batch.obs[MEMORY])}
    assert not torch.allclose(_chunk_logp(model, batch, zeros), batch.logp, atol=1e-4)


@pytest.mark.parametrize("critic_memory", ["gru", "lstm"])
@pytest.mark.parametrize(("kind", "memory"), [("mlp", "none"), ("mlp", "gru"), ("gnn", "lstm"),
                                              ("transformer", "gru")])  # fmt: skip
def test_a_recurrent_critic_gives_in_chunks_the_values_acting_gave(
    kind: str, memory: str, critic_memory: str
) -> None:
    # The critic's state follows the actor's in the same memory rows; whole chunks reproduce
    # acting's values (and log-probabilities) across the resets inside them, and the carried
    # critic state matters.
    env, model = _cue_policy(kind, memory, critic_memory=critic_memory, centralised=False)
    actor_size = 0 if memory == "none" else (16 if memory == "gru" else 32)
    assert model.memory_size == actor_size + (16 if critic_memory == "gru" else 32)
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    assert batch.obs[MEMORY].shape[-1] == model.memory_size
    logp, values = _chunk_pass(model, batch)
    torch.testing.assert_close(logp, batch.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, batch.values, atol=1e-5, rtol=0)
    zeros = {**batch.obs, MEMORY: torch.zeros_like(batch.obs[MEMORY])}
    assert not torch.allclose(_chunk_pass(model, batch, zeros)[1], batch.values, atol=1e-4)
    # The actor reads only its own columns: the critic's do not move its actions.
    obs = env.reset(seed=2).as_dict()
    obs[MEMORY] = torch.randn(6, 2, model.memory_size)
    other = {**obs, MEMORY: obs[MEMORY].clone()}
    other[MEMORY][..., actor_size:] = torch.randn(6, 2, model.memory_size - actor_size)
    with torch.no_grad():
        torch.testing.assert_close(model.dist(other).logits, model.dist(obs).logits)
        assert not torch.allclose(model.value(other), model.value(obs))
    # PPO trains it on those chunks.
    stats = Learner(model, PPOConfig(minibatches=3)).update(batch)
    assert stats["minibatches_done"] > 0 and torch.isfinite(torch.tensor(stats["value_loss"]))


def test_a_finished_episode_is_bootstrapped_from_the_critic_state_it_reached() -> None:
    # rollout_len 4 on 3-step episodes: step 3's value bootstraps step 2's truncation from
    # the final observation read with the state the critic carried there (not zeros).
    env, model = _cue_policy("mlp", "none", critic_memory="gru", centralised=False)
    seen: list[dict] = []
    raw_value = model.raw_value
    model.raw_value = lambda batch: (seen.append(batch), raw_value(batch))[1]  # type: ignore[method-assign]
    batch = RolloutWorker(env, model, rollout_len=4, seed=6).collect()
    assert len(seen) == 1 and MEMORY in seen[0]
    carried = seen[0][MEMORY]
    assert carried.shape == batch.obs[MEMORY][2].shape and (carried != 0).all()
    # It is the state after step 2 (what step 3 would have entered without the reset).
    with torch.no_grad():
        _, after = model.step({**{k: v[2] for k, v in batch.obs.items()}})
    torch.testing.assert_close(carried, after)
    assert (batch.obs[MEMORY][3] == 0).all()  # the next episode starts from zeros


def test_states_reset_exactly_where_episodes_end_and_agents_die() -> None:
    env, model = _cue_policy("mlp", "gru")
    batch = RolloutWorker(env, model, rollout_len=9, seed=2).collect()
    stored = batch.obs[MEMORY].abs().sum(-1)  # [T, B, N]
    starts = torch.tensor([t % 3 == 0 for t in range(9)])  # the cue env's episodes: 3 steps
    assert (stored[starts] == 0).all() and (stored[~starts] > 0).all()
    # Per env and per agent in one step of a vectorised auto-reset: only the ended env and
    # the agent that died start from zero.
    mem = MemoryState(2)
    mem.feed({"alive": torch.ones(3, 2, dtype=torch.bool)})
    state = torch.ones(3, 2, 2)
    alive = torch.tensor([[True, True], [True, False], [True, True]])
    mem.advance(state, torch.tensor([False, False, True]), alive)
    assert mem.state is not None
    assert mem.state.sum(-1).tolist() == [[2.0, 2.0], [2.0, 0.0], [0.0, 0.0]]


def test_k_chunked_ranks_see_exactly_one_ranks_minibatches() -> None:
    # Chunks cut along time and shards along envs: two halves of the envs give back the
    # whole batch's minibatch (what K=2 relies on to equal K=1).
    env, model = _cue_policy("mlp", "gru")
    batch = RolloutWorker(env, model, rollout_len=12, seed=3).collect()
    mb = _Steps(torch.tensor([2, 0]), 4)
    whole = mb.take(batch.rewards).view(4, 2, 6, -1)
    halves = [mb.take(s.rewards).view(4, 2, 3, -1) for s in batch.split_envs(2)]
    torch.testing.assert_close(torch.cat(halves, 2), whole)


@pytest.mark.parametrize("kind", ["gnn", "transformer"])
def test_recurrent_entity_policies_are_equivariant_and_act_with_twice_the_agents(
    kind: str,
) -> None:
    env, model = _cue_policy(kind, "gru", n_agents=3)
    obs = env.reset(seed=4).as_dict()
    obs[MEMORY] = torch.randn(6, 3, model.memory_size)
    perm = torch.tensor([2, 0, 1])
    permuted = {k: v[:, perm] if v.dim() > 1 and v.shape[1] == 3 else v for k, v in obs.items()}
    with torch.no_grad():
        d, m = model.step(obs)
        dp, mp = model.step(permuted)
    assert m is not None and mp is not None
    torch.testing.assert_close(dp.logits, d.logits[:, perm], atol=1e-5, rtol=0)
    torch.testing.assert_close(mp, m[:, perm], atol=1e-5, rtol=0)
    big = envs.make("cue", num_envs=6, n_agents=6, max_cycles=3)
    returns = episode_returns(model, big, episodes=6, seed=0)
    assert len(returns) == 6


def test_chunk_length_and_the_config_errors() -> None:
    assert chunk_length(64, 4, None) == 16
    assert chunk_length(25, 2, None) == 5  # the longest divisor leaving >= 2 chunks
    assert chunk_length(25, 2, 25) == 25
    with pytest.raises(ValueError, match=r"train.chunk_len \(7\) must divide"):
        chunk_length(25, 2, 7)
    with pytest.raises(ConfigError, match=r"train.chunk_len \(7\) must divide train.rollout_len"):
        load_config("spread-gnn", ["model.memory=gru", "train.chunk_len=7"])
    cfg = load_config("spread-gnn", ["model.memory=lstm"])
    assert cfg.model.memory == "lstm"
    plain = ActorCritic(
        cfg.model.model_copy(update={"memory": "none"}).spec(
            cfg.env.make(2, 0, torch.device("cpu"))
        )
    )
    assert plain.memory_size == 0 and MEMORY not in plain.input_keys
    assert not any("core" in k for k in plain.state_dict())
    # A critic with memory is memory too: chunks, their checks, and only for actor-critics.
    critic = load_config("spread-gnn", ["model.critic_memory=gru"])
    assert critic.uses_memory() and not critic.uses_memory(("memory",))
    with pytest.raises(ConfigError, match=r"train.chunk_len \(7\) must divide"):
        load_config("spread-gnn", ["model.critic_memory=lstm", "train.chunk_len=7"])
    with pytest.raises(ConfigError, match=r"model.critic_memory: train.algorithm=qmix has no"):
        load_config("lbf-8x8-2p-2f-coop-qmix", ["model.critic_memory=gru"])
    with pytest.raises(ConfigError, match=r"model.critic_memory"):
        load_config("spread-gnn", ["model.critic_memory=rnn"])


@pytest.mark.parametrize(
    "groups",
    [
        ["model.memory=gru"],
        ["groups.adversary.model.memory=lstm", "groups.agent.model.kind=gnn"],
        ["model.memory=gru", "groups.agent.pool.size=2", "groups.agent.pool.share=0.5",
         "groups.adversary.model.kind=transformer", "model.hidden=16", "model.heads=2"],
        ["groups.adversary.model.critic_memory=gru", "groups.agent.model.memory=lstm",
         "model.critic=independent"],
        ["groups.adversary.model.critic_memory=gru", "groups.adversary.model.critic_kind=gnn",
         "groups.agent.model.memory=gru", "groups.agent.model.critic_kind=transformer",
         "model.heads=2", "groups.agent.pool.size=2", "groups.agent.pool.share=0.5"],
    ],
    ids=["every-group", "one-group-lstm", "self-play-pool", "critic-memory",
         "critic-memory-graph-critic"],
)  # fmt: skip
def test_agent_groups_carry_and_train_their_own_memory(groups: list[str]) -> None:
    # Each group's states live in its agents' slots (a group without memory keeps zeros); an
    # agent a past version plays carries that version's state; whole chunks reproduce acting.
    cfg = load_config("tag-mlp", ["env.num_envs=8", "env.max_cycles=5", *groups])
    env = cfg.env.make(8, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = cfg.build_policy(env)
    assert model.memory_size > 0
    batch = RolloutWorker(env, model, rollout_len=10, seed=1).collect()
    stored = batch.obs[MEMORY]
    if "groups.adversary.model.memory=lstm" in groups:
        agents = model.group_agents()
        assert (stored[..., agents["agent"], :] == 0).all()
        assert (stored[1:, :, agents["adversary"], :] != 0).any()
    t_len, b = batch.rewards.shape[:2]
    steps = _Steps(torch.arange(2), 5)
    keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    with torch.no_grad():
        dist, v = model(steps.obs(batch.obs, model.input_keys, keep))
        logp = steps.untake(dist.log_prob(steps.take(batch.actions)), (t_len, b))
        values = steps.untake(model.value_norm.denormalize(v), (t_len, b))
    torch.testing.assert_close(logp, batch.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, batch.values, atol=1e-5, rtol=0)
    stats = Learner(model, cfg.train).update(batch)
    assert stats["minibatches_done"] > 0


def test_grouped_acting_runs_each_critic_once_on_its_own_view() -> None:
    # A recurrent critic gives the value and its next state in one pass, whichever rows it
    # reads (an MLP actor's own rows, a graph critic's whole graph).
    cfg = load_config("tag-mlp", ["env.num_envs=4", "model.critic_memory=gru",
                                  "groups.agent.model.critic_kind=gnn"])  # fmt: skip
    env = cfg.env.make(4, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    calls = [0]
    for unit in model._units:  # every critic is recurrent: each pass reads features once
        original = unit.critic.critic.features

        def counted(batch, original=original):
            calls[0] += 1
            return original(batch)

        unit.critic.critic.features = counted
    obs = env.reset().as_dict()
    obs[MEMORY] = torch.zeros(*obs["alive"].shape, model.memory_size)
    _, _, value, memory = model.act(model.prepare(obs))
    assert calls[0] == len(model._units)
    assert memory is not None and memory.shape == (*obs["alive"].shape, model.memory_size)
    torch.testing.assert_close(model.value_norm.normalize(value), model.value(obs))


def test_a_stale_batch_is_refreshed_chunk_by_chunk() -> None:
    # Decoupled PPO recomputes the batch under the current weights: with memory that is a
    # sequence pass, and for unchanged weights it must give back what acting recorded.
    env, model = _cue_policy("mlp", "lstm")
    batch = RolloutWorker(env, model, rollout_len=12, seed=5).collect()
    learner = Learner(model, PPOConfig(minibatches=3))
    done = batch.terminated | batch.truncated.unsqueeze(-1)
    logp, values, _ = learner.refresh(batch, done)
    torch.testing.assert_close(logp, batch.logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(values, batch.values, atol=1e-5, rtol=0)
    stats = learner.update(batch, staleness=1)
    assert stats["minibatches_done"] > 0


@pytest.mark.parametrize("memory", ["gru", "lstm"])
def test_refreshed_chunk_states_follow_the_current_weights(memory: str) -> None:
    # train.refresh_memory: unrolling the batch with the weights that acted gives back the
    # states acting stored at every chunk start (resets included); after an update the
    # chunks start from the new weights' states, and the update still trains.
    env, model = _cue_policy("mlp", memory)
    batch = RolloutWorker(env, model, rollout_len=12, seed=4).collect()
    learner = Learner(model, PPOConfig(minibatches=3, refresh_memory=True))
    keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    fresh = learner.chunk_states(batch.obs, keep, 4)
    torch.testing.assert_close(fresh, batch.obs[MEMORY], atol=1e-5, rtol=0)
    stats = learner.update(batch)
    assert stats["minibatches_done"] == 1.0
    moved = learner.chunk_states(batch.obs, keep, 4)
    assert torch.equal(moved[0], batch.obs[MEMORY][0])  # the batch's first state is given
    assert not torch.allclose(moved[4], batch.obs[MEMORY][4], atol=1e-4)
    assert torch.equal(moved[5], batch.obs[MEMORY][5])  # inside chunks: never read
    # Where acting reset (the cue's episodes are 3 steps), the recomputed state is zero too.
    pairs = learner.chunk_states(batch.obs, keep, 2)
    assert not keep[6].any() and (pairs[6] == 0).all()
    assert keep[4].all() and (pairs[4] != 0).any()
    # A stale batch: refreshed once for the behaviour correction and the first epoch.
    assert learner.update(batch, staleness=1)["minibatches_done"] == 1.0


@pytest.mark.parametrize("memory", ["gru", "lstm"])
def test_burnt_in_chunk_states_are_actings_then_the_current_weights(memory: str) -> None:
    # train.burn_in for PPO: unchanged weights give back acting's states at every chunk start
    # (resets inside the burn-in included: the cue's episodes are 3 steps); after an update a
    # burn-in that reaches the batch's start equals the full refresh, a short one differs.
    from orchestrator.config.sections import TrainConfig

    env, model = _cue_policy("mlp", memory, critic_memory="gru", centralised=False)
    batch = RolloutWorker(env, model, rollout_len=12, seed=4).collect()
    learner = Learner(model, TrainConfig(minibatches=3, burn_in=2))
    keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    for burn in (1, 2, 5):
        burnt = learner.burn_in_states(batch.obs, keep, 4, burn)
        torch.testing.assert_close(burnt, batch.obs[MEMORY], atol=1e-5, rtol=0)
    assert learner.update(batch)["minibatches_done"] == 1.0
    full = learner.chunk_states(batch.obs, keep, 4)
    torch.testing.assert_close(learner.burn_in_states(batch.obs, keep, 4, 12), full)
    short = learner.burn_in_states(batch.obs, keep, 4, 1)
    assert torch.equal(short[0], batch.obs[MEMORY][0])
    assert not torch.allclose(short[8], batch.obs[MEMORY][8], atol=1e-4)


def test_refreshed_chunk_states_of_grouped_policies_match_acting() -> None:
    cfg = load_config(
        "tag-mlp",
        ["env.num_envs=8", "env.max_cycles=5", "model.memory=gru", "train.refresh_memory=true"],
    )
    env = cfg.env.make(8, 0, torch.device("cpu"))
    torch.manual_seed(0)
    model = cfg.build_policy(env)
    batch = RolloutWorker(env, model, rollout_len=10, seed=1).collect()
    learner = Learner(model, cfg.train)
    keep = chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])
    fresh = learner.chunk_states(batch.obs, keep, 5)
    torch.testing.assert_close(fresh, batch.obs[MEMORY], atol=1e-5, rtol=0)
    assert learner.update(batch)["minibatches_done"] > 0


CUE = ["env.name=cue", "env.n_agents=2", "env.max_cycles=4", "env.num_envs=64",
       "model.kind=mlp", "model.hidden=32", "train.rollout_len=16", "train.minibatches=2",
       "train.total_env_steps=24000", "redis.enabled=false", "run.progress=false"]  # fmt: skip


def test_the_cue_task_is_learned_with_memory_and_stays_at_chance_without(
    tmp_path: Path,
) -> None:
    # Chance is n_agents / choices = 0.5 of a possible 2.0: a feed-forward actor sees the same
    # last observation in every episode, so it cannot do better.
    results = {}
    for memory in ("none", "gru"):
        run = tmp_path / memory
        run.mkdir()
        run_training(load_config("spread-mlp", [*CUE, f"model.memory={memory}"]), run)
        results[memory] = evaluate(run, episodes=400, which="latest")["mean"]  # carries memory
    assert results["gru"] > 1.8, results
    assert abs(results["none"] - 0.5) < 0.15, results


def test_memory_norm_layer_normalises_the_core_input_and_keeps_chunks_exact() -> None:
    # The norm sits inside the core: acting and whole-chunk training still agree, and the
    # core's gates see unit-scale inputs however large the encoder's features are.
    env, model = _cue_policy("mlp", "gru", memory_norm=True)
    core = model.actor.core
    assert isinstance(core.norm, torch.nn.LayerNorm)
    big = torch.randn(5, 2, 16) * 100
    _, h = core(big, torch.zeros(5, 2, 16))
    _, h_unit = core(big / 100, torch.zeros(5, 2, 16))
    torch.testing.assert_close(h, h_unit, atol=1e-3, rtol=0)  # scale-free input
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    torch.testing.assert_close(_chunk_logp(model, batch), batch.logp, atol=1e-5, rtol=0)
    assert load_config(
        "spread-gnn", ["model.memory=gru", "model.memory_norm=true"]
    ).model.memory_norm


@pytest.mark.parametrize("memory", ["gru", "lstm"])
def test_memory_out_norm_normalises_the_head_input_not_the_carried_state(memory: str) -> None:
    # MAPPO's RNNLayer: the head reads a layer-normalised output, the next step reads the
    # cell's raw state; acting and whole-chunk training still agree.
    env, model = _cue_policy("mlp", memory, memory_out_norm=True)
    core = model.actor.core
    assert isinstance(core.out_norm, torch.nn.LayerNorm)
    out, state = core(torch.randn(5, 2, 16), torch.randn(5, 2, core.size))
    torch.testing.assert_close(out.mean(-1), torch.zeros(5, 2), atol=1e-5, rtol=0)
    assert not torch.allclose(state[..., :16], out, atol=1e-3)  # the state is not normalised
    batch = RolloutWorker(env, model, rollout_len=12, seed=1).collect()
    torch.testing.assert_close(_chunk_logp(model, batch), batch.logp, atol=1e-5, rtol=0)
    cfg = load_config("spread-gnn", ["model.memory=gru", "groups.agent.model.memory_out_norm=true"])
    assert cfg.groups["agent"].model.memory_out_norm
