"""Shared-parameter MLP actor and critics: one network applied to every agent."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from policies.distributions import ActionHead, Distribution


def mlp(in_dim: int, hidden: int, layers: int, out_dim: int | None = None) -> nn.Sequential:
    """``layers`` hidden ``Tanh`` layers (orthogonal init), with an optional linear output."""
    mods: list[nn.Module] = []
    d = in_dim
    for _ in range(layers):
        lin = nn.Linear(d, hidden)
        nn.init.orthogonal_(lin.weight, gain=2**0.5)
        nn.init.zeros_(lin.bias)
        mods += [lin, nn.Tanh()]
        d = hidden
    if out_dim is not None:
        lin = nn.Linear(d, out_dim)
        nn.init.orthogonal_(lin.weight, gain=1.0)
        nn.init.zeros_(lin.bias)
        mods.append(lin)
    return nn.Sequential(*mods)


class MLPActor(nn.Module):
    """Per-agent policy from the agent's own observation; parameters shared across agents.

    Args:
        obs_dim: ``D``.
        action_kind: ``"discrete"`` or ``"continuous"``.
        action_dim: ``A``.
        hidden: hidden width.
        layers: hidden layers.

    Shapes:
        - input: ``obs [B, N, D]``, optional ``action_mask [B, N, A]``.
        - output: a distribution over ``[B, N]`` actions.
    """

    def __init__(
        self, obs_dim: int, action_kind: str, action_dim: int, hidden: int = 64, layers: int = 2
    ) -> None:
        super().__init__()
        self.body = mlp(obs_dim, hidden, layers)
        self.head = ActionHead(hidden, action_kind, action_dim)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """Per-agent features ``[B, N, hidden]`` (what a memory core reads)."""
        return self.body(batch["obs"])  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, Tensor]) -> Distribution:
        """Action distribution for every agent."""
        return self.head(self.features(batch), batch.get("action_mask"))


class MLPCritic(nn.Module):
    """Per-agent value. Centralised (MAPPO): sees the global state next to the agent's own obs.

    Independent (IPPO): sees only the agent's observation.

    Args:
        obs_dim: ``D``.
        state_dim: ``S``; ignored when ``centralised`` is false.
        centralised: MAPPO critic if true, IPPO critic if false.
        hidden: hidden width.
        layers: hidden layers.

    Shapes:
        - input: ``obs [B, N, D]``, ``state [B, S]``.
        - output: ``[B, N]``.
    """

    def __init__(
        self,
        obs_dim: int,
        state_dim: int,
        centralised: bool = True,
        hidden: int = 64,
        layers: int = 2,
    ) -> None:
        super().__init__()
        self.centralised = centralised
        self.net = mlp(obs_dim + (state_dim if centralised else 0), hidden, layers, 1)

    def features(self, batch: dict[str, Tensor]) -> Tensor:
        """The last hidden layer ``[B, N, hidden]`` (what a critic's memory core reads)."""
        x = batch["obs"]
        if self.centralised:
            state = batch["state"].unsqueeze(-2).expand(*x.shape[:-1], -1)
            x = torch.cat([state, x], dim=-1)
        return self.net[:-1](x)  # type: ignore[no-any-return]

    def head(self, h: Tensor) -> Tensor:
        """Values ``[B, N]`` from :meth:`features`."""
        return self.net[-1](h).squeeze(-1)  # type: ignore[no-any-return]

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Values ``[B, N]``."""
        return self.head(self.features(batch))
