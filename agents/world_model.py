"""Learning a world model from real transitions, and practising inside it.

:class:`TransitionBuffer` keeps the last real transitions of the run (entity graphs, actions,
rewards); :class:`WorldModelTrainer` fits an :class:`~policies.world_model.EntityWorldModel`
to them; :class:`Practice` decides when the policy practises in it, through
``agents.imagination`` (branches from real states, as ``RolloutBatch``es).

Branched rollouts (MBPO, Janner et al., 2019) rather than Dreamer's latent imagination: the
policies here act on observations, spread's dynamics are low-dimensional and smooth, and short
branches from real states keep model error from compounding, so the policy, critic and PPO
stay exactly the model-free ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.fitting import Fitting, InlineFit
from agents.imagination import ENTITY, Kept, World, imagine, open_loop_error
from agents.ppo import OptimizerState
from agents.rollout import RolloutBatch
from policies.actor_critic import Policy
from policies.memory import MEMORY
from policies.observation_model import ObservationWorldModel
from policies.world_model import EntityWorldModel


def transitions(
    obs: dict[str, Tensor],
    actions: Tensor,
    rewards: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    kept: Kept = ENTITY,
) -> dict[str, Tensor]:
    """The transitions in ``T`` time-major steps of ``B`` worlds (a batch, or a stream chunk).

    A transition is one world's step: ``kept.keys``, ``alive``, ``actions``, ``rewards``,
    ``cont`` (1 unless the world terminated), ``next_<key>`` of ``kept.next_keys`` and, with
    ``kept.agent_cont``, ``agent_cont [N]`` (1 unless that agent terminated) and, where the
    batch holds them, the policy's recurrent states (``memory``). Steps cut by a
    time limit are left out (a truncation says nothing about the dynamics), and so is the
    last step, whose next state the batch does not hold.

    Args:
        obs: ``kept.keys`` and ``alive`` as ``[T, B, ...]``.
        actions: ``[T, B, N(, A)]``.
        rewards: ``[T, B, N]``.
        terminated: ``[T, B, N]``.
        truncated: ``[T, B]``.
        kept: what the world model is made of (default: entity graphs).
    """
    missing = [k for k in kept.keys if k not in obs]
    if missing:
        raise ValueError(f"a world model needs {missing} in the batch's observations")
    t_len = rewards.shape[0]
    ended = terminated.all(-1)  # [T, B]
    keep = ~(truncated | ended)
    keep[-1] = False  # no next state in this batch
    keep = keep | ended  # a termination teaches the continuation head
    t_idx, b_idx = keep.nonzero(as_tuple=True)
    nxt = (t_idx + 1).clamp(max=t_len - 1)
    rows = {k: obs[k][t_idx, b_idx] for k in kept.keys}
    rows.update(
        alive=obs["alive"][t_idx, b_idx],
        actions=actions[t_idx, b_idx],
        rewards=rewards[t_idx, b_idx],
        cont=(~ended[t_idx, b_idx]).float(),
    )
    for k in kept.next_keys:
        rows[f"next_{k}"] = obs[k][nxt, b_idx]
    if kept.agent_cont:
        rows["agent_cont"] = (~terminated[t_idx, b_idx]).float()
    if MEMORY in obs:  # a policy with memory: imagination starts from the state it carried
        rows[MEMORY] = obs[MEMORY][t_idx, b_idx]
    return rows


def batch_transitions(batch: RolloutBatch, kept: Kept = ENTITY) -> dict[str, Tensor]:
    """:func:`transitions` of a rollout batch."""
    return transitions(
        batch.obs, batch.actions, batch.rewards, batch.terminated, batch.truncated, kept
    )


class TransitionBuffer:
    """The last ``capacity`` real transitions (see :func:`transitions`), on ``device``."""

    def __init__(
        self, capacity: int, device: str | torch.device = "cpu", kept: Kept = ENTITY
    ) -> None:
        self.capacity, self.device, self.kept = capacity, torch.device(device), kept
        self.data: dict[str, Tensor] = {}
        self.size = self.next = 0

    def __len__(self) -> int:
        return self.size

    def add(self, batch: RolloutBatch) -> int:
        """Append a batch's transitions; returns how many it held."""
        return self.append(batch_transitions(batch, self.kept))

    def add_steps(
        self,
        obs: dict[str, Tensor],
        actions: Tensor,
        rewards: Tensor,
        terminated: Tensor,
        truncated: Tensor,
    ) -> int:
        """Append ``T`` time-major steps of ``B`` worlds (see :func:`transitions`)."""
        return self.append(transitions(obs, actions, rewards, terminated, truncated, self.kept))

    def append(self, rows: dict[str, Tensor]) -> int:
        """Append transitions as :func:`transitions` lays them out; returns how many."""
        n = int(rows["actions"].shape[0])
        for k, v in rows.items():  # a field first seen now is zero for the rows before it
            if k not in self.data:
                self.data[k] = torch.zeros(
                    (self.capacity, *v.shape[1:]), dtype=v.dtype, device=self.device
                )
        for start in range(0, n, self.capacity):  # a batch larger than the buffer wraps
            chunk = {k: v[start : start + self.capacity].to(self.device) for k, v in rows.items()}
            m = chunk["actions"].shape[0]
            idx = (torch.arange(m, device=self.device) + self.next) % self.capacity
            for k, v in chunk.items():
                self.data[k][idx] = v
            self.next = (self.next + m) % self.capacity
            self.size = min(self.size + m, self.capacity)
        return n

    def newest(self, n: int) -> dict[str, Tensor]:
        """The newest ``n`` transitions, oldest first (what a checkpoint keeps of the replay)."""
        n = min(n, self.size)
        idx = (torch.arange(-n, 0, device=self.device) + self.next) % self.capacity
        return {k: v[idx].cpu() for k, v in self.data.items()}

    def restore(self, rows: dict[str, Tensor]) -> None:
        """Append what :meth:`newest` returned (a resumed run's replay)."""
        if rows and rows["actions"].shape[0]:
            self.append(rows)

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """``n`` transitions drawn uniformly with replacement."""
        idx = torch.randint(self.size, (n,), generator=generator, device=self.device)
        return {k: v[idx] for k, v in self.data.items()}


