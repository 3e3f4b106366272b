"""Learning: GAE and the MAPPO/IPPO clipped objective, read top to bottom.

MAPPO and IPPO share this loss; they differ only in the critic the policy was built with
(centralised or per-agent), so there is one code path.

Batches acted with older weights (``rollout.max_staleness`` > 0 lets workers collect while
the learner updates) get decoupled PPO (Hilton et al., 2022, "Batch size-invariance for
policy optimization"): the clip's trust region is centred on the current policy π_prox
instead of the stale behaviour policy π_b, and each sample's loss is weighted by
min(π_prox/π_b, ``rho_max``). Values for GAE and value clipping are recomputed by the current
critic. Without it, a one-version-old batch starts PPO with ratios already near the clip
edge, so much of the batch gives no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from agents.rollout import RolloutBatch
from policies.actor_critic import Policy
from policies.groups import GroupedActorCritic, GroupValueNorm
from policies.memory import KEEP, MEMORY, chunk_keep


class PPOConfig(BaseModel):
    """PPO hyper-parameters; the run config's ``train`` section extends this class.

    Validated like every config section: an unknown key or a value out of range is rejected
    with the field's name.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: float = Field(3e-3, gt=0)
    lr_decay: bool = False
    """Anneal the learning rate linearly to 0 over the run's budget: ``train.total_env_steps``
    or ``train.time_limit_s``, whichever ends it first."""
    gamma: float = Field(0.99, ge=0, le=1)
    gae_lambda: float = Field(0.95, ge=0, le=1)
    clip: float = Field(0.2, gt=0)
    dual_clip: float | None = Field(3.0, gt=1)
    """Bound on the ratio's pull for negative advantages (dual-clip PPO, Ye et al., 2020):
    past ``dual_clip`` a sample gives no gradient. PPO's clip bounds the ratio above only for
    positive advantages, so one sample of a once-rare action whose probability grew 75-fold
    can outweigh a whole minibatch; ``null`` is plain PPO."""
    value_clip: float = Field(0.2, gt=0)
    vf_coef: float = Field(1.0, ge=0)
    ent_coef: float = Field(0.01, ge=0)
    epochs: int = Field(4, ge=1)
    minibatches: int = Field(2, ge=1)
    max_grad_norm: float = Field(10.0, gt=0)
    target_kl: float | None = Field(None, gt=0)
    """Stop an update's epochs once a minibatch's approximate KL to the acting policy exceeds
    this (CleanRL's ``target_kl``); ``None`` runs every epoch."""
    adv_norm: bool = True
    value_norm: bool = True
    behaviour_correction: bool = True
    """Correct batches acted with older weights (rollout.max_staleness > 0): PPO's clip is
    centred on the current policy and samples are weighted by the behaviour ratio."""
    rho_max: float = Field(2.0, gt=0)
    """Cap on that behaviour ratio (current / acting policy probability)."""
    chunk_len: int | None = Field(None, ge=1)
    """With ``model.memory``: steps per training sequence (MAPPO's data chunks). Each chunk
    starts from the recurrent state stored when it was acted and backpropagates through its
    steps; minibatches are sets of chunk positions across every env. It must divide
    ``train.rollout_len``; ``None`` takes the longest chunk that still leaves
    ``train.minibatches`` chunks per rollout. A replay learner (``qmix``, ``vdn``) replays
    chunks of this many steps from anywhere in a batch: fewer than ``train.rollout_len``;
    ``None``: ``train.rollout_len - 1 - train.burn_in``."""
    refresh_memory: bool = False
    """With ``model.memory``: before each PPO epoch whose weights differ from the ones that
    acted (every epoch after the first; the first too on a stale batch), unroll the batch
    once without gradients to recompute the state each chunk starts from with the current
    weights, instead of reusing the state acting stored (R2D2's "stale state" problem, in
    PPO's later epochs). Costs one forward pass of the actor over the batch per epoch."""


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    done: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a time-major batch.

    Termination and truncation differ: a terminated step has no future (``next_value`` is
    ignored); a truncated step was cut by a time limit, so it bootstraps from ``next_value``
    (the value of the final observation) but the λ-recursion still stops at the boundary.

    Args:
        rewards: ``[T, ...]``.
        values: ``[T, ...]`` value of the state each step started from.
        next_values: ``[T, ...]`` value of the state each step led to.
        terminated: ``[T, ...]`` bool.
        done: ``[T, ...]`` bool, episode ended after this step (terminated or truncated).
        gamma: discount.
        lam: GAE λ.

    Returns:
        ``(advantages, returns)``, both ``[T, ...]``.
    """
    not_term = (~terminated).to(rewards.dtype)
    not_done = (~done).to(rewards.dtype)
    deltas = rewards + gamma * next_values * not_term - values
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        last = deltas[t] + gamma * lam * not_done[t] * last
        adv[t] = last
    return adv, adv + values


def _identity(t: Tensor) -> Tensor:
    return t


def chunk_length(
    rollout_len: int, minibatches: int, chunk_len: int | None, key: str = "train.rollout_len"
) -> int:
    """Steps per training sequence.

    ``chunk_len``, or the longest divisor of ``rollout_len`` that leaves at least
    ``minibatches`` chunks. ``key`` names the length in errors (imagined batches are
    ``world_model.horizon`` long).

    Raises:
        ValueError: a ``chunk_len`` that does not divide ``rollout_len``.
    """
    if chunk_len is not None:
        if rollout_len % chunk_len:
            raise ValueError(
                f"train.chunk_len ({chunk_len}) must divide {key} ({rollout_len}): "
                "training sequences never straddle two rollouts"
            )
        return chunk_len
    most = max(1, rollout_len // minibatches)
    return max(d for d in range(1, most + 1) if rollout_len % d == 0)


class _Steps:
    """Which steps of a ``[T, B, ...]`` batch one minibatch takes, and how to take them.

    Without memory a minibatch is a set of time steps across every env (chunks of one step);
    with memory, a set of chunk positions, each ``L`` consecutive steps of every env, taken
    time-major (``[L * chunks * B, ...]``) with the chunks' first recurrent states.
    """

    def __init__(self, units: Tensor, length: int) -> None:
        self.length = length
        self.steps = (units.view(1, -1) * length + torch.arange(length).view(-1, 1)).to(
            units.device
        )  # [L, k]

    def take(self, x: Tensor) -> Tensor:
        """``x [T, B, ...]`` -> ``[L * k * B, ...]``."""
        return x[self.steps].flatten(0, 2)

    def obs(
        self, obs: dict[str, Tensor], keys: frozenset[str], keep: Tensor | None
    ) -> dict[str, Tensor]:
        """The policy's inputs for these steps (chunk-start states and resets with memory)."""
        out = {k: self.take(v) for k, v in obs.items() if k in keys and k != MEMORY}
        if keep is not None:
            out[MEMORY] = obs[MEMORY][self.steps[0]].flatten(0, 1)
            out[KEEP] = keep[self.steps].flatten(1, 2)
        return out

    def untake(self, x: Tensor, batch_shape: tuple[int, ...]) -> Tensor:
        """Inverse of :meth:`take` when the steps cover the whole batch in order."""
        t, b = batch_shape
        k = self.steps.shape[1]
        return x.view(self.length, k, b, *x.shape[1:]).transpose(0, 1).reshape(t, b, *x.shape[1:])


