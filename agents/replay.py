"""A learner-side replay of whole batches, and what every replay learner shares.

A replay learner (QMIX/VDN in ``agents/value_decomposition.py``, MASAC/ISAC in
``agents/soft_actor_critic.py``) keeps the batches its rank is handed whole (``[T, B, ...]``)
in a bounded ring; a transition is step ``t`` of env ``b`` with step ``t + 1`` of the same
batch as its next observation. Transitions whose next observation the batch does not hold are
not replayed: the batch's last step, and a step whose episode a time limit cut (its final
observation is not stored). A time limit is never treated as terminal.

A policy with memory is trained on sequences instead: chunks of ``L`` consecutive steps of one
env inside one batch (plus the step after, for the targets), each unrolled from the recurrent
state acting stored at its first step and reset inside it where acting reset it (R2D2's
stored-state replay; a chunk never straddles two batches, whose envs' states were carried
across by acting).

Each gradient step draws ``train.replay_batch`` transitions over all ranks from one generator
that every rank seeds alike; a rank learns from the draws that fall on its own envs and
normalises by the draws of all ranks, so ``K`` ranks (gradients averaged over ranks) take
exactly the step one rank takes on the union of their envs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from agents.ppo import OptimizerState
from agents.rollout import RolloutBatch
from policies.memory import KEEP, MEMORY, chunk_keep


class Replay:
    """Whole batches in a ring of ``capacity`` slots, on the learner's device.

    Stores per step the observation fields the policy reads, the actions, each agent's reward
    and termination, the team reward (every live agent's reward summed), whether the episode
    ended for real (every agent terminated) and whether the step is a replayable transition;
    for a policy with memory (``memory`` among the fields), also whether a time limit cut the
    episode after the step (with the terminations: where a replayed sequence resets its state,
    by acting's rule, ``policies.memory.chunk_keep``).
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
        self.add_steps(batch.obs, batch.actions, batch.rewards, batch.terminated, batch.truncated)

    def add_steps(
        self,
        obs: dict[str, Tensor],
        actions: Tensor,
        rewards: Tensor,
        terminated: Tensor,
        truncated: Tensor,
    ) -> None:
        """Keep ``T`` steps of ``B`` envs given field by field (``obs`` holds ``alive``).

        Shapes: as :class:`~agents.rollout.RolloutBatch`'s fields of the same names.
        """
        alive = obs["alive"].to(rewards.dtype)
        ended = terminated.all(-1)
        cut = truncated & ~ended
        valid = ~cut
        valid[-1] = False
        row = {
            **{f"obs.{k}": v for k, v in obs.items() if k in self.keys},
            "actions": actions,
            "rewards": rewards,
            "terminated": terminated,
            "reward": (rewards * alive).sum(-1),
            "ended": ended,
            "valid": valid,
        }
        if MEMORY in self.keys:
            row["truncated"] = truncated
        if not self.data:
            self.slots = max(1, self.capacity_steps // int(rewards.shape[0] * rewards.shape[1]))
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

    def take_chunks(
        self, k: Tensor, t: Tensor, b: Tensor, length: int
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Chunks of ``length`` steps from ``(k, t, b)`` and the step after, as ``(obs, rest)``.

        Every field is ``[length + 1, n, ...]``, time-major. ``obs`` is a sequence batch for a
        policy with memory: its steps flattened (``[(length + 1) * n, ...]``), ``memory`` the
        state stored at each chunk's first step and ``memory_keep`` where a step keeps the
        previous one's (the env did not reset after it and the agent is alive).
        """
        steps = t.unsqueeze(0) + torch.arange(length + 1, device=t.device).unsqueeze(1)
        obs, rest = {}, {}
        for key, v in self.data.items():
            rows = v[k.unsqueeze(0), steps, b.unsqueeze(0)]
            if key.startswith("obs."):
                obs[key[4:]] = rows
            else:
                rest[key] = rows
        keep = chunk_keep(rest["terminated"], rest["truncated"], obs["alive"])
        seq = {key: v.flatten(0, 1) for key, v in obs.items() if key != MEMORY}
        return {**seq, MEMORY: obs[MEMORY][0], KEEP: keep}, rest


class ReplayLearner(OptimizerState):
    """The replay, the shared draws, counters and target updates of one rank's learner.

    :meth:`update` is every replay learner's: keep the batch, then ``updates_per_batch``
    gradient steps (:meth:`_step`, the subclass's) with their statistics averaged.

    Args:
        model: the policy the rank acts and learns with (its ``input_keys`` are replayed).
        cfg: the ``train`` section (``replay_size``, ``replay_batch``, ``updates_per_batch``,
            ``learning_starts``, ``target_tau``, ``target_every``, ``lr``, ``seed``).
        all_reduce_mean: averages a tensor over ranks (``None`` on one).
    """

    step_stats: tuple[str, ...] = ()
    """What :meth:`_step` returns (0 for a batch without gradient steps)."""

    def __init__(
        self, model: nn.Module, cfg: Any, all_reduce_mean: Callable[[Tensor], Tensor] | None
    ) -> None:
        self.model, self.cfg, self.all_reduce_mean = model, cfg, all_reduce_mean
        keys: frozenset[str] = model.input_keys  # type: ignore[assignment]
        grouped = all_reduce_mean is not None and dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if grouped else 1
        self.rank = dist.get_rank() if grouped else 0
        self.replay = Replay(max(1, cfg.replay_size // self.world), keys)
        self.draws = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)) + 7919)
        self.env_steps = 0
        self.updates = 0
        self.gradient_steps = 0
        self.share = torch.zeros(0, dtype=torch.bool)

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
        self.env_steps += batch.env_steps * self.world
        self.updates += 1
        self.observe(batch)
        for opt in self.optimizers():
            for group in opt.param_groups:  # an agent group's own rate, else the run's
                group["lr"] = group.get("base_lr", cfg.lr) * lr_frac
        steps = cfg.updates_per_batch if self.env_steps >= cfg.learning_starts else 0
        sums = dict.fromkeys(self.step_stats, 0.0)
        for _ in range(steps):
            for key, value in self._step(batch.rewards.shape[1], device).items():
                sums[key] += value / steps
        return {
            **sums,
            **self.after_batch(),
            "replay_transitions": float(self.replay.transitions * self.world),
            "gradient_steps": float(steps),
            "lr": cfg.lr * lr_frac,
        }

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimiser whose rate ``lr_frac`` scales."""
        return [self.optimizer]

    def observe(self, batch: RolloutBatch) -> None:
        """Learn what a learner keeps of every batch besides the replay (nothing here)."""

    def _step(self, width: int, device: torch.device) -> dict[str, float]:
        """One gradient step on a draw of ``width`` envs' transitions: :attr:`step_stats`."""
        raise NotImplementedError

    def after_batch(self) -> dict[str, float]:
        """Move what follows the env-step count after a batch; statistics to report."""
        return {}

    def draw(
        self, width: int, device: torch.device, length: int = 1
    ) -> tuple[Tensor, Tensor, Tensor]:
        """This rank's share ``(slot, step, env)`` of one global draw of transitions.

        ``train.replay_batch`` transitions are drawn over all ranks, as single steps or, with
        ``length`` > 1, as ``replay_batch // length`` chunks (the first step of each); the
        step after a chunk is always in its batch. ``width`` is this rank's envs.
        ``self.share`` keeps which of the global draws are this rank's.
        """
        r = self.replay
        n = max(1, self.cfg.replay_batch // length)
        t_len = r.data["valid"].shape[1]
        k = torch.randint(r.filled, (n,), generator=self.draws)
        t = torch.randint(t_len - length, (n,), generator=self.draws)
        b = torch.randint(width * self.world, (n,), generator=self.draws) - self.rank * width
        mine = (b >= 0) & (b < width)
        self.share = mine
        return k[mine].to(device), t[mine].to(device), b[mine].to(device)

    def rank_count(self, count: Tensor) -> Tensor:
        """``count`` averaged over ranks (at least 1).

        A rank's loss sum divided by it, with gradients averaged over ranks, gives the
        all-rank mean.
        """
        total = self.all_reduce_mean(count) if self.all_reduce_mean else count
        return total.clamp_min(1.0)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Average ``params``' gradients over ranks in one all-reduce (no-op on one rank)."""
        if self.all_reduce_mean is None or self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = self.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    @torch.no_grad()
    def follow(self, online: nn.Module, target: nn.Module) -> None:
        """Move ``target`` towards ``online`` after a gradient step.

        A Polyak step of ``target_tau``, or a copy every ``target_every`` gradient steps.
        """
        every = self.cfg.target_every
        tau = self.cfg.target_tau if every is None else float(self.gradient_steps % every == 0)
        if tau > 0:
            for p, q in zip(online.parameters(), target.parameters(), strict=True):
                q.lerp_(p, tau)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, counters, the draw generator and, on one rank, the replay.

        With K ranks each holds its own shard's replay and only rank 0 writes checkpoints, so
        a resumed group refills its replays instead.
        """
        replay = {"replay": self.replay.state_dict()} if self.world == 1 else {}
        return {
            **super().state_dict(),
            **replay,
            "env_steps": self.env_steps,
            "gradient_steps": self.gradient_steps,
            "draws": self.draws.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s (a checkpoint without a replay: it starts empty)."""
        if "replay" in state and self.world == 1:
            self.replay.load_state_dict(state["replay"])
        super().load_state_dict(state)
        self.env_steps = int(state["env_steps"])
        self.gradient_steps = int(state["gradient_steps"])
        self.draws.set_state(state["draws"])
