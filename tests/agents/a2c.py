"""A2C through the algorithm seam: one module, registered by its import path, nothing else.

The tests train with ``train.algorithm=tests.agents.a2c:A2C`` in-process and on Ray (rollout
workers, two learner ranks) without touching the learner, the loop or the actors: proof that
the seam is the only thing an algorithm needs. One synchronous advantage actor-critic step per
batch (Mnih et al., 2016) on GAE advantages, with the policy's value normaliser kept as PPO
keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel
from torch import Tensor, nn

from agents.algorithm import AlgorithmSpec
from agents.ppo import OptimizerState, PPOConfig, compute_gae
from agents.rollout import RolloutBatch
from policies.actor_critic import Policy


class A2CLearner(OptimizerState):
    """One gradient step per batch on ``-logp * A + vf_coef * (V - R)^2 / 2 - ent_coef * H``."""

    def __init__(
        self,
        model: Policy,
        cfg: PPOConfig,
        train_model: nn.Module,
        all_reduce_mean: Callable[[Tensor], Tensor] | None,
    ) -> None:
        self.model, self.cfg, self.train_model = model, cfg, train_model
        self.all_reduce_mean = all_reduce_mean or (lambda t: t)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
        self.updates = 0

    def _mean(self, x: Tensor, mask: Tensor) -> Tensor:
        """The all-rank mean of ``x`` over live agents: K ranks see one rank's statistics."""
        sums = self.all_reduce_mean(torch.stack([(x * mask).sum(), mask.sum()]))
        return sums[0] / sums[1].clamp(min=1.0)

    def update(
        self, batch: RolloutBatch, lr_frac: float = 1.0, staleness: int = 0
    ) -> dict[str, float]:
        """One A2C step on the whole batch."""
        cfg, model = self.cfg, self.model
        device = next(model.parameters()).device
        batch = batch.to(device)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_frac
        done = batch.terminated | batch.truncated.unsqueeze(-1)
        adv, returns = compute_gae(
            batch.rewards, batch.values, batch.next_values, batch.terminated, done,
            cfg.gamma, cfg.gae_lambda,
        )  # fmt: skip
        alive = batch.obs["alive"].to(adv.dtype)
        vn = model.value_norm
        mean = self._mean(returns, alive)
        vn.update_from_moments(mean, self._mean(returns.square(), alive))
        adv = adv - self._mean(adv, alive)
        adv = adv / (self._mean(adv.square(), alive).sqrt() + 1e-8)

        obs = {k: v.flatten(0, 1) for k, v in batch.obs.items() if k in model.input_keys}
        dist, value = self.train_model(obs)
        m = alive.flatten(0, 1)
        count = m.sum().clamp(min=1.0)
        logp = dist.log_prob(batch.actions.flatten(0, 1))
        policy_loss = -(logp * adv.flatten(0, 1) * m).sum() / count
        target = vn.normalize(returns).flatten(0, 1)
        value_loss = 0.5 * ((value - target).square() * m).sum() / count
        entropy = (dist.entropy() * m).sum() / count
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.updates += 1
        return {
            "a2c_policy_loss": policy_loss.item(),
            "a2c_value_loss": value_loss.item(),
            "a2c_entropy": entropy.item(),
        }


def _build(
    model: Policy,
    cfg: BaseModel,
    train_model: nn.Module,
    all_reduce_mean: Callable[[Tensor], Tensor] | None,
) -> A2CLearner:
    assert isinstance(cfg, PPOConfig)
    return A2CLearner(model, cfg, train_model, all_reduce_mean)


A2C = AlgorithmSpec("a2c", _build, metrics=("a2c_policy_loss", "a2c_value_loss", "a2c_entropy"))
