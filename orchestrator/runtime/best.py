"""Rank 0's periodic evaluation, and the best checkpoint it keeps (``checkpoints/best``).

A run's last checkpoint is not always its best: PPO can fall back after a peak. Every
``run.eval_every_s`` rank 0 plays ``run.eval_episodes`` episodes of the run's own env with the
current weights (one batched rollout on a vectorised env) and, when the mean team return beats
the best so far (with agent groups: the return of the groups being trained, each group's
return logged beside it), writes the checkpoint ``best`` beside the ``step-*`` ones.
``shoal eval RUN`` uses it unless told ``--which latest``; ``--resume`` always continues from
the latest.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agents.rollout import agent_returns
from orchestrator.config import config_to_yaml
from orchestrator.runtime.checkpoint import BEST, save_checkpoint

if TYPE_CHECKING:
    from orchestrator.runtime.learner import LearnerRank

# Evaluations replay the same episodes, so that two of them differ only by the weights.
EVAL_SEED = 2_000_003


class BestTracker:
    """The best evaluated return so far; :meth:`improved` says whether a new one beats it.

    Args:
        best: the best of an earlier session (a resumed run keeps its best checkpoint).
    """

    def __init__(self, best: float = -math.inf) -> None:
        self.best = best

    def improved(self, value: float) -> bool:
        """True (and ``value`` is the new best) when ``value`` is finite and above the best."""
        if math.isfinite(value) and value > self.best:
            self.best = value
            return True
        return False

    @classmethod
    def of_run(cls, run_dir: Path) -> BestTracker:
        """The tracker a run continues with: its best checkpoint's return, if it has one."""
        meta = run_dir / "checkpoints" / BEST / "meta.json"
        if meta.is_file():
            return cls(float(json.loads(meta.read_text()).get("eval_return", -math.inf)))
        return cls()


def periodic_evaluation(rank: LearnerRank) -> Callable[[], dict[str, float]] | None:
    """The evaluation ``run_loop`` calls on rank 0; ``None`` when evaluation is off.

    Off means neither ``run.eval_every_s`` nor ``run.eval_every_steps`` is set.

    Returns:
        A function returning ``eval_return`` (this evaluation's mean team return),
        ``best_eval_return`` and ``eval_s`` (seconds it played), having written
        ``checkpoints/best`` when ``eval_return`` is a new best.
    """
    cfg = rank.cfg
    if cfg.run.eval_every_s is None and cfg.run.eval_every_steps is None:
        return None
    n = cfg.run.eval_episodes
    env = cfg.env.make(n, EVAL_SEED, rank.device)
    best = BestTracker.of_run(rank.run_dir)

    def evaluate() -> dict[str, float]:
        t0 = time.perf_counter()
        per_agent = agent_returns(rank.model, env, n, seed=EVAL_SEED)
        eval_s = time.perf_counter() - t0
        groups = getattr(rank.model, "groups", [])
        per_group = {g.name: float(per_agent[:, list(g.agents)].sum(-1).mean()) for g in groups}
        # With agent groups the run's return is that of the groups it trains.
        trained = [i for g in groups if g.train for i in g.agents]
        value = float((per_agent[:, trained] if groups else per_agent).sum(-1).mean())
        if best.improved(value):
            save_checkpoint(
                rank.run_dir / "checkpoints",
                model=rank.model,
                learner_state=rank.learner.state_dict(),
                counters=dict(rank.counters),
                config_yaml=config_to_yaml(cfg),
                name=BEST,
                meta={"eval_return": value, "eval_episodes": n, "eval_env": cfg.env.name},
            )
            if rank.mirror is not None:
                rank.mirror.push()
        columns = {f"eval_return/{name}": v for name, v in per_group.items()}
        return {"eval_return": value, **columns, "best_eval_return": best.best, "eval_s": eval_s}

    return evaluate
