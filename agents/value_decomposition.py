"""QMIX and VDN: value decomposition learnt off-policy from a replay of acted transitions.

The learner keeps the batches its rank is handed whole (``[T, B, ...]``) in a bounded ring;
a transition is step ``t`` of env ``b`` with step ``t + 1`` of the same batch as its next
observation. Transitions whose next observation the batch does not hold are not replayed:
the batch's last step, and a step whose episode a time limit cut (its final observation is
not stored). None is treated as terminal: a time limit is not an end (only ``terminated`` for
every agent stops the bootstrap), and an agent that died adds nothing to ``Q_tot``.

Each gradient step draws ``train.replay_batch`` transitions over all ranks from one generator
that every rank seeds alike; a rank learns from the draws that fall on its own envs and
normalises by the draws of all ranks, so ``K`` ranks (gradients averaged through the
``DistributedDataParallel`` wrapper) take exactly the step one rank takes on the union of
their envs. Targets are double-Q (the online utilities choose the next actions, a Polyak-
averaged target network values them), over legal actions only, in units of the team reward
standardised by its running moments over every rank's steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from agents.ppo import OptimizerState
from agents.rollout import RolloutBatch
from policies.q import TAKEN, QPolicy


class QConfig(BaseModel):
    """Off-policy value-decomposition settings (``train.algorithm=qmix`` or ``vdn``).

    The run config's ``train`` section carries them beside PPO's.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    replay_size: int = Field(200_000, ge=1)
    """Transitions the replay keeps over all ranks (the oldest batches go first)."""
    replay_batch: int = Field(2048, ge=1)
    """Transitions per gradient step, over all ranks."""
    updates_per_batch: int = Field(4, ge=1)
    """Gradient steps per collected batch."""
    learning_starts: int = Field(10_000, ge=0)
    """Env steps collected before the first gradient step."""
    target_tau: float = Field(0.01, gt=0, le=1)
    """Polyak step of the target network towards the online one, per gradient step."""
    target_every: int | None = Field(None, ge=1)
    """Copy the online network into the target every this many gradient steps instead
    (PyMARL's hard target updates); ``None``: Polyak steps of ``target_tau``."""
    epsilon_start: float = Field(1.0, ge=0, le=1)
    epsilon_end: float = Field(0.05, ge=0, le=1)
    epsilon_steps: int = Field(500_000, ge=1)
    """Env steps over which ε-greedy exploration falls linearly from start to end."""
    double_q: bool = True
    """The online utilities choose the next actions and the target network values them."""
    mixer_embed: int = Field(32, ge=1)
    """QMIX's mixing width (``qmix`` only)."""
    mixer_init_scale: float = Field(0.1, gt=0, le=10)
    """The factor on QMIX's initial mixer weights (``qmix`` only): small, so a fresh ``Q_tot``
    is near zero whatever the scale of the state's features."""
    standardise_rewards: bool = True
    """Learn from team rewards standardised by their running mean and deviation over every
    collected step (EPyMARL's ``standardise_rewards``): sparse rewards such as LBF's (a few
    hundredths) otherwise give targets too small for the mixer's gradients to move."""


def epsilon_at(cfg: QConfig, env_steps: int) -> float:
    """The exploration rate after ``env_steps`` env steps."""
    frac = min(env_steps / cfg.epsilon_steps, 1.0)
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


@torch.no_grad()
def td_targets(
    target: QPolicy,
    online: QPolicy | None,
    nxt: dict[str, Tensor],
    reward: Tensor,
    ended: Tensor,
    gamma: float,
) -> Tensor:
    """``y = r + γ (1 - ended) Q_tot⁻(s', a*)`` for ``[n]`` transitions.

    ``a*`` is each agent's best legal action by ``online``'s utilities (double Q) or, with
    ``online=None``, by the target network's own; the target network values it and mixes with
    its own mixer at the next state. Agents dead at ``s'`` add nothing.
    """
    q_next = target.utilities(nxt)
    chooser = online.utilities(nxt) if online is not None else q_next
    best = q_next.gather(-1, chooser.argmax(-1, keepdim=True)).squeeze(-1)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    return reward + gamma * (~ended).to(reward.dtype) * target.mix(best, nxt)


