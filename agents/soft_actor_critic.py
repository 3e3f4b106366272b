"""MASAC and ISAC: soft actor-critic learnt off-policy from a replay of acted transitions.

The replay, its transitions and the draws K ranks share are ``agents/replay.py``'s. Each agent
learns from its own reward and termination (a time limit never ends an episode; dead agents
and transitions a batch cannot complete weigh nothing):

- **critics**: twin soft Q-functions regressed on ``r_i + γ (1 - d_i) V⁻(s')`` with
  ``V⁻(s') = E_{a' ~ π}[min_j Q⁻_j(s', a') - α log π(a' | o')]`` from Polyak-averaged target
  critics; the expectation is exact over a discrete policy's actions, one reparameterised
  sample for continuous ones (MASAC: every agent's next action is drawn, as the critics read
  the joint action).
- **actor**: minimises ``E[α log π(a | o) - min_j Q_j(s, a)]`` (reparameterised through the
  squashed Gaussian; an exact expectation for discrete actions).
- **temperature**: ``log α`` is learnt so the policy's entropy tracks ``train.
  target_entropy`` (default ``-|A|`` for continuous actions, ``train.target_entropy_scale ·
  log |A|`` for discrete ones, as CleanRL's discrete SAC).

K ranks: each loss is a sum over the rank's share of one global draw divided by the all-rank
mean count, and its gradients are averaged over ranks in one all-reduce per loss; the
Gaussian noise of continuous samples is drawn for the global draw and shared out with it, so
K ranks take exactly the step one rank takes on the union of their envs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from agents.replay import ReplayLearner
from policies.sac import GroupedSACPolicy, SACPolicy, discrete_probs


class SACConfig(BaseModel):
    """Soft actor-critic settings (``train.algorithm=masac`` or ``isac``).

    The replay's settings are :class:`agents.value_decomposition.QConfig`'s; ``lr``,
    ``gamma`` and ``max_grad_norm`` are PPO's.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha_init: float = Field(0.2, gt=0)
    """The entropy temperature α at the start."""
    autotune_alpha: bool = True
    """Learn α so the policy's entropy tracks ``target_entropy``; off: α stays fixed."""
    target_entropy: float | None = None
    """The entropy α is tuned towards; ``None``: ``-|A|`` (continuous actions) or
    ``target_entropy_scale · log |A|`` (discrete)."""
    target_entropy_scale: float = Field(0.89, gt=0, le=1)
    """The fraction of the uniform policy's entropy a discrete policy's α aims at."""


@torch.no_grad()
def soft_targets(
    model: SACPolicy | GroupedSACPolicy,
    target: nn.ModuleList,
    nxt: dict[str, Tensor],
    rewards: Tensor,
    terminated: Tensor,
    alpha: Tensor,
    gamma: float,
    noise: Tensor | None = None,
) -> Tensor:
    """``y_i = r_i + γ (1 - d_i) (min_j Q⁻_j(s', a') - α log π(a' | o'))`` ``[n, N]``.

    ``a' ~ π`` of ``model``'s current actor (an exact expectation over discrete actions; for
    continuous ones ``noise`` is the sample's standard normal draw); ``target`` holds the
    target critics; ``alpha`` is each agent's temperature ``[N]`` (or one for all).
    """
    following = model.policy(nxt)
    if model.discrete:
        probs, logp = discrete_probs(following)  # type: ignore[arg-type]
        q_next = torch.min(*model.q(nxt, critics=target))
        v_next = (probs * (q_next - alpha.unsqueeze(-1) * logp)).sum(-1)
    else:
        a_next, logp_next = following.rsample(noise)  # type: ignore[union-attr]
        v_next = torch.min(*model.q(nxt, a_next, target)) - alpha * logp_next
    return rewards + gamma * (1 - terminated.to(rewards.dtype)) * v_next


