"""Acting: step a vectorised env with batched policy inference, return a plain tensor batch.

``RolloutWorker`` is a plain class. A learner rank stepping its own envs drives it through
:class:`LocalRollouts`; a rollout actor wraps the same class, so collection code is identical
on every path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from envs.base import Observation, VecMultiAgentEnv
from policies.actor_critic import Policy
from policies.memory import MEMORY, MemoryState

log = logging.getLogger(__name__)

# Per-episode statistics: joined along the episode axis, not split over learner ranks.
_EPISODE_STATS = ("episode_returns", "episode_lengths", "episode_agent_returns")


@dataclass
class RolloutBatch:
    """``T`` steps of ``B`` sub-envs, time-major.

    Shapes:
        - obs: dict of ``[T, B, ...]`` tensors (``Observation.as_dict`` stacked over time).
        - actions: ``[T, B, N]`` (discrete) or ``[T, B, N, A]``.
        - logp, values, rewards, next_values: ``[T, B, N]``; values are raw (de-normalised).
        - terminated: ``[T, B, N]`` bool; truncated: ``[T, B]`` bool.
        - next_values: value of the state after step ``t``: the next observation's, or the
          final observation's when the episode ended there (terminations are zeroed by GAE).
        - episode_returns / episode_lengths: ``[K]`` team returns (sum over agents and steps)
          and lengths of the episodes that finished inside this batch.
        - episode_agent_returns: ``[K, N]`` each agent's own return in those episodes (agent
          groups report a return per group from it); ``None`` where not recorded.
        - imagined: the batch was rolled in a world model, not a real env.
    """

    obs: dict[str, Tensor]
    actions: Tensor
    logp: Tensor
    values: Tensor
    rewards: Tensor
    terminated: Tensor
    truncated: Tensor
    next_values: Tensor
    episode_returns: Tensor
    episode_lengths: Tensor
    weights_version: int = 0
    imagined: bool = False
    episode_agent_returns: Tensor | None = None

    @property
    def env_steps(self) -> int:
        """Sub-env steps in the batch, ``T * B``."""
        return int(self.rewards.shape[0] * self.rewards.shape[1])

    def to(self, device: torch.device | str) -> RolloutBatch:
        """Copy to ``device``."""
        kw: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.to(device)
            elif isinstance(v, dict):
                v = {k: t.to(device) for k, t in v.items()}
            kw[f.name] = v
        return RolloutBatch(**kw)

    def split_envs(self, parts: int) -> list[RolloutBatch]:
        """Split along the env axis (one shard per learner rank)."""
        b = self.rewards.shape[1]
        if b % parts:
            raise ValueError(f"{b} envs do not split evenly over {parts} learner ranks")
        size = b // parts
        shards = []
        for p in range(parts):
            s = slice(p * size, (p + 1) * size)
            kw: dict[str, Any] = {}
            for f in fields(self):
                v = getattr(self, f.name)
                if f.name in _EPISODE_STATS:
                    v = v if p == 0 or v is None else v[:0]  # statistics travel with shard 0
                elif isinstance(v, Tensor):
                    v = v[:, s]
                elif isinstance(v, dict):
                    v = {k: t[:, s] for k, t in v.items()}
                kw[f.name] = v
            shards.append(RolloutBatch(**kw))
        return shards

    @staticmethod
    def concat_envs(batches: list[RolloutBatch]) -> RolloutBatch:
        """Join batches from several workers along the env axis."""
        first = batches[0]
        kw: dict[str, Any] = {}
        for f in fields(first):
            vals = [getattr(b, f.name) for b in batches]
            if f.name in _EPISODE_STATS:
                kw[f.name] = None if any(v is None for v in vals) else torch.cat(vals)
            elif isinstance(vals[0], Tensor):
                kw[f.name] = torch.cat(vals, dim=1)
            elif isinstance(vals[0], dict):
                kw[f.name] = {k: torch.cat([v[k] for v in vals], dim=1) for k in vals[0]}
            else:
                kw[f.name] = min(vals)  # the oldest weights version is the honest one
        return RolloutBatch(**kw)


class StepLog:
    """A rollout's per-step tensors, stacked time-major into a :class:`RolloutBatch` at the end.

    The real rollout (:meth:`RolloutWorker.collect`) and the imagined one
    (``agents.imagination.imagine``) both log here, so they build batches the same way.
    """

    def __init__(self) -> None:
        self.obs: list[dict[str, Tensor]] = []
        self.cols: dict[str, list[Tensor]] = {
            k: [] for k in ("actions", "logp", "values", "rewards", "terminated", "truncated")
        }
        self.next_values: list[Tensor] = []

    def add(
        self,
        obs: dict[str, Tensor],
        actions: Tensor,
        logp: Tensor,
        values: Tensor,
        rewards: Tensor,
        terminated: Tensor,
        truncated: Tensor,
    ) -> None:
        """One step: what was seen (only the keys the learner reads), done and got."""
        self.obs.append(obs)
        for key, value in zip(
            self.cols, (actions, logp, values, rewards, terminated, truncated), strict=True
        ):
            self.cols[key].append(value)

    def bootstrap(self, next_values: Tensor) -> None:
        """The value of the state after the last logged step."""
        self.next_values.append(next_values)

    def batch(
        self,
        episode_returns: Tensor,
        episode_lengths: Tensor,
        weights_version: int,
        imagined: bool = False,
        episode_agent_returns: Tensor | None = None,
    ) -> RolloutBatch:
        """The logged steps as one ``[T, B, ...]`` batch."""
        return RolloutBatch(
            episode_agent_returns=episode_agent_returns,
            obs={k: torch.stack([o[k] for o in self.obs]) for k in self.obs[0]},
            **{k: torch.stack(v) for k, v in self.cols.items()},
            next_values=torch.stack(self.next_values),
            episode_returns=episode_returns,
            episode_lengths=episode_lengths,
            weights_version=weights_version,
            imagined=imagined,
        )


class RolloutWorker:
    """Owns one ``VecMultiAgentEnv`` and a copy of the policy; produces ``RolloutBatch``es.

    Args:
        env: the vectorised env (its ``num_envs`` is the batch width ``B``).
        model: the policy used to act (weights are replaced by ``set_weights``).
        rollout_len: ``T``, steps per batch.
        seed: seeds the env and the sampling generator.
        extra_keys: observation fields to keep in batches besides those the policy reads
            (a world model learns from the entity graph whatever the policy sees).
    """

    def __init__(
        self,
        env: VecMultiAgentEnv,
        model: Policy,
        rollout_len: int,
        seed: int = 0,
        extra_keys: frozenset[str] = frozenset(),
    ) -> None:
        self.env = env
        self.keys = model.input_keys | extra_keys
        env.restrict_observation(self.keys)
        self.model = model.to(env.device)
        self.model.eval()
        self.rollout_len = rollout_len
        self.weights_version = 0
        torch.manual_seed(seed)
        self._obs: Observation = env.reset(seed=seed)
        b = env.num_envs
        self._ep_return = torch.zeros(b, env.n_agents, device=env.device)  # per agent
        self._ep_len = torch.zeros(b, dtype=torch.long, device=env.device)
        self.total_env_steps = 0
        # What each agent remembers, carried across batches (a restarted worker starts
        # from zeros); every step's entering state is stored with the batch.
        self.memory = MemoryState(model.memory_size)

    def set_weights(self, state_dict: dict[str, Tensor], version: int) -> None:
        """Act with new weights from now on."""
        self.model.load_state_dict(state_dict)
        self.weights_version = version

    @torch.no_grad()
    def collect(self) -> RolloutBatch:
        """Step ``T`` times and return the batch (on the env's device)."""
        env, model, t_len = self.env, self.model, self.rollout_len
        log = StepLog()
        ep_returns: list[Tensor] = []
        ep_lengths: list[Tensor] = []
        keys = self.keys
        obs = self._obs
        memory = self.memory
        batch = model.prepare(memory.feed(obs.as_dict()))
        action, logp, value, state = model.act(batch)
        for _ in range(t_len):
            res = env.step(action)
            # Keep only what the learner's forward reads: less to stack, ship and index.
            seen = {k: v for k, v in batch.items() if k in keys}
            log.add(seen, action, logp, value, res.reward, res.terminated, res.truncated)
            done = res.done
            obs = res.observation
            entering = state  # what each agent carries into the next observation
            memory.advance(state, done, obs.alive)
            batch = model.prepare(memory.feed(obs.as_dict()))
            action, logp, value, state = model.act(batch)
            next_value = value
            if bool(done.any()):
                # Bootstrap finished episodes from what they saw last, not the reset state.
                # A critic with memory reads the state it had reached there, before resets.
                final = res.final.as_dict()
                if entering is not None:
                    final[MEMORY] = entering
                final_value = model.raw_value(final)
                next_value = torch.where(done.unsqueeze(-1), final_value, value)
            log.bootstrap(next_value)
            alive = seen["alive"]
            self._ep_return += res.reward * alive
            self._ep_len += 1
            if bool(done.any()):
                ep_returns.append(self._ep_return[done].clone())
                ep_lengths.append(self._ep_len[done].clone())
                self._ep_return[done] = 0.0
                self._ep_len[done] = 0
        self._obs = obs
        self.total_env_steps += t_len * env.num_envs
        empty = torch.zeros(0, device=env.device)
        per_agent = torch.cat(ep_returns) if ep_returns else empty.view(0, env.n_agents)
        return log.batch(
            per_agent.sum(-1),
            torch.cat(ep_lengths) if ep_lengths else empty.long(),
            self.weights_version,
            episode_agent_returns=per_agent,
        )


class LocalRollouts:
    """Envs stepped inside the rank with the learner's own model (``rollout.num_workers=0``)."""

    def __init__(self, worker: RolloutWorker) -> None:
        self.worker = worker

    def next_batch(
        self, version: int, idle: Callable[[], None]
    ) -> tuple[RolloutBatch, dict[str, float]]:
        """The next batch, acted with the current weights ``version``."""
        self.worker.weights_version = version
        t0 = time.perf_counter()
        batch = self.worker.collect()
        return batch, {
            "rollout_restarts": 0.0,
            "batches_recollected": 0.0,
            "collect_s": time.perf_counter() - t0,
            "weights_fetch_s": 0.0,  # acts with the learner's own model
        }


def episode_returns(
    model: Policy, env: VecMultiAgentEnv, episodes: int, seed: int, greedy: bool = False
) -> list[float]:
    """Team returns (summed over agents and steps) of ``episodes`` whole episodes.

    The sums of :func:`agent_returns`' rows; see there for how episodes are drawn.
    """
    return agent_returns(model, env, episodes, seed, greedy).sum(-1).tolist()


@contextlib.contextmanager
def apart(model: Policy, device: torch.device, seed: int) -> Iterator[None]:
    """Act off the training's random stream, and every group with its current weights.

    Inside, the RNG is a fork seeded with ``seed`` and the policy acts as evaluation should
    (``Policy.evaluating``: self-play's past versions are not used, value-decomposition
    policies act greedily).
    """
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), model.evaluating():
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def agent_returns(
    model: Policy, env: VecMultiAgentEnv, episodes: int, seed: int, greedy: bool = False
) -> Tensor:
    """Each agent's return (summed over steps) in ``episodes`` whole episodes, ``[episodes, N]``.

    Every sub-env of ``env`` plays from a reset seeded with ``seed``; only the first episodes
    of each sub-env count until there are enough, so that short episodes never bias the
    sample. Action sampling draws from a forked RNG: evaluating in the middle of training
    leaves the training's random stream as it was, and the same ``seed`` gives the same
    episodes for the same weights. Every group acts with its current weights (never a
    self-play past version).
    """
    width = env.num_envs
    rows: list[Tensor] = []
    with apart(model, env.device, seed):
        obs = env.reset(seed=seed)
        running = torch.zeros(width, env.n_agents, device=env.device)
        counted = torch.zeros(width, dtype=torch.long)
        quota = torch.full((width,), episodes // width)
        quota[: episodes % width] += 1
        memory = MemoryState(model.memory_size)
        while len(rows) < episodes:
            dist, state = model.step(model.prepare(memory.feed(obs.as_dict())))
            res = env.step(dist.mode() if greedy else dist.sample())
            memory.advance(state, res.done, res.observation.alive)
            running += res.reward.float() * obs.alive
            for i in res.done.nonzero().flatten().tolist():
                if counted[i] < quota[i]:
                    rows.append(running[i].cpu().clone())
                    counted[i] += 1
                running[i] = 0.0
            obs = res.observation
    return torch.stack(rows)