class ModelTrainer(OptimizerState):
    """Fits an ensemble to the buffer: each member on its own bootstrap sample.

    Subclasses say what the loss is (:meth:`loss`) and how the targets' scales are tracked.

    Args:
        model: the ensemble.
        lr: Adam learning rate.
        batch_size: transitions per member per update.
        scale_beta: EMA decay of the target scales (deltas per feature, rewards).
    """

    model: EntityWorldModel | ObservationWorldModel

    def __init__(
        self,
        model: EntityWorldModel | ObservationWorldModel,
        lr: float = 1e-3,
        batch_size: int = 1024,
        scale_beta: float = 0.99,
    ) -> None:
        self.model = model
        self.members = model.members
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        self.batch_size, self.scale_beta = batch_size, scale_beta
        self.updates = 0
        self.all_reduce_mean: Callable[[Tensor], Tensor] | None = None
        """Set on ``K`` learner ranks that each fit the model on their own shard: every
        step's gradients and target scales are averaged over the ranks, so their replicas
        stay equal and move as one model fitted on all shards would."""

    def _update_scales(self, sample: dict[str, Tensor]) -> None:
        raise NotImplementedError

    def loss(self, samples: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """The ensemble's loss, member ``k`` on ``samples[k]``, and per-term diagnostics.

        ``delta_mse`` and ``reward_mse`` are in units of the targets' scale: 1.0 is what
        predicting "no change" and "mean reward" would roughly score.
        """
        raise NotImplementedError

    def update(
        self, buffer: TransitionBuffer, steps: int, generator: torch.Generator | None = None
    ) -> dict[str, float]:
        """``steps`` gradient steps; returns the mean of the loss terms over them."""
        out: dict[str, float] = {}
        k = self.members
        for _ in range(steps):
            stats = self.step([buffer.sample(self.batch_size, generator) for _ in range(k)])
            for key, value in stats.items():
                out[key] = out.get(key, 0.0) + value / steps
        return out

    def step(self, samples: list[dict[str, Tensor]]) -> dict[str, float]:
        """One gradient step, member ``k`` on ``samples[k]``; returns the loss terms."""
        self._update_scales(samples[0])
        if self.all_reduce_mean is not None:
            self._average_scales()
        loss, stats = self.loss(samples)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.all_reduce_mean is not None:
            self._average_grads()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.optimizer.step()
        self.updates += 1
        return stats

    @torch.no_grad()
    def _average_scales(self) -> None:
        """The ranks' mean of every target scale (an EMA, so the mean of the ranks' EMAs)."""
        assert self.all_reduce_mean is not None
        scales = [b for name, b in self.model.named_buffers() if name.endswith("_scale")]
        flat = self.all_reduce_mean(torch.cat([b.flatten() for b in scales]))
        for b, part in zip(scales, flat.split([b.numel() for b in scales]), strict=True):
            b.copy_(part.view_as(b))

    @torch.no_grad()
    def _average_grads(self) -> None:
        """The ranks' mean gradient, in one all-reduce (a parameter a loss skips counts 0)."""
        assert self.all_reduce_mean is not None
        params = list(self.model.parameters())
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = self.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
        for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(part.view_as(g))


class WorldModelTrainer(ModelTrainer):
    """Fits an :class:`EntityWorldModel` (see :class:`ModelTrainer`)."""

    model: EntityWorldModel

    @torch.no_grad()
    def _update_scales(self, sample: dict[str, Tensor]) -> None:
        """Track the targets' spread, so every target is learned in comparable units."""
        m = self.model
        mask = sample["node_mask"].unsqueeze(-1) & (sample["cont"] > 0).view(-1, 1, 1)
        delta = (sample["next_nodes"] - sample["nodes"])[mask.expand_as(sample["nodes"])]
        delta = delta.view(-1, m.node_dim)
        d_std = delta.std(0).clamp(min=1e-3) if delta.shape[0] > 1 else m.delta_scale
        r_std = sample["rewards"][sample["alive"]].std().clamp(min=1e-3)
        b = 0.0 if self.updates == 0 else self.scale_beta
        m.delta_scale.mul_(b).add_((1 - b) * d_std)
        m.reward_scale.mul_(b).add_((1 - b) * r_std)

    def loss(self, samples: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """See :meth:`ModelTrainer.loss`."""
        m = self.model
        s = {key: torch.stack([x[key] for x in samples]) for key in samples[0]}  # [K, B, ...]
        k, b = s["nodes"].shape[:2]
        tokens = m.tokens(
            s["nodes"].flatten(0, 1), s["actions"].flatten(0, 1), s["alive"].flatten(0, 1)
        ).view(k, b, *s["nodes"].shape[2:-1], -1)
        delta, reward, cont = m.run_members(tokens, s["node_mask"], s["alive"])
        target = (s["next_nodes"] - s["nodes"]) / m.delta_scale
        mask = (s["node_mask"] & (s["cont"] > 0).unsqueeze(-1)).unsqueeze(-1).float()
        d_loss = ((delta - target).square() * mask).sum() / (mask.sum() * m.node_dim).clamp(1)
        alive = s["alive"].float()
        r_err = (reward - s["rewards"] / m.reward_scale).square()
        r_loss = (r_err * alive).sum() / alive.sum().clamp(min=1)
        c_loss = F.binary_cross_entropy_with_logits(cont, s["cont"])
        # Each term is the members' mean; the sum over members keeps every member's gradient
        # the size it would have alone.
        total = k * (d_loss + r_loss + 0.1 * c_loss)
        stats = {
            "delta_mse": float(d_loss.detach()),
            "reward_mse": float(r_loss.detach()),
            "cont_bce": float(c_loss.detach()),
        }
        return total, stats


def trainer_for(
    model: EntityWorldModel | ObservationWorldModel, lr: float, batch_size: int
) -> ModelTrainer:
    """What fits ``model``: the trainer of its kind."""
    if isinstance(model, ObservationWorldModel):
        from agents.observation_trainer import ObservationTrainer

        return ObservationTrainer(model, lr=lr, batch_size=batch_size)
    return WorldModelTrainer(model, lr=lr, batch_size=batch_size)


def describe(model: EntityWorldModel | ObservationWorldModel) -> dict[str, Any]:
    """What :func:`rebuild` needs: the model's kind and constructor arguments (JSON-able)."""
    kind = "observation" if isinstance(model, ObservationWorldModel) else "entity"
    return {"kind": kind, "config": model.config()}


def rebuild(description: dict[str, Any]) -> EntityWorldModel | ObservationWorldModel:
    """A fresh model of what :func:`describe` said (another process builds its own copy)."""
    cls = ObservationWorldModel if description["kind"] == "observation" else EntityWorldModel
    return cls.from_config(description["config"])


def branches(ratio: float, horizon: int, real_samples: int) -> int:
    """Branches per imagined round, so all rounds give ``ratio`` imagined samples per real one."""
    if ratio <= 0:
        return 0
    return max(1, round(ratio * real_samples / (horizon * math.ceil(ratio))))


class Practice:
    """What a learner does with a world model every iteration: remember, fit, imagine.

    Args:
        model: the world model (trained here unless ``dynamics`` is the true env).
        trainer: fits ``model``.
        buffer: the real transitions.
        world: what imagination steps (the learned model, or the oracle's true env) and how
            agents see it.
        horizon: imagined steps per branch.
        ratio: imagined samples per real sample.
        warmup_steps: real env steps before imagination starts.
        updates_per_iter: model gradient steps per real batch.
        max_disagreement: see :func:`imagine`.
        generator: draws replay samples and start states.
        max_error: imagine only while the model's 1-step feature-delta and reward errors on
            the newest real batch, before it trains on it, are at most this (in units of
            their scale: 1 is "the mean delta", "the mean reward"), and its open-loop error at
            ``horizon`` steps is below that of "repeat" (nothing changes); ``None``: always.
        fitting: where the model is fitted (default: here, after every batch); on Ray the
            rank switches to the actor's weights with :meth:`fit_elsewhere`.
    """

    def __init__(
        self,
        model: EntityWorldModel | ObservationWorldModel,
        trainer: ModelTrainer,
        buffer: TransitionBuffer,
        world: World,
        horizon: int,
        ratio: float,
        warmup_steps: int,
        updates_per_iter: int,
        max_disagreement: float | None = None,
        generator: torch.Generator | None = None,
        max_error: float | None = None,
        fitting: Fitting | None = None,
    ) -> None:
        self.model, self.trainer, self.buffer = model, trainer, buffer
        self.max_error = max_error
        self.holdout: dict[str, float] = {}
        self.cpu_generator = torch.Generator().manual_seed(0)
        self.world = world
        self.horizon, self.ratio, self.warmup_steps = horizon, ratio, warmup_steps
        self.updates_per_iter, self.max_disagreement = updates_per_iter, max_disagreement
        self.generator = generator
        self.fitting: Fitting = fitting if fitting is not None else InlineFit(trainer)

    def fit_elsewhere(self, fitting: Fitting) -> None:
        """From now on the model is fitted elsewhere (the Ray actor): imagine with its weights."""
        self.fitting.close()
        self.fitting = fitting

    HOLDOUT = 2048
    """Transitions of each new batch the model is scored on before it trains on them."""

    @torch.no_grad()
    def score(self, batch: RolloutBatch, rows: dict[str, Tensor]) -> dict[str, float]:
        """The model's error on a new batch it has never trained on; ``rows``: its transitions.

        1-step errors are in units of the targets' scale (1: no better than "no change" /
        "mean reward"); they gate imagination when ``max_error`` is set.
        """
        n = int(rows["actions"].shape[0])
        if n == 0:
            return {}
        pick = torch.randperm(n, generator=self.cpu_generator)[: self.HOLDOUT]
        rows = {k: v[pick.to(v.device)].to(self.buffer.device) for k, v in rows.items()}
        _, stats = self.trainer.loss([rows] * self.model.members)
        ks = sorted({1, 5, self.horizon})
        k_errors, k_repeat = open_loop_error(self.world, batch, ks, self.HOLDOUT // 8)
        if k_errors:  # the longest horizon the batch holds, against "repeat" there
            k = max(k_errors)
            stats = {**stats, "horizon_ratio": k_errors[k] / max(k_repeat[k], 1e-8)}
        self.holdout = stats
        return {
            "wm_holdout_delta_mse": stats["delta_mse"],
            "wm_holdout_reward_mse": stats["reward_mse"],
            **{f"wm_holdout_{k}step_error": v for k, v in k_errors.items()},
            **{f"wm_holdout_{k}step_repeat": v for k, v in k_repeat.items()},
            **({"wm_holdout_horizon_ratio": stats["horizon_ratio"]} if k_errors else {}),
        }

    @property
    def scored(self) -> bool:
        """A learned model is scored on every new batch; the true env needs no score."""
        return self.world.learned

    def trusted(self) -> bool:
        """Whether the model's held-out error allows imagining (always, for the true env)."""
        if not self.scored or self.max_error is None:
            return True
        h = self.holdout
        if not h:
            return False
        # Never a model that loses to "repeat" where imagination ends, whatever max_error.
        return max(h["delta_mse"], h["reward_mse"]) <= self.max_error and (
            h.get("horizon_ratio", 0.0) <= 1.0
        )

    def remember_and_fit(self, batch: RolloutBatch) -> dict[str, float]:
        """Score the model on a new real batch, add it to the replay, train on the replay.

        Where the fit runs behind, the training is the fit started here last iteration,
        waited for here; this batch starts the next one.
        """
        out: dict[str, float] = {}
        fitting = self.fitting
        fitted = fitting.collect()
        rows = batch_transitions(batch, self.buffer.kept)
        if self.scored and len(self.buffer) and fitting.ready():
            out = self.score(batch, rows)
        self.buffer.append(rows)
        if not fitting.learns or self.updates_per_iter == 0:
            return out
        # The model learns nothing from the policy's memory: it stays with this rank.
        fit_rows = {k: v for k, v in rows.items() if k != MEMORY}
        now = fitting.fit(self.buffer, fit_rows, self.updates_per_iter, self.generator)
        return {**out, **{f"wm_{k}": v for k, v in (now or fitted or {}).items()}}

    def close(self) -> None:
        """Stop whatever fits elsewhere."""
        self.fitting.close()

    def rounds(self) -> int:
        """Imagined PPO updates per real one: ``ceil(ratio)``, each at most a real batch.

        More imagined samples go into more updates, not bigger ones: PPO takes the same
        number of gradient steps per batch whatever its size, so a bigger batch would add
        data but no learning. Each round is rolled by the policy the previous one updated.
        """
        return math.ceil(self.ratio) if self.ratio > 0 else 0

    def branches(self, real_samples: int) -> int:
        """Branches per round, so all rounds give ``ratio`` imagined samples per real one."""
        return branches(self.ratio, self.horizon, real_samples)

    def can_imagine(self, real_samples: int, env_steps: int) -> bool:
        """Whether this iteration may imagine: warm-up over, weights there, error allowing it.

        Asked once per iteration (on ``K`` ranks every rank must agree before any imagines),
        so every round of an iteration imagines with the same model weights.
        """
        if env_steps < self.warmup_steps or self.branches(real_samples) == 0:
            return False
        if len(self.buffer) == 0 or not self.fitting.ready():
            return False
        return self.trusted()

    def imagine(self, policy: Policy, real_samples: int, version: int) -> RolloutBatch:
        """One round's imagined batch (ask :meth:`can_imagine` first)."""
        starts = self.buffer.sample(self.branches(real_samples), self.generator)
        return imagine(
            policy,
            self.world,
            starts,
            self.horizon,
            self.max_disagreement,
            version,
        )