class SoftActorCritic(ReplayLearner):
    """MASAC / ISAC learner for one rank (an ``agents.algorithm.Algorithm``).

    Args:
        model: the :class:`policies.sac.SACPolicy` the rank acts and learns with, or a
            :class:`policies.sac.GroupedSACPolicy` (one temperature per group's policy, a
            frozen group's agents weigh nothing).
        cfg: the ``train`` section (:class:`SACConfig`, the replay's settings, ``lr``,
            ``gamma``, ``max_grad_norm``, ``seed``).
        all_reduce_mean: averages a tensor over ranks (``None`` on one).
    """

    step_stats = ("q_loss", "actor_loss", "q_taken", "entropy", "grad_norm")

    def __init__(
        self,
        model: SACPolicy | GroupedSACPolicy,
        cfg: Any,
        all_reduce_mean: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(model, cfg, all_reduce_mean)
        self.model: SACPolicy | GroupedSACPolicy = model
        self.critics = model.critic_list()
        self.target = copy.deepcopy(self.critics).requires_grad_(False)
        self.actor_params = model.actor_parameters()
        self.critic_params = [p for p in self.critics.parameters() if p.requires_grad]
        if not self.actor_params:
            raise ValueError("every agent group is frozen (train=false): nothing to train")
        device = next(model.parameters()).device
        # One temperature per policy (per group's with groups), each agent slot's in ``units``.
        units, widths = model.temperatures()
        self.units = units.to(device)
        self.log_alpha = nn.Parameter(
            torch.full((len(widths),), math.log(cfg.alpha_init), device=device)
        )
        actor: Any = self.actor_params
        critic: Any = self.critic_params
        if isinstance(model, GroupedSACPolicy):  # each group at its own rate
            actor, critic = (model.optimizer_groups(cfg.lr, part) for part in (False, True))
        self.optimizer = torch.optim.Adam(actor, lr=cfg.lr, eps=1e-5)
        self.critic_optimizer = torch.optim.Adam(critic, lr=cfg.lr, eps=1e-5)
        self.alpha_optimizer = torch.optim.Adam([self.log_alpha], lr=cfg.lr, eps=1e-5)
        auto = [cfg.target_entropy_scale * math.log(a) if model.discrete else -float(a)
                for a in widths]  # fmt: skip
        fixed = cfg.target_entropy
        self.target_entropy = torch.tensor(
            auto if fixed is None else [float(fixed)] * len(widths), device=device
        )
        self.learns = getattr(model, "train_mask", torch.ones(len(units), dtype=torch.bool))

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The actor's, the critics' and the temperature's."""
        return [self.optimizer, self.critic_optimizer, self.alpha_optimizer]

    def after_batch(self) -> dict[str, float]:
        """The temperature now."""
        return {"alpha": float(self.log_alpha.detach().exp().mean())}

    def _descend(self, opt: torch.optim.Optimizer, loss: Tensor, params: list[Any]) -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self.average_gradients(params)
        norm = nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        opt.step()
        return norm

    def _step(self, width: int, device: torch.device) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        now, nxt, rest = self.replay.take(*self.draw(width, device))
        dtype = rest["rewards"].dtype
        live = now["alive"] & self.learns.to(device)
        weight = rest["valid"].unsqueeze(-1).to(dtype) * live.to(dtype)
        total = self.rank_count(weight.sum())
        alpha = self.log_alpha.detach().exp()[self.units]  # [N]

        noise: list[Tensor | None] = [None, None]
        if not model.discrete:  # drawn for all ranks' transitions: K ranks sample as one
            shape = (2, cfg.replay_batch, *rest["actions"].shape[1:])
            noise = list(torch.randn(shape, generator=self.draws)[:, self.share].to(device))
        y = soft_targets(model, self.target, nxt, rest["rewards"], rest["terminated"], alpha,
                         cfg.gamma, noise[0])  # fmt: skip

        if model.discrete:
            taken = rest["actions"].long().unsqueeze(-1)
            q1, q2 = (q.gather(-1, taken).squeeze(-1) for q in model.q(now))
        else:
            q1, q2 = model.q(now, rest["actions"])
        q_loss = (weight * ((q1 - y).square() + (q2 - y).square())).sum() / total
        critic_norm = self._descend(self.critic_optimizer, q_loss, self.critic_params)

        for p in self.critic_params:
            p.requires_grad_(False)
        try:
            d = model.policy(now)
            if model.discrete:
                probs, logp = discrete_probs(d)  # type: ignore[arg-type]
                q_now = torch.min(*model.q(now))
                per_agent = (probs * (alpha.unsqueeze(-1) * logp - q_now)).sum(-1)
                entropy = -(probs * logp).sum(-1)
            else:
                action, logp_a = d.rsample(noise[1])  # type: ignore[union-attr]
                per_agent = alpha * logp_a - torch.min(*model.q(now, action))
                entropy = -logp_a
            actor_loss = (weight * per_agent).sum() / total
            actor_norm = self._descend(self.optimizer, actor_loss, self.actor_params)
        finally:
            for p in self.critic_params:
                p.requires_grad_(True)

        weighted = weight * entropy.detach()
        mean_entropy = weighted.sum() / total
        if cfg.autotune_alpha:  # each temperature by its own agents' mean entropy
            n = len(self.log_alpha)
            sums = weighted.new_zeros(n).index_add_(0, self.units, weighted.sum(0))
            counts = weight.new_zeros(n).index_add_(0, self.units, weight.sum(0))
            counts = self.all_reduce_mean(counts) if self.all_reduce_mean else counts
            learnt = (counts > 0).to(dtype)  # a frozen group's temperature stays
            gap = (sums / counts.clamp_min(1.0) - self.target_entropy) * learnt
            alpha_loss = (self.log_alpha * gap).sum()
            self._descend(self.alpha_optimizer, alpha_loss, [self.log_alpha])
        self.gradient_steps += 1
        self.follow(self.critics, self.target)
        with torch.no_grad():
            stats = torch.stack([
                q_loss.detach(), actor_loss.detach(), (weight * q1.detach()).sum() / total,
                mean_entropy, torch.maximum(critic_norm, actor_norm).detach(),
            ])  # fmt: skip
            if self.all_reduce_mean is not None:  # each rank holds its share of the sums
                stats[:4] = self.all_reduce_mean(stats[:4])
        return dict(zip(self.step_stats, stats.tolist(), strict=True))

    def state_dict(self) -> dict[str, Any]:
        """The replay learner's state, the target critics, the temperature and its optimisers."""
        return {
            **super().state_dict(),
            "target": self.target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "alpha_optimizer": self.alpha_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s (a checkpoint without a replay: it starts empty)."""
        super().load_state_dict(state)
        self.target.load_state_dict(state["target"])
        self.log_alpha.data.copy_(state["log_alpha"].reshape(self.log_alpha.shape))
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
