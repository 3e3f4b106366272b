"""Action distributions: masked categorical and diagonal Gaussian, batch-first."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# Large finite instead of -inf so a row with every action masked stays NaN-free.
_MASKED_LOGIT = -1e9


class Categorical:
    """Categorical over the last dim of ``logits``, with illegal actions masked out.

    Args:
        logits: ``[..., A]``.
        mask: ``[..., A]`` bool, ``True`` = legal; ``None`` when all actions are legal.
    """

    def __init__(self, logits: Tensor, mask: Tensor | None = None) -> None:
        if mask is not None:
            logits = logits.masked_fill(~mask, _MASKED_LOGIT)
        self.logits = logits - logits.logsumexp(dim=-1, keepdim=True)

    def sample(self) -> Tensor:
        """Draw ``[...]`` long actions (Gumbel-max, one fused op on any device)."""
        u = torch.rand_like(self.logits).clamp_(1e-20, 1.0)
        return (self.logits - (-u.log()).log()).argmax(dim=-1)

    def mode(self) -> Tensor:
        """Most likely action."""
        return self.logits.argmax(dim=-1)

    def log_prob(self, action: Tensor) -> Tensor:
        """``[...]`` log-probability of ``action``."""
        return self.logits.gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self) -> Tensor:
        """``[...]`` entropy; masked actions contribute nothing."""
        p = self.logits.exp()
        return -(p * self.logits).sum(dim=-1)


class DiagGaussian:
    """Independent Gaussians over the last dim.

    Args:
        mean: ``[..., A]``.
        log_std: ``[A]`` or ``[..., A]``.
    """

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        self.mean = mean
        self.log_std = log_std.expand_as(mean)

    def sample(self) -> Tensor:
        """Draw ``[..., A]`` actions."""
        return self.mean + self.log_std.exp() * torch.randn_like(self.mean)

    def mode(self) -> Tensor:
        """The mean."""
        return self.mean

    def log_prob(self, action: Tensor) -> Tensor:
        """``[...]`` log-density summed over action dims."""
        z = (action - self.mean) / self.log_std.exp()
        return (-0.5 * z.square() - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self) -> Tensor:
        """``[...]`` entropy summed over action dims."""
        return (self.log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


def agent_rows(d: Categorical | DiagGaussian, index: Tensor) -> Categorical | DiagGaussian:
    """The distribution of agents ``index`` only (agents are the dim before the last)."""
    if isinstance(d, Categorical):
        return Categorical(d.logits.index_select(-2, index))
    return DiagGaussian(d.mean.index_select(-2, index), d.log_std.index_select(-2, index))


class GroupedDistribution:
    """Several groups' distributions over their own agents, read as one over all ``N``.

    Args:
        parts: each group's distribution over its agents ``[..., N_g]``.
        agents: each group's agent slots, ``[N_g]`` long, in the same order.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: the env's (widest) continuous action width: narrower groups' actions are
            zero-padded to it; their padded dims are read by nobody.
        inverse: ``argsort(cat(agents))`` when the caller keeps it.

    Shapes: ``sample``/``mode`` give ``[..., N]`` (or ``[..., N, A]``); ``log_prob`` and
    ``entropy`` ``[..., N]``, every agent's entry from its own group.
    """

    def __init__(
        self,
        parts: list[Categorical | DiagGaussian],
        agents: list[Tensor],
        action_kind: str,
        action_dim: int,
        inverse: Tensor | None = None,
    ) -> None:
        self.parts, self.agents = parts, agents
        self.continuous = action_kind == "continuous"
        self.action_dim = action_dim
        # Where each slot's entry lands in the groups' outputs concatenated.
        self._inverse = torch.argsort(torch.cat(agents)) if inverse is None else inverse

    def _join(self, values: list[Tensor], agent_dim: int) -> Tensor:
        return torch.cat(values, dim=agent_dim).index_select(agent_dim, self._inverse)

    def _actions(self, draws: list[Tensor]) -> Tensor:
        if not self.continuous:
            return self._join(draws, -1)
        pad = [nn.functional.pad(d, (0, self.action_dim - d.shape[-1])) for d in draws]
        return self._join(pad, -2)

    def sample(self) -> Tensor:
        """Every group samples its agents' actions."""
        return self._actions([p.sample() for p in self.parts])

    def mode(self) -> Tensor:
        """Every group's most likely actions."""
        return self._actions([p.mode() for p in self.parts])

    def log_prob(self, action: Tensor) -> Tensor:
        """``[..., N]``: each agent's action under its group's policy."""
        out = []
        for part, idx in zip(self.parts, self.agents, strict=True):
            if self.continuous:
                assert isinstance(part, DiagGaussian)
                own = action.index_select(-2, idx)[..., : part.mean.shape[-1]]
            else:
                own = action.index_select(-1, idx)
            out.append(part.log_prob(own))
        return self._join(out, -1)

    def entropy(self) -> Tensor:
        """``[..., N]``: each agent's entropy under its group's policy."""
        return self._join([p.entropy() for p in self.parts], -1)


Distribution = Categorical | DiagGaussian | GroupedDistribution


class ActionHead(nn.Module):
    """Maps per-agent features to an action distribution.

    Args:
        in_dim: feature width.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: number of actions, or continuous action width.
        init_log_std: starting log standard deviation of a Gaussian head.
    """

    def __init__(
        self, in_dim: int, action_kind: str, action_dim: int, init_log_std: float = -0.5
    ) -> None:
        super().__init__()
        if action_kind not in ("discrete", "continuous"):
            raise ValueError(f"action_kind must be 'discrete' or 'continuous', not {action_kind!r}")
        self.kind = action_kind
        self.linear = nn.Linear(in_dim, action_dim)
        # Small final layer: the first policy is near-uniform, as PPO implementations advise.
        nn.init.orthogonal_(self.linear.weight, gain=0.01)
        nn.init.zeros_(self.linear.bias)
        if action_kind == "continuous":
            self.log_std = nn.Parameter(torch.full((action_dim,), init_log_std))

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Distribution:
        """Distribution for features ``h [..., in_dim]``."""
        out = self.linear(h)
        if self.kind == "discrete":
            return Categorical(out, mask)
        return DiagGaussian(out, self.log_std)