class OptimizerState:
    """A trainer's checkpoint state: its optimiser and update count (the model is separate)."""

    optimizer: torch.optim.Optimizer
    updates: int

    def state_dict(self) -> dict[str, object]:
        """Optimiser state and the update count, for checkpoints."""
        return {"optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.optimizer.load_state_dict(state["optimizer"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]


class Learner(OptimizerState):
    """Owns the trainable model and optimiser; turns ``RolloutBatch``es into updates.

    Args:
        model: the policy; may be wrapped (e.g. ``DistributedDataParallel``) as ``train_model``.
            With agent groups (``policies.groups.GroupedActorCritic``) each trained group has
            its own Adam parameter group (its own rate) and gradient clip, advantages and
            value targets are normalised per policy, and frozen groups' agents are left out
            of the loss.
        cfg: PPO settings.
        train_model: the module whose ``forward`` is called in training (DDP wrapper or
            ``model`` itself).
        all_reduce_mean: averages a tensor over learner ranks (``None``: one rank), so
            advantage and value normalisation use global statistics and K ranks reproduce
            one rank exactly.
    """

    def __init__(
        self,
        model: Policy,
        cfg: PPOConfig,
        train_model: nn.Module | None = None,
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.model = model
        self.train_model = train_model if train_model is not None else model
        self.cfg = cfg
        params: Any = model.parameters()
        self._clip_groups: list[list[nn.Parameter]] = [list(model.parameters())]
        # Grouped policies: which policy each agent's statistics belong to.
        self._unit_of_agent: Tensor | None = getattr(model, "unit_of_agent", None)
        if isinstance(model, GroupedActorCritic):
            params = model.optimizer_groups(cfg.lr)
            if not params:
                raise ValueError("every agent group is frozen (train=false): nothing to train")
            self._clip_groups = [g["params"] for g in params]
        self.optimizer = torch.optim.Adam(params, lr=cfg.lr, eps=1e-5)
        self.all_reduce_mean = all_reduce_mean or _identity
        self.updates = 0
        self.trace: list[dict[str, Any]] | None = None
        """Set to a list to record one diagnostic record per update (``run.update_log``)."""

    @property
    def device(self) -> torch.device:
        """Where the parameters live."""
        return next(self.model.parameters()).device

    def _global_mean_std(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        m = mask.to(x.dtype)
        stats = self.all_reduce_mean(torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]))
        mean = stats[0] / stats[2].clamp(min=1.0)
        var = stats[1] / stats[2].clamp(min=1.0) - mean.square()
        return mean, var.clamp(min=0.0).sqrt()

    def _unit_mean_std(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-policy (grouped model) global mean and std of ``x [..., N]``, and which had any."""
        index = self._unit_of_agent
        assert index is not None
        units = int(index.max()) + 1
        m = mask.to(x.dtype)
        per_agent = torch.stack([x * m, x * x * m, m]).flatten(1, -2).sum(1)  # [3, N]
        onehot = nn.functional.one_hot(index, units).to(x.dtype)
        stats = self.all_reduce_mean(per_agent @ onehot)  # [3, U]
        count = stats[2].clamp(min=1.0)
        mean = stats[0] / count
        var = stats[1] / count - mean.square()
        return mean, var.clamp(min=0.0).sqrt(), stats[2] > 0

    def _chunk(self, t_len: int) -> int:
        """Steps per training sequence: 1 without memory."""
        if not self.model.memory_size:
            return 1
        return chunk_length(t_len, self.cfg.minibatches, self.cfg.chunk_len)

    def _keep(self, batch: RolloutBatch) -> Tensor | None:
        """Where a step keeps the previous step's recurrent state (``None`` without memory)."""
        if not self.model.memory_size:
            return None
        return chunk_keep(batch.terminated, batch.truncated, batch.obs["alive"])

    @torch.no_grad()
    def chunk_states(self, obs: dict[str, Tensor], keep: Tensor, length: int) -> Tensor:
        """``obs[MEMORY]`` with each chunk's first state recomputed under the current weights.

        Acting's own loop over the batch (``model.step`` one step at a time, states reset
        where ``keep [T, B, N]`` is false), from the state stored at the batch's first step;
        the rows inside chunks keep what acting stored (training never reads them).
        """
        model = self.model
        memory = obs[MEMORY].clone()
        state = memory[0]
        keys = [k for k in model.input_keys if k != MEMORY and k in obs]
        for t in range(memory.shape[0] - length):
            _, nxt = model.step({**{k: obs[k][t] for k in keys}, MEMORY: state})
            assert nxt is not None
            state = nxt * keep[t + 1].unsqueeze(-1).to(nxt.dtype)
            if (t + 1) % length == 0:
                memory[t + 1] = state
        return memory

    @torch.no_grad()
    def burn_in_states(
        self, obs: dict[str, Tensor], keep: Tensor, length: int, burn: int
    ) -> Tensor:
        """``obs[MEMORY]`` with each chunk's first state burnt in under the current weights.

        R2D2's burn-in, for PPO's chunks: a chunk starting at step ``s`` starts from the
        state the current weights reach after ``min(burn, s)`` steps from the state acting
        stored at ``s - burn`` (resets where ``keep`` says acting reset). The batch's first
        chunk keeps its stored state; rows inside chunks keep acting's (never read). Every
        chunk unrolls together, ``burn`` calls of ``model.step`` in all: a chunk with fewer
        steps before it waits at the batch's first state until its own steps come.
        """
        model = self.model
        memory = obs[MEMORY].clone()
        keys = [k for k in model.input_keys if k != MEMORY and k in obs]
        starts = torch.arange(length, memory.shape[0], length, device=memory.device)
        if not len(starts):
            return memory
        state = memory[(starts - burn).clamp(min=0)].flatten(0, 1)
        rows = state.shape[0] // len(starts)
        for i in range(burn):
            t = starts - burn + i
            started = (t >= 0).repeat_interleave(rows).view(-1, *([1] * (state.dim() - 1)))
            t = t.clamp(min=0)
            _, nxt = model.step({**{k: obs[k][t].flatten(0, 1) for k in keys}, MEMORY: state})
            assert nxt is not None
            nxt = nxt * keep[t + 1].flatten(0, 1).unsqueeze(-1).to(nxt.dtype)
            state = torch.where(started, nxt, state)
        memory[starts] = state.view(len(starts), *memory.shape[1:])
        return memory

    def _current_obs(
        self, batch: RolloutBatch, keep: Tensor | None, length: int
    ) -> dict[str, Tensor]:
        """The batch's inputs as the current weights see them.

        With ``train.refresh_memory`` each chunk starts from the state the current weights
        compute from the batch's start (:meth:`chunk_states`); with ``train.burn_in`` from
        that many steps before it (:meth:`burn_in_states`); otherwise ``batch.obs`` itself.
        """
        burn = int(getattr(self.cfg, "burn_in", 0))
        if keep is None or not (self.cfg.refresh_memory or burn):
            return batch.obs
        if self.cfg.refresh_memory:
            return {**batch.obs, MEMORY: self.chunk_states(batch.obs, keep, length)}
        return {**batch.obs, MEMORY: self.burn_in_states(batch.obs, keep, length, burn)}

    @torch.no_grad()
    def refresh(
        self, batch: RolloutBatch, done: Tensor, obs: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The current policy's view of a batch acted with older weights.

        ``obs``: the batch's inputs as the current weights see them (:meth:`_current_obs`;
        computed here when not given).

        Returns:
            ``(logp, values, next_values)``: log-probabilities of the batch's actions and
            raw values under the current weights. ``next_values`` takes the next step's
            fresh value inside an episode and keeps the recorded one where the batch has no
            next observation (episode ends and the last step).
        """
        model = self.model
        t_len, b = batch.rewards.shape[:2]
        length = self._chunk(t_len)
        steps = _Steps(torch.arange(t_len // length, device=self.device), length)
        keep = self._keep(batch)
        if obs is None:
            obs = self._current_obs(batch, keep, length)
        dist, value = model(steps.obs(obs, model.input_keys, keep))
        logp = steps.untake(dist.log_prob(steps.take(batch.actions)), (t_len, b))
        values = steps.untake(model.value_norm.denormalize(value), (t_len, b))
        next_values = batch.next_values.clone()
        next_values[:-1] = torch.where(done[:-1], batch.next_values[:-1], values[1:])
        return logp, values, next_values

    def update(
        self, batch: RolloutBatch, lr_frac: float = 1.0, staleness: int = 0
    ) -> dict[str, float]:
        """PPO epochs on one batch (this rank's shard); returns mean losses and diagnostics.

        Args:
            batch: a time-major rollout batch.
            lr_frac: multiplies the configured learning rate (for linear decay).
            staleness: how many updates old the weights that acted were; above 0, and with
                ``behaviour_correction``, the batch gets the decoupled-PPO correction.
        """
        cfg, model = self.cfg, self.model
        batch = batch.to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = group.get("base_lr", cfg.lr) * lr_frac
        alive = batch.obs["alive"]
        if isinstance(model, GroupedActorCritic):
            # Frozen groups' agents, and agents that played a past version, reach no loss.
            alive = model.learn_mask(batch.obs)
        done = batch.terminated | batch.truncated.unsqueeze(-1)
        t_len = batch.rewards.shape[0]
        length = self._chunk(t_len)
        keep = self._keep(batch)
        # A stale batch's chunks start from the current weights' states from the first epoch
        # on (with train.refresh_memory), and the behaviour correction reads the same inputs.
        obs = self._current_obs(batch, keep, length) if staleness > 0 else batch.obs
        prox_logp, values, next_values = batch.logp, batch.values, batch.next_values
        weight: Tensor | None = None
        if staleness > 0 and cfg.behaviour_correction:
            prox_logp, values, next_values = self.refresh(batch, done, obs)
            weight = (prox_logp - batch.logp).exp().clamp(max=cfg.rho_max)
        adv, returns = compute_gae(
            batch.rewards,
            values,
            next_values,
            batch.terminated,
            done,
            cfg.gamma,
            cfg.gae_lambda,
        )
        vn = model.value_norm
        index = self._unit_of_agent
        record: dict[str, Any] | None = None
        if self.trace is not None:
            record = _batch_record(batch, adv, returns, alive, vn)
        if cfg.value_norm:
            # Fold global (all-rank) statistics into the normaliser, identically on every rank.
            if isinstance(vn, GroupValueNorm):
                mean, std, active = self._unit_mean_std(returns, alive)
                vn.update_from_moments(mean, std.square() + mean.square(), active)
            else:
                mean, std = self._global_mean_std(returns, alive)
                vn.update_from_moments(mean, std.square() + mean.square())
        target = vn.normalize(returns) if cfg.value_norm else returns
        old_v = vn.normalize(values) if cfg.value_norm else values
        if record is not None:
            record["value_norm_after"] = _norm_stats(vn)
        if cfg.adv_norm:
            if index is not None:
                mean, std, _ = self._unit_mean_std(adv, alive)
                adv = (adv - mean[index]) / (std[index] + 1e-8)
            else:
                mean, std = self._global_mean_std(adv, alive)
                adv = (adv - mean) / (std + 1e-8)

        # Minibatches are sets of time steps (with memory: of chunk positions) across all
        # envs: every rank takes the same steps of its own envs, so K ranks together see
        # exactly one rank's minibatch.
        units = t_len // length
        gen = torch.Generator().manual_seed(1_000_003 * self.updates + 17)
        stats: dict[str, float] = {"policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0}
        stats.update(approx_kl=0.0, clip_frac=0.0, grad_norm=0.0)
        kl_max = 0.0
        per_mb: dict[str, list[float]] = {
            k: []
            for k in ("kl", "clip_frac", "grad_norm", "entropy", "ratio_max", "neg_adv_weight")
        }
        n_mb, stopped = 0, False
        planned = cfg.epochs * min(cfg.minibatches, units)
        for epoch in range(cfg.epochs):
            if stopped:
                break
            if epoch:
                # Chunks start from states the current weights compute, not acting's.
                obs = self._current_obs(batch, keep, length)
            perm = torch.randperm(units, generator=gen)
            for idx in perm.tensor_split(min(cfg.minibatches, units)):
                mb = _Steps(idx.to(self.device), length)
                mb_obs = mb.obs(obs, model.input_keys, keep)
                mb_alive = mb.take(alive).to(adv.dtype)
                count = mb_alive.sum().clamp(min=1.0)

                dist, value = self.train_model(mb_obs)
                act = mb.take(batch.actions)
                logp = dist.log_prob(act)
                log_ratio = logp - mb.take(prox_logp)
                ratio = log_ratio.exp()
                a = mb.take(adv)
                pg = -torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
                if cfg.dual_clip is not None:
                    pg = torch.where(a < 0, pg.clamp(max=-cfg.dual_clip * a), pg)
                if weight is not None:
                    pg = pg * mb.take(weight)
                policy_loss = (pg * mb_alive).sum() / count

                v_old = mb.take(old_v)
                v_tgt = mb.take(target)
                v_clip = v_old + (value - v_old).clamp(-cfg.value_clip, cfg.value_clip)
                v_loss = torch.max((value - v_tgt).square(), (v_clip - v_tgt).square())
                value_loss = 0.5 * (v_loss * mb_alive).sum() / count
                entropy = (dist.entropy() * mb_alive).sum() / count

                loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                norms = [nn.utils.clip_grad_norm_(p, cfg.max_grad_norm) for p in self._clip_groups]
                grad_norm = norms[0] if len(norms) == 1 else torch.stack(norms).norm()
                self.optimizer.step()

                with torch.no_grad():
                    kl = (((ratio - 1) - log_ratio) * mb_alive).sum() / count
                    clipped = ((ratio - 1).abs() > cfg.clip).to(a.dtype)
                    clip_frac = ((clipped * mb_alive).sum() / count).item()
                    stats["policy_loss"] += policy_loss.item()
                    stats["value_loss"] += value_loss.item()
                    stats["entropy"] += entropy.item()
                    stats["approx_kl"] += kl.item()
                    kl_max = max(kl_max, kl.item())
                    stats["clip_frac"] += clip_frac
                    stats["grad_norm"] += float(grad_norm)
                    if record is not None:
                        per_mb["kl"].append(kl.item())
                        per_mb["clip_frac"].append(clip_frac)
                        per_mb["grad_norm"].append(float(grad_norm))
                        per_mb["entropy"].append(entropy.item())
                        # The largest ratio, and the gradient weight of negative-advantage
                        # samples (their |A| * ratio), which the clip leaves unbounded above.
                        live = mb_alive > 0
                        per_mb["ratio_max"].append(float(ratio[live].max()))
                        neg = (a < 0) & live & (ratio > 1 + cfg.clip)
                        weight_neg = (ratio * a.abs() * neg).sum() / count
                        per_mb["neg_adv_weight"].append(float(weight_neg))
                n_mb += 1
                if cfg.target_kl is not None:
                    # Every rank sees the same mean KL, so all stop at the same minibatch.
                    if float(self.all_reduce_mean(kl.detach())) > cfg.target_kl:
                        stopped = True
                        break
        self.updates += 1
        out = {k: v / max(n_mb, 1) for k, v in stats.items()}
        out["approx_kl_max"] = kl_max  # the worst minibatch: a spike the mean hides
        # Mean π_prox/π_b over live agents (1 when the batch is on-policy or uncorrected).
        out["behaviour_weight"] = (
            float((weight * alive).sum() / alive.sum().clamp(min=1)) if weight is not None else 1.0
        )
        out["lr"] = cfg.lr * lr_frac
        out["minibatches_done"] = n_mb / planned  # below 1 when target_kl stopped the update
        if not all(math.isfinite(v) for v in out.values()):
            raise FloatingPointError(f"non-finite training statistics: {out}")
        if record is not None and self.trace is not None:
            record.update(update=self.updates, lr=out["lr"], minibatches=per_mb)
            self.trace.append(record)
        return out


def _norm_stats(vn: Any) -> list[float]:
    """A value normaliser's ``[mean, std]`` (flattened over policies for grouped models)."""
    stats = getattr(vn, "_stats", None)
    if stats is None:
        return []
    mean, std = stats()
    return [*mean.flatten().tolist(), *std.flatten().tolist()]


@torch.no_grad()
def _batch_record(
    batch: RolloutBatch, adv: Tensor, returns: Tensor, alive: Tensor, vn: Any
) -> dict[str, Any]:
    """What an update learns from, before it changes anything (``run.update_log``)."""
    m = alive.to(adv.dtype)
    count = m.sum().clamp(min=1.0)

    def moments(x: Tensor) -> list[float]:
        mean = (x * m).sum() / count
        return [float(mean), float((((x - mean) * m).square().sum() / count).sqrt())]

    ended = batch.terminated.all(-1) | batch.truncated
    terminated = (batch.terminated.all(-1) & ~batch.truncated).sum()
    return {
        "episode_return": float(batch.episode_returns.mean())
        if batch.episode_returns.numel()
        else math.nan,
        "advantage": moments(adv),
        "returns": moments(returns),
        "values": moments(batch.values),
        "value_norm_before": _norm_stats(vn),
        "terminated_share": float(terminated / ended.sum().clamp(min=1)),
        "episodes_ended": int(ended.sum()),
    }
