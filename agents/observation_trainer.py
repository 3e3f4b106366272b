"""Fitting the observation world model (``policies/observation_model.py``) to real transitions.

The loss has the entity model's terms, per agent: the change of each living agent's fields in
units of their running scale, its reward, whether it goes on; and the change of the world
fields, the next action mask (binary cross-entropy per action). An agent's change is learned
only where it goes on: after a termination the env resets, and the next observation belongs to
another episode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from agents.world_model import ModelTrainer
from policies.observation_model import ObservationWorldModel


class ObservationTrainer(ModelTrainer):
    """Fits an :class:`ObservationWorldModel` (see :class:`~agents.world_model.ModelTrainer`)."""

    model: ObservationWorldModel

    def _vectors(self, s: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Agent and world vectors now and next, for rows of any leading shape."""
        m, alive = self.model, s["alive"]
        lead = tuple(alive.shape[:-1])
        nxt = {f.key: s[f"next_{f.key}"] for f in m.fields if f"next_{f.key}" in s}
        return (
            m.agent_vector(s, alive),
            m.agent_vector(nxt, alive),
            m.world_vector(s, lead),
            m.world_vector(nxt, lead),
        )

    @torch.no_grad()
    def _update_scales(self, sample: dict[str, Tensor]) -> None:
        """Track the targets' spread, so every target is learned in comparable units."""
        m = self.model
        agents, agents_next, world, world_next = self._vectors(sample)
        moving = sample["alive"] & (sample["agent_cont"] > 0)
        delta = (agents_next - agents)[moving]
        d_std = delta.std(0).clamp(min=1e-3) if delta.shape[0] > 1 else m.delta_scale
        going = sample["cont"] > 0
        w_delta = (world_next - world)[going]
        w_std = w_delta.std(0).clamp(min=1e-3) if w_delta.shape[0] > 1 else m.world_scale
        r_std = sample["rewards"][sample["alive"]].std().clamp(min=1e-3)
        b = 0.0 if self.updates == 0 else self.scale_beta
        m.delta_scale.mul_(b).add_((1 - b) * d_std)
        m.world_scale.mul_(b).add_((1 - b) * w_std)
        m.reward_scale.mul_(b).add_((1 - b) * r_std)

    def loss(self, samples: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        """See :meth:`~agents.world_model.ModelTrainer.loss`."""
        m = self.model
        s = {key: torch.stack([x[key] for x in samples]) for key in samples[0]}  # [K, B, ...]
        k = s["alive"].shape[0]
        alive = s["alive"]
        agents, agents_next, world, world_next = self._vectors(s)
        mask = s.get(m.mask_field.key) if m.mask_field else None
        tokens = m.tokens(agents, mask, s["actions"], alive)
        delta, w_delta, reward, cont, mask_logits = m.run_members(tokens, world, alive, agents)

        moving = (alive & (s["agent_cont"] > 0)).unsqueeze(-1).to(delta.dtype)
        target = (agents_next - agents) / m.delta_scale
        d_loss = ((delta - target).square() * moving).sum() / (
            moving.sum() * target.shape[-1]
        ).clamp(min=1)
        live = alive.to(delta.dtype)
        r_err = (reward - s["rewards"] / m.reward_scale).square()
        r_loss = (r_err * live).sum() / live.sum().clamp(min=1)
        c_err = F.binary_cross_entropy_with_logits(cont, s["agent_cont"], reduction="none")
        c_loss = (c_err * live).sum() / live.sum().clamp(min=1)
        total = d_loss + r_loss + 0.1 * c_loss
        stats = {
            "delta_mse": float(d_loss.detach()),
            "reward_mse": float(r_loss.detach()),
            "cont_bce": float(c_loss.detach()),
        }
        if m.world_fields:
            going = (s["cont"] > 0).unsqueeze(-1).to(delta.dtype)
            w_target = (world_next - world) / m.world_scale
            w_loss = ((w_delta - w_target).square() * going).sum() / (
                going.sum() * w_target.shape[-1]
            ).clamp(min=1)
            total = total + w_loss
            stats["world_mse"] = float(w_loss.detach())
        if m.mask_field is not None:
            nxt_mask = s[f"next_{m.mask_field.key}"].flatten(-1).to(delta.dtype)
            m_err = F.binary_cross_entropy_with_logits(mask_logits, nxt_mask, reduction="none")
            m_loss = (m_err * moving).sum() / (moving.sum() * nxt_mask.shape[-1]).clamp(min=1)
            total = total + m_loss
            stats["mask_bce"] = float(m_loss.detach())
        # Each term is the members' mean; the sum over members keeps every member's gradient
        # the size it would have alone.
        return k * total, stats
