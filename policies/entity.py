"""Actor and critic heads shared by every entity encoder (graph or transformer).

An encoder maps ``nodes [B, E, F]`` (agents first) to embeddings ``[B, E, H]``; these modules
read the first ``N`` rows as the agents, so they inherit the encoder's size independence and
permutation equivariance.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.distributions import ActionHead, Distribution
from policies.mlp import mlp


class EntityActor(nn.Module):
    """Per-agent actions from agent embeddings.

    Args:
        encoder: maps a batch dict to embeddings ``[B, E, hidden]``, and with ``first=N`` to
            the first ``N`` rows (it may skip work for the others).
        hidden: embedding width.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: ``A``.

    Shapes:
        - input: ``nodes [B, E, F]``, ``node_mask [B, E]``, ``alive [B, N]`` (+ encoder keys).
        - output: a distribution over ``[B, N]`` actions.
    """

    def __init__(self, encoder: nn.Module, hidden: int, action_kind: str, action_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = ActionHead(hidden, action_kind, action_dim)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The agents' embeddings ``[B, N, hidden]`` (what a memory core reads)."""
        return self.encoder(batch, first=batch["alive"].shape[-1])  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, Tensor]) -> Distribution:
        """Action distribution for every agent."""
        return self.head(self.features(batch), batch.get("action_mask"))


class EntityCritic(nn.Module):
    """Per-agent value from the agent's embedding, plus a pooled view of every entity.

    With ``centralised=True`` (MAPPO) each value also sees the masked mean of all embeddings,
    so the critic is centralised yet independent of the number of agents; with ``False``
    (IPPO) it sees the agent's own embedding only.

    Shapes:
        - input: as ``EntityActor``.
        - output: ``[B, N]``.
    """

    def __init__(self, encoder: nn.Module, hidden: int, centralised: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.centralised = centralised
        self.out = mlp(hidden * (2 if centralised else 1), hidden, 1, 1)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The value MLP's hidden layer ``[B, N, hidden]`` (what a critic's memory core reads)."""
        n = batch["alive"].shape[-1]
        h = self.encoder(batch)
        x = h[:, :n]
        if self.centralised:
            mask = batch["node_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            x = torch.cat([x, pooled.unsqueeze(1).expand_as(x)], dim=-1)
        return self.out[:-1](x)  # type: ignore[no-any-return]

    def head(self, h: Tensor) -> Tensor:
        """Values ``[B, N]`` from :meth:`features`."""
        return self.out[-1](h).squeeze(-1)  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Values ``[B, N]``."""
        return self.head(self.features(batch))
