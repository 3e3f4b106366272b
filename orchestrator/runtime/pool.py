"""Self-play opponent pools: past versions of an agent group, drawn for it to play with.

Runs in the learner process (every rank). A group with ``groups.<name>.pool.size > 0`` is
snapshotted into its pool every ``pool.every`` updates; after each snapshot every rank draws
the same past version (a generator seeded by the run's seed and the update count) and loads it
into the policy's past copy of the group (``GroupedActorCritic.load_past``), which is then
published with the weights, so rollout workers act with it too.

Each pool is held by every rank in memory and saved in checkpoints (a resumed run plays the
same past versions); rank 0 also keeps it in Redis as ``shoal:{run}:pool-<group>:<version>``,
versioned and checksummed like the weights (``agents.memory.WeightStore``; never pickled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from policies.groups import GroupedActorCritic

if TYPE_CHECKING:
    from agents.memory import WeightStore

POOL_PREFIX = "pool-"


class OpponentPool:
    """The last ``size`` versions of one group, by weights version.

    Args:
        group: the group's name.
        size: versions kept.
        store: rank 0's Redis copy (``None``: memory and checkpoints only).
    """

    def __init__(self, group: str, size: int, store: WeightStore | None = None) -> None:
        self.group, self.size, self.store = group, size, store
        self.versions: dict[int, dict[str, Tensor]] = {}

    def add(self, version: int, state: dict[str, Tensor]) -> None:
        """Keep ``state`` as ``version``, dropping the oldest past ``size``."""
        self.versions[version] = {k: v.detach().cpu().clone() for k, v in state.items()}
        for old in sorted(self.versions)[: max(0, len(self.versions) - self.size)]:
            del self.versions[old]
        if self.store is not None:
            self.store.publish(self.versions[version], version)

    def draw(self, generator: torch.Generator) -> tuple[int, dict[str, Tensor]]:
        """A version drawn uniformly, and its weights."""
        keys = sorted(self.versions)
        pick = keys[int(torch.randint(len(keys), (1,), generator=generator))]
        return pick, self.versions[pick]

    def state_dict(self) -> dict[str, Any]:
        """Every kept version, for checkpoints."""
        return {str(v): s for v, s in self.versions.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (and mirror it to Redis)."""
        self.versions = {}
        for v in sorted(state, key=int):
            self.add(int(v), state[v])


class SelfPlay:
    """Every pooled group's pool, and the schedule that fills and draws from them.

    Args:
        model: the run's policy; only its groups with a past version take part.
        pools: group name -> ``(size, every)``.
        seed: the run's seed (every rank draws the same versions).
        store_for: on rank 0 with Redis, builds a group's Redis store.
    """

    def __init__(
        self,
        model: GroupedActorCritic,
        pools: dict[str, tuple[int, int]],
        seed: int,
        store_for: Any = None,
    ) -> None:
        self.model, self.seed = model, seed
        self.every = {g: every for g, (_, every) in pools.items()}
        self.pools = {
            g: OpponentPool(g, size, store_for(g) if store_for else None)
            for g, (size, _) in pools.items()
        }
        self.playing: dict[str, int] = {}  # the version each group's past copy acts with

    def start(self, version: int) -> None:
        """An empty pool starts with the group as it is now."""
        for g, pool in self.pools.items():
            if not pool.versions:
                pool.add(version, self.model.snapshot(g))
            self._draw(g, updates=0)

    def after_update(self, updates: int, version: int) -> None:
        """Every ``every`` updates: snapshot the group, then draw its next past version."""
        for g, pool in self.pools.items():
            if updates % self.every[g] == 0:
                pool.add(version, self.model.snapshot(g))
                self._draw(g, updates)

    def _draw(self, group: str, updates: int) -> None:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + updates)
        version, state = self.pools[group].draw(gen)
        device = next(self.model.parameters()).device
        self.model.load_past(group, {k: v.to(device) for k, v in state.items()})
        self.playing[group] = version

    def stats(self, version: int) -> dict[str, float]:
        """Per group: versions in the pool and the age (in versions) of the one playing."""
        out = {}
        for g, pool in self.pools.items():
            out[f"pool_size/{g}"] = float(len(pool.versions))
            out[f"pool_age/{g}"] = float(version - self.playing.get(g, version))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every pool, for checkpoints."""
        return {g: p.state_dict() for g, p in self.pools.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the pools a checkpoint saved."""
        for g, saved in state.items():
            if g in self.pools:
                self.pools[g].load_state_dict(saved)