class Replay:
    """Whole batches in a ring of ``capacity`` slots, on the learner's device.

    Stores per step the observation fields the policy reads, the actions, the team reward
    (every live agent's reward summed), whether the episode ended for real (every agent
    terminated) and whether the step is a replayable transition.
    """

    def __init__(self, capacity_steps: int, keys: frozenset[str]) -> None:
        self.capacity_steps = capacity_steps
        self.keys = keys
        self.slots = 0
        self.filled = 0
        self.next = 0
        self.data: dict[str, Tensor] = {}

    def add(self, batch: RolloutBatch) -> None:
        """Keep ``batch`` (overwriting the oldest when full)."""
        alive = batch.obs["alive"].to(batch.rewards.dtype)
        ended = batch.terminated.all(-1)
        cut = batch.truncated & ~ended
        valid = ~cut
        valid[-1] = False
        row = {
            **{f"obs.{k}": v for k, v in batch.obs.items() if k in self.keys},
            "actions": batch.actions,
            "reward": (batch.rewards * alive).sum(-1),
            "ended": ended,
            "valid": valid,
        }
        if not self.data:
            self.slots = max(1, self.capacity_steps // batch.env_steps)
            self.data = {
                k: torch.zeros((self.slots, *v.shape), dtype=v.dtype, device=v.device)
                for k, v in row.items()
            }
        for k, v in row.items():
            self.data[k][self.next] = v
        self.next = (self.next + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def state_dict(self) -> dict[str, Any]:
        """The held batches (only the filled slots) and the ring's position."""
        held = {k: v[: self.filled].clone() for k, v in self.data.items()}
        return {"slots": self.slots, "filled": self.filled, "next": self.next, "data": held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hold again what :meth:`state_dict` returned."""
        self.slots, self.filled, self.next = state["slots"], state["filled"], state["next"]
        self.data = {}
        for k, v in state["data"].items():
            self.data[k] = torch.zeros((self.slots, *v.shape[1:]), dtype=v.dtype, device=v.device)
            self.data[k][: self.filled] = v

    @property
    def transitions(self) -> int:
        """Replayable transitions held."""
        return int(self.data["valid"][: self.filled].sum()) if self.data else 0

    def take(self, k: Tensor, t: Tensor, b: Tensor) -> tuple[dict[str, Tensor], ...]:
        """Transitions ``(k, t, b)`` as ``(now, next, rest)``.

        ``now``/``next`` are the observations at ``t``/``t + 1``, ``rest`` the actions,
        reward, end and validity.
        """
        now, nxt, rest = {}, {}, {}
        for key, v in self.data.items():
            if key.startswith("obs."):
                now[key[4:]] = v[k, t, b]
                nxt[key[4:]] = v[k, t + 1, b]
            else:
                rest[key] = v[k, t, b]
        return now, nxt, rest


class ValueDecomposition(OptimizerState):
    """QMIX / VDN learner for one rank (an ``agents.algorithm.Algorithm``).

    Args:
        model: the :class:`policies.q.QPolicy` the rank acts and learns with.
        cfg: the ``train`` section (:class:`QConfig` and ``lr``, ``gamma``,
            ``max_grad_norm``, ``seed``).
        train_model: the module to call in training (the DDP wrapper on K ranks).
        all_reduce_mean: averages a tensor over ranks (``None`` on one).
    """

    def __init__(
        self,
        model: QPolicy,
        cfg: Any,
        train_model: nn.Module | None = None,
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.train_model = train_model if train_model is not None else model
        self.all_reduce_mean = all_reduce_mean
        grouped = all_reduce_mean is not None and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if grouped else 1
        self.rank = dist.get_rank() if grouped else 0
        self.target = copy.deepcopy(model).requires_grad_(False)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
        self.replay = Replay(max(1, cfg.replay_size // self.world), model.input_keys)
        self.draws = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)) + 7919)
        # Team rewards seen over all ranks: count, sum, sum of squares.
        self.reward_moments = torch.zeros(3, dtype=torch.float64)
        self.env_steps = 0
        self.updates = 0
        self.gradient_steps = 0
        model.epsilon.fill_(epsilon_at(cfg, 0))

    def update(
        self, batch: RolloutBatch, lr_frac: float = 1.0, staleness: int = 0
    ) -> dict[str, float]:
        """Keep ``batch`` in the replay, then ``train.updates_per_batch`` gradient steps.

        ``staleness`` is ignored: replayed transitions are off-policy by construction.
        """
        cfg = self.cfg
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        self.replay.add(batch)
        self._count_rewards(batch)
        self.env_steps += batch.env_steps * self.world
        self.updates += 1
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_frac
        sums = {"q_loss": 0.0, "q_taken": 0.0, "q_target": 0.0, "grad_norm": 0.0}
        steps = cfg.updates_per_batch if self.env_steps >= cfg.learning_starts else 0
        for _ in range(steps):
            for key, value in self._step(batch.rewards.shape[1], device).items():
                sums[key] += value / steps
        eps = epsilon_at(cfg, self.env_steps)
        self.model.epsilon.fill_(eps)
        return {
            **sums,
            "epsilon": eps,
            "replay_transitions": float(self.replay.transitions * self.world),
            "gradient_steps": float(steps),
            "lr": cfg.lr * lr_frac,
        }

    def _count_rewards(self, batch: RolloutBatch) -> None:
        """Fold ``batch``'s team rewards (every rank's) into the running moments."""
        team = (batch.rewards * batch.obs["alive"].to(batch.rewards.dtype)).sum(-1).double()
        moments = torch.stack(
            [team.new_tensor(float(team.numel())), team.sum(), team.square().sum()]
        )
        if self.all_reduce_mean is not None:
            moments = self.all_reduce_mean(moments) * self.world
        self.reward_moments += moments.cpu()

    def _scaled(self, reward: Tensor) -> Tensor:
        """``reward`` standardised by the running moments (unchanged when switched off)."""
        count, total, squares = self.reward_moments.tolist()
        if not self.cfg.standardise_rewards or count == 0:
            return reward
        mean = total / count
        std = max(squares / count - mean * mean, 0.0) ** 0.5
        return (reward - mean) / max(std, 1e-6)

    def _draw(self, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share of one global draw of ``replay_batch`` transitions."""
        n, r = self.cfg.replay_batch, self.replay
        t_len = r.data["valid"].shape[1]
        k = torch.randint(r.filled, (n,), generator=self.draws)
        t = torch.randint(t_len - 1, (n,), generator=self.draws)
        b = torch.randint(width * self.world, (n,), generator=self.draws) - self.rank * width
        mine = (b >= 0) & (b < width)
        return k[mine].to(device), t[mine].to(device), b[mine].to(device)

    def _step(self, width: int, device: torch.device) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        now, nxt, rest = self.replay.take(*self._draw(width, device))
        valid = rest["valid"].to(rest["reward"].dtype)
        with torch.no_grad():
            online = model if cfg.double_q else None
            reward = self._scaled(rest["reward"])
            y = td_targets(self.target, online, nxt, reward, rest["ended"], cfg.gamma)
            count = valid.sum()
            total = self.all_reduce_mean(count) if self.all_reduce_mean else count
        _, q_tot = self.train_model({**now, TAKEN: rest["actions"]})
        loss = (valid * (q_tot - y) ** 2).sum() / total.clamp_min(1.0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.gradient_steps += 1
        with torch.no_grad():
            every = cfg.target_every
            tau = cfg.target_tau if every is None else float(self.gradient_steps % every == 0)
            if tau > 0:
                for p, q in zip(model.parameters(), self.target.parameters(), strict=True):
                    q.lerp_(p, tau)
            stats = torch.stack([
                loss.detach(), (valid * q_tot.detach()).sum() / total.clamp_min(1.0),
                (valid * y).sum() / total.clamp_min(1.0), norm.detach(),
            ])  # fmt: skip
            if self.all_reduce_mean is not None:  # each rank holds its share of the sums
                stats[:3] = self.all_reduce_mean(stats[:3])
        return dict(
            zip(("q_loss", "q_taken", "q_target", "grad_norm"), stats.tolist(), strict=True)
        )

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, target network, counters, the draw generator and, on one rank, the replay.

        With K ranks each holds its own shard's replay and only rank 0 writes checkpoints, so
        a resumed group refills its replays instead.
        """
        replay = {"replay": self.replay.state_dict()} if self.world == 1 else {}
        return {
            **super().state_dict(),
            **replay,
            "target": self.target.state_dict(),
            "env_steps": self.env_steps,
            "gradient_steps": self.gradient_steps,
            "draws": self.draws.get_state(),
            "reward_moments": self.reward_moments.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s (a checkpoint without a replay: it starts empty)."""
        if "replay" in state and self.world == 1:
            self.replay.load_state_dict(state["replay"])
        super().load_state_dict(state)
        self.target.load_state_dict(state["target"])
        self.env_steps = int(state["env_steps"])
        self.gradient_steps = int(state["gradient_steps"])
        self.draws.set_state(state["draws"])
        if "reward_moments" in state:
            self.reward_moments = state["reward_moments"].clone().double().cpu()
        self.model.epsilon.fill_(epsilon_at(self.cfg, self.env_steps))
