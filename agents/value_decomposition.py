"""QMIX and VDN: value decomposition learnt off-policy from a replay of acted transitions.

The replay, its transitions and the draws K ranks share are ``agents/replay.py``'s. The team's
episode ends only when every agent terminated (a time limit never does), and an agent that
died adds nothing to ``Q_tot``. Targets are double-Q (the online utilities choose the next
actions, a Polyak-averaged target network values them), over legal actions only, in units of
the team reward standardised by its running moments over every rank's steps; gradients are
averaged over ranks by the ``DistributedDataParallel`` wrapper.

With ``model.memory`` the utilities are recurrent and each gradient step learns from chunks of
``train.chunk_len`` replayed steps (default: a batch's whole length but its last step), online
and target networks both unrolled from the state acting stored at the chunk's first step
(``agents/replay.py``); the loss is the same mean over the chunks' replayable steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from agents.replay import ReplayLearner
from agents.rollout import RolloutBatch
from policies.memory import KEEP, MEMORY
from policies.q import TAKEN, GroupedQPolicy, MixingPolicy


class QConfig(BaseModel):
    """Replay settings and value decomposition's.

    The replay's are read by every replay learner (``qmix``, ``vdn``, ``masac``, ``isac``);
    exploration, mixing and reward standardisation by ``qmix`` and ``vdn``.

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
    burn_in: int = Field(0, ge=0)
    """With ``model.memory``: steps each replayed sequence first unrolls without loss or
    gradient, from the stored state, so the steps it learns from start from a state of the
    current weights (R2D2's burn-in). ``qmix``/``vdn``: they come before the
    ``train.chunk_len`` steps, in the same batch. ``ppo``: before every epoch whose weights
    differ from acting's, each chunk after the batch's first starts from the state the
    current weights reach over the ``burn_in`` steps before it (``train.refresh_memory``,
    which unrolls from the batch's start, takes precedence)."""
    standardise_rewards: bool = True
    """Learn from team rewards standardised by their running mean and deviation over every
    collected step (EPyMARL's ``standardise_rewards``): sparse rewards such as LBF's (a few
    hundredths) otherwise give targets too small for the mixer's gradients to move."""
    reward_center: bool = True
    """With ``standardise_rewards``: subtract the running mean before dividing by the
    deviation (EPyMARL's). Off: divide only. Subtracting a constant from every step's reward
    changes an episodic task's optimum — each step then costs the mean, so once the mean is
    high (a team that deals damage every step) ending an episode sooner, by losing it too,
    pays — while a division keeps every policy's order."""


def epsilon_at(cfg: QConfig, env_steps: int) -> float:
    """The exploration rate after ``env_steps`` env steps."""
    frac = min(env_steps / cfg.epsilon_steps, 1.0)
    return cfg.epsilon_start + frac * (cfg.epsilon_end - cfg.epsilon_start)


