"""Memory: a recurrent core between an actor's encoder and its action head (``model.memory``).

Every actor kind splits into ``features(batch) -> [B, N, H]`` (its encoder: MLP, graph or
transformer) and ``head``. :class:`RecurrentActor` puts a GRU or LSTM cell between them,
applied to each agent with shared weights, so graph and transformer policies stay
permutation-equivariant and independent of N. The state each agent enters a step with travels
in the batch as ``memory [B, N, S]``: acting loops keep it (:class:`MemoryState`), rollouts
store it per step, and training restarts each sequence chunk from the state stored at its
first step, resetting it inside the chunk exactly where acting did (episode ends, dead
agents). With ``model.critic_memory`` the critic gets a core of its own
(:class:`RecurrentCritic`) between its encoder and its value head; its state travels in the
same ``memory`` tensor, after the actor's (``[..., actor size + critic size]``), so storage,
chunking, resets, sharding and Ray batches carry it unchanged. A centralised critic that reads
the full global state has nothing to remember; one that reads only what agents see (IPPO, or a
"state" built from partial observations) does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from policies.distributions import Distribution

MEMORY_KINDS = ("none", "gru", "lstm")
#: Batch keys of the recurrent path: the state entering each step (acting, and a chunk's
#: first step in training) and, in training, which steps keep the previous step's state.
MEMORY, KEEP = "memory", "memory_keep"


def zero_state(alive: Tensor, size: int) -> Tensor:
    """Zero recurrent states ``[..., N, size]`` for agents shaped like ``alive [..., N]``."""
    return alive.new_zeros(*alive.shape, size, dtype=torch.float32)


class MemoryCore(nn.Module):
    """A GRU or LSTM cell over ``[..., width]`` features, one state per leading index.

    The state is one tensor ``[..., size]``: the GRU's ``h``, or the LSTM's ``h`` and ``c``
    side by side. With ``norm`` the features are layer-normalised before the cell (so the
    gates see inputs of unit scale however the encoder's outputs grow); with ``out_norm`` the
    output is layer-normalised after it (MAPPO's ``RNNLayer``), the carried state is not.
    """

    def __init__(self, kind: str, width: int, norm: bool = False, out_norm: bool = False) -> None:
        super().__init__()
        if kind not in ("gru", "lstm"):
            raise ValueError(f"memory kind must be 'gru' or 'lstm', not {kind!r}")
        self.kind, self.width = kind, width
        self.norm: nn.Module = nn.LayerNorm(width) if norm else nn.Identity()
        self.out_norm: nn.Module = nn.LayerNorm(width) if out_norm else nn.Identity()
        self.cell: nn.Module = (
            nn.GRUCell(width, width) if kind == "gru" else nn.LSTMCell(width, width)
        )
        for name, p in self.cell.named_parameters():
            if "weight" in name:
                nn.init.orthogonal_(p)
            else:
                nn.init.zeros_(p)

    @property
    def size(self) -> int:
        """Width of the carried state."""
        return self.width if self.kind == "gru" else 2 * self.width

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """``(output [..., width], next state [..., size])``."""
        lead = x.shape[:-1]
        x, state = self.norm(x).reshape(-1, self.width), state.reshape(-1, self.size)
        if self.kind == "gru":
            h = self.cell(x, state)
            return self.out_norm(h).view(*lead, -1), h.view(*lead, -1)
        h, c = self.cell(x, (state[:, : self.width], state[:, self.width :]))
        return self.out_norm(h).view(*lead, -1), torch.cat([h, c], -1).view(*lead, -1)

    def step(self, x: Tensor, batch: dict[str, Tensor], offset: int = 0) -> tuple[Tensor, Tensor]:
        """One step of features ``x [B, N, width]`` from ``batch["memory"]`` (zeros if absent).

        The core's state is ``memory[..., offset : offset + size]``.
        """
        state = batch.get(MEMORY)
        if state is None:
            state = zero_state(batch["alive"], self.size)
        else:
            state = state[..., offset : offset + self.size]
        return self(x, state)  # type: ignore[no-any-return]

    def unroll(self, x: Tensor, batch: dict[str, Tensor], offset: int = 0) -> tuple[Tensor, Tensor]:
        """Whole chunks: outputs ``[L * b, N, width]`` and the state after the last step.

        ``x`` holds ``L`` steps of ``b`` chunks time-major (``[L * b, N, width]``); each chunk
        starts from ``batch["memory"][..., offset : offset + size]`` (``[b, N, size]``) and
        resets where ``memory_keep [L, b, N]`` is false.
        """
        keep = batch[KEEP]
        steps, chunks = keep.shape[:2]
        f = x.view(steps, chunks, *x.shape[1:])
        state, out = batch[MEMORY][..., offset : offset + self.size], []
        for t in range(steps):
            if t:
                state = state * keep[t].unsqueeze(-1).to(state.dtype)
            h, state = self(f[t], state)
            out.append(h)
        return torch.stack(out).flatten(0, 1), state


class _Recurrent(nn.Module):
    """A feed-forward network's ``features`` -> :class:`MemoryCore` -> its ``head``.

    Its state is ``memory[..., offset : offset + size]``. Subclasses name the network and
    say how its head reads the core's output (:meth:`_features`, :meth:`_head`).
    """

    def __init__(self, kind: str, hidden: int, offset: int, norm: bool, out_norm: bool) -> None:
        super().__init__()
        self.core = MemoryCore(kind, hidden, norm, out_norm)
        self.offset = offset

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError

    def _head(self, h: Tensor, batch: dict[str, Tensor]) -> Any:
        raise NotImplementedError

    def step(self, batch: dict[str, Tensor]) -> tuple[Any, Tensor]:
        """The head's output and the next state ``[B, N, size]`` of one step.

        It starts from ``batch["memory"]`` (zeros when the batch has none).
        """
        h, state = self.core.step(self._features(batch), batch, self.offset)
        return self._head(h, batch), state

    def sequence(self, batch: dict[str, Tensor]) -> Any:
        """Whole chunks: the encoder runs once over every step, the core step by step."""
        h, _ = self.core.unroll(self._features(batch), batch, self.offset)
        return self._head(h, batch)

    def forward(self, batch: dict[str, Tensor]) -> Any:
        """The output of a step or, given ``memory_keep``, of whole chunks."""
        return self.sequence(batch) if KEEP in batch else self.step(batch)[0]


class RecurrentActor(_Recurrent):
    """An actor with memory: ``actor.features`` -> :class:`MemoryCore` -> ``actor.head``.

    Args:
        actor: a feed-forward actor with ``features(batch) -> [B, N, hidden]`` and ``head``.
        kind: ``gru`` or ``lstm``.
        hidden: the features' width.
        norm: layer-normalise the features before the core.
        out_norm: layer-normalise the core's output before the head.

    Shapes:
        - step: a batch ``[B, ...]`` with ``memory [B, N, S]`` (zeros when absent) ->
          the action distribution ``[B, N]`` and the next state ``[B, N, S]``.
        - sequence: ``L`` steps of ``b`` chunks flattened time-major (``[L * b, ...]``), the
          chunks' first states ``memory [b, N, S]`` and ``memory_keep [L, b, N]`` -> the
          distribution over ``[L * b, N]``.
    """

    def __init__(
        self, actor: nn.Module, kind: str, hidden: int, norm: bool = False, out_norm: bool = False
    ) -> None:
        super().__init__(kind, hidden, 0, norm, out_norm)
        self.actor: Any = actor

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        return self.actor.features(batch)  # type: ignore[no-any-return]

    def _head(self, h: Tensor, batch: dict[str, Tensor]) -> Distribution:
        return self.actor.head(h, batch.get("action_mask"))  # type: ignore[no-any-return]


class RecurrentCritic(_Recurrent):
    """A critic with memory: ``critic.features`` -> :class:`MemoryCore` -> ``critic.head``.

    Its state is ``memory[..., offset : offset + size]``: the columns after the actor's.

    Args:
        critic: a feed-forward critic with ``features(batch) -> [B, N, hidden]`` and
            ``head(h) -> [B, N]``.
        kind: ``gru`` or ``lstm``.
        hidden: the features' width.
        offset: where its state starts in ``batch["memory"]`` (the actor's state width).
        norm, out_norm: as :class:`RecurrentActor`.

    Shapes: as :class:`RecurrentActor`, with values ``[B, N]`` (``[L * b, N]``) in place of
    the distribution.
    """

    def __init__(
        self,
        critic: nn.Module,
        kind: str,
        hidden: int,
        offset: int = 0,
        norm: bool = False,
        out_norm: bool = False,
    ) -> None:
        super().__init__(kind, hidden, offset, norm, out_norm)
        self.critic: Any = critic

    def _features(self, batch: dict[str, Tensor]) -> Tensor:
        return self.critic.features(batch)  # type: ignore[no-any-return]

    def _head(self, h: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return self.critic.head(h)  # type: ignore[no-any-return]


class MemoryState:
    """An acting loop's memory of ``B`` envs: fed into each step, reset where episodes end.

    Feed-forward policies (``memory_size == 0``) pass through untouched.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.state: Tensor | None = None

    def feed(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with the state its agents enter this step with."""
        if not self.size:
            return batch
        if self.state is None:
            self.state = zero_state(batch["alive"], self.size)
        return {**batch, MEMORY: self.state}

    def advance(self, state: Tensor | None, done: Tensor, alive: Tensor) -> None:
        """Carry the state a step produced into the next.

        Zeroed for envs whose episode ended (``done [B]``) and for agents not alive in the
        next observation.
        """
        if not self.size or state is None:
            return
        keep = (~done).unsqueeze(-1) & alive.bool()
        self.state = state * keep.unsqueeze(-1).to(state.dtype)


def chunk_keep(terminated: Tensor, truncated: Tensor, alive: Tensor) -> Tensor:
    """``[T, B, N]``: where step ``t`` keeps step ``t - 1``'s recurrent state.

    Acting's own rule, for training: the env did not reset after ``t - 1`` and the agent is
    alive at ``t``. Row 0 is all true (a chunk's first step uses its stored state).
    """
    done = truncated | terminated.all(-1)  # [T, B]: the env reset after this step
    keep = torch.ones_like(alive, dtype=torch.bool)
    keep[1:] = (~done[:-1]).unsqueeze(-1) & alive[1:].bool()
    return keep