@torch.no_grad()
def td_targets(
    target: MixingPolicy,
    online: MixingPolicy | None,
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


def sequence_length(rollout_len: int, chunk_len: int | None, burn_in: int = 0) -> int:
    """Steps a replayed sequence learns from.

    ``chunk_len``, or what a batch leaves after ``burn_in`` steps and before its last step
    (whose next observation it does not hold).

    Raises:
        ValueError: a ``chunk_len`` and ``burn_in`` that leave no step after them in a batch.
    """
    length = rollout_len - 1 - burn_in if chunk_len is None else chunk_len
    if length < 1 or burn_in + length >= rollout_len:
        burn = f"train.burn_in ({burn_in}) + " if burn_in else ""
        raise ValueError(
            f"{burn}train.chunk_len ({chunk_len if chunk_len is not None else 'default'}) "
            f"must be below train.rollout_len ({rollout_len}) for a replay learner: a "
            "replayed sequence and the step after it lie in one batch"
        )
    return length


def split_chunks(
    obs: dict[str, Tensor], burn: int
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
    """A sequence batch cut after its first ``burn`` steps: ``(head, tail, keep)``.

    ``head`` keeps the stored first states; ``tail`` has none (its states are the head's
    last, times ``keep [b, N, 1]``: zero where the env reset or the agent died in between).
    """
    keep = obs[KEEP]
    steps, n = keep.shape[:2]
    head: dict[str, Tensor] = {KEEP: keep[:burn], MEMORY: obs[MEMORY]}
    tail: dict[str, Tensor] = {KEEP: torch.cat([torch.ones_like(keep[:1]), keep[burn + 1 :]])}
    for key, v in obs.items():
        if key not in (KEEP, MEMORY):
            rows = v.view(steps, n, *v.shape[1:])
            head[key], tail[key] = rows[:burn].flatten(0, 1), rows[burn:].flatten(0, 1)
    return head, tail, keep[burn].unsqueeze(-1).to(obs[MEMORY].dtype)


class ValueDecomposition(ReplayLearner):
    """QMIX / VDN learner for one rank (an ``agents.algorithm.Algorithm``).

    Args:
        model: the :class:`policies.q.MixingPolicy` the rank acts and learns with (shared
            utilities, or a network per agent group at the group's own rate).
        cfg: the ``train`` section (:class:`QConfig` and ``lr``, ``gamma``,
            ``max_grad_norm``, ``seed``).
        train_model: the module to call in training (the DDP wrapper on K ranks).
        all_reduce_mean: averages a tensor over ranks (``None`` on one).
    """

    step_stats = ("q_loss", "q_taken", "q_target", "grad_norm")

    def __init__(
        self,
        model: MixingPolicy,
        cfg: Any,
        train_model: nn.Module | None = None,
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(model, cfg, all_reduce_mean)
        self.model: MixingPolicy = model
        self.train_model = train_model if train_model is not None else model
        self.target = copy.deepcopy(model).requires_grad_(False)
        params: Any = (
            model.optimizer_groups(cfg.lr)
            if isinstance(model, GroupedQPolicy)
            else model.parameters()
        )
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
        # Team rewards seen over all ranks: count, sum, sum of squares.
        self.reward_moments = torch.zeros(3, dtype=torch.float64)
        model.epsilon.fill_(epsilon_at(cfg, 0))

    def after_batch(self) -> dict[str, float]:
        """ε along its schedule by the env steps now collected."""
        eps = epsilon_at(self.cfg, self.env_steps)
        self.model.epsilon.fill_(eps)
        return {"epsilon": eps}

    def observe(self, batch: RolloutBatch) -> None:
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
        return (reward - (mean if self.cfg.reward_center else 0.0)) / max(std, 1e-6)

    def _step(self, width: int, device: torch.device) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        if model.memory_size:
            return self._finish(*self._sequences(width, device))
        now, nxt, rest = self.replay.take(*self.draw(width, device))
        valid = rest["valid"].to(rest["reward"].dtype)
        with torch.no_grad():
            online = model if cfg.double_q else None
            reward = self._scaled(rest["reward"])
            y = td_targets(self.target, online, nxt, reward, rest["ended"], cfg.gamma)
        _, q_tot = self.train_model({**now, TAKEN: rest["actions"]})
        return self._finish(q_tot, y, valid)

    def _sequences(self, width: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(Q_tot, y, valid)`` ``[L, n]`` over chunks of replayed steps, unrolled."""
        cfg, model = self.cfg, self.model
        burn = int(getattr(cfg, "burn_in", 0))
        length = sequence_length(
            self.replay.data["valid"].shape[1], getattr(cfg, "chunk_len", None), burn
        )
        obs, rest = self.replay.take_chunks(*self.draw(width, device, burn + length), burn + length)
        online, target = obs, obs
        if burn:  # each network unrolls the first steps to its own state at the chunk
            head, tail, keep = split_chunks(obs, burn)
            online = {**tail, MEMORY: model.state_after(head) * keep}
            target = {**tail, MEMORY: self.target.state_after(head) * keep}
            rest = {k: v[burn:] for k, v in rest.items()}
        n = rest["reward"].shape[1]
        valid = rest["valid"][:-1].to(rest["reward"].dtype)
        with torch.no_grad():
            q_next = self.target.utilities(target)
            q_next = q_next.view(length + 1, n, *q_next.shape[1:])
            chooser = model.utilities(online).view_as(q_next) if cfg.double_q else q_next
            best = q_next.gather(-1, chooser.argmax(-1, keepdim=True)).squeeze(-1)[1:]
            best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
            steps = burn + length + 1
            later = {k: obs[k].view(steps, n, *obs[k].shape[1:])[burn + 1 :].flatten(0, 1)
                     for k in ("alive", "state")}  # fmt: skip
            value = self.target.mix(best.flatten(0, 1), later).view(length, n)
            reward = self._scaled(rest["reward"][:-1])
            y = reward + cfg.gamma * (~rest["ended"][:-1]).to(reward.dtype) * value
        _, q_tot = self.train_model({**online, TAKEN: rest["actions"].flatten(0, 1)})
        return q_tot.view(length + 1, n)[:-1], y, valid

    def _finish(self, q_tot: Tensor, y: Tensor, valid: Tensor) -> dict[str, float]:
        """The masked TD loss's gradient step; its statistics averaged over ranks."""
        cfg, model = self.cfg, self.model
        with torch.no_grad():
            total = self.rank_count(valid.sum())
        loss = (valid * (q_tot - y) ** 2).sum() / total
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.gradient_steps += 1
        self.follow(model, self.target)
        with torch.no_grad():
            stats = torch.stack([
                loss.detach(), (valid * q_tot.detach()).sum() / total, (valid * y).sum() / total,
                norm.detach(),
            ])  # fmt: skip
            if self.all_reduce_mean is not None:  # each rank holds its share of the sums
                stats[:3] = self.all_reduce_mean(stats[:3])
        return dict(zip(self.step_stats, stats.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        """The replay learner's state, the target network and the reward moments."""
        return {
            **super().state_dict(),
            "target": self.target.state_dict(),
            "reward_moments": self.reward_moments.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s (a checkpoint without a replay: it starts empty)."""
        super().load_state_dict(state)
        self.target.load_state_dict(state["target"])
        if "reward_moments" in state:
            self.reward_moments = state["reward_moments"].clone().double().cpu()
        self.model.epsilon.fill_(epsilon_at(self.cfg, self.env_steps))
