"""A learner rank's records: metrics rows, update traces, checkpoint sections, self-play pools.

The metrics row with its group returns; the algorithm's per-update trace; what a checkpoint
holds besides the model and the algorithm (the world model, the self-play pool).

Runs in the learner process (every rank computes its share; rank 0's row is the one logged).
What is summed here is summed over ranks by the caller (the rank's transport), so the row is
the learner group's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from agents.rollout import RolloutBatch
from agents.world_model import Practice
from orchestrator.config import Config
from orchestrator.runtime import world
from orchestrator.runtime.pool import SelfPlay
from policies.actor_critic import Policy
from policies.groups import GroupedActorCritic


def self_play_for(cfg: Config, model: Policy) -> SelfPlay | None:
    """The opponent pools of the groups that have one (``groups.<name>.pool``), else ``None``."""
    pools = {name: (g.pool.size, g.pool.every) for name, g in cfg.groups.items() if g.pool.size}
    if not pools:
        return None
    assert isinstance(model, GroupedActorCritic)
    return SelfPlay(model, pools, cfg.train.seed)


def extra_state(practice: Practice | None, self_play: SelfPlay | None) -> dict[str, Any]:
    """A checkpoint's sections beside the model and the algorithm: ``world_model``, ``pool``."""
    extra: dict[str, Any] = {}
    if practice is not None:
        extra["world_model"] = world.state_dict(practice)
    if self_play is not None:
        extra["pool"] = self_play.state_dict()
    return extra


def restore_extra(
    extra: dict[str, Any], practice: Practice | None, self_play: SelfPlay | None
) -> None:
    """Restore what :func:`extra_state` saved, section by section where there is one."""
    if self_play is not None and "pool" in extra:
        self_play.load_state_dict(extra["pool"])
    if practice is not None and "world_model" in extra:
        world.load_state_dict(practice, extra["world_model"])


def group_return_sums(model: Policy, batch: RolloutBatch) -> dict[str, float]:
    """Each agent group's return summed over the batch's finished episodes.

    A group's return is the sum of its agents' own returns; ``{}`` without groups.
    """
    groups = getattr(model, "groups", None)
    if not groups:
        return {}
    per_agent = batch.episode_agent_returns
    out = {}
    for g in groups:
        if per_agent is None or not per_agent.numel():
            out[g.name] = 0.0
        else:
            out[g.name] = float(per_agent[:, list(g.agents)].sum())
    return out


def local_sums(
    model: Policy, batch: RolloutBatch, rollout_stats: dict[str, float]
) -> tuple[list[float], list[str]]:
    """This rank's sums for the row (to be summed over ranks) and the group names they end with.

    Order: env steps, the run's return summed over finished episodes (with groups: the trained
    groups' returns), their lengths, their count, rollout restarts, batches re-collected, then
    one return sum per group.
    """
    ep = batch.episode_returns
    group_sums = group_return_sums(model, batch)
    if group_sums:  # grouped: the run's return is that of the groups it trains
        trained = {g.name: g.train for g in getattr(model, "groups", [])}
        ep_sum = sum(v for name, v in group_sums.items() if trained[name])
    else:
        ep_sum = float(ep.sum()) if ep.numel() else 0.0
    sums = [
        float(batch.env_steps),
        ep_sum,
        float(batch.episode_lengths.float().sum()) if ep.numel() else 0.0,
        float(ep.numel()),
        rollout_stats["rollout_restarts"],
        rollout_stats["batches_recollected"],
        *group_sums.values(),
    ]
    return sums, list(group_sums)


def iteration_row(
    sums: list[float],
    groups: list[str],
    stats: dict[str, float],
    counters: dict[str, Any],
    timings: dict[str, float],
) -> tuple[int, dict[str, float]]:
    """The env steps of the iteration and its metrics row, from the all-rank ``sums``.

    Advances the counters of rollout restarts and re-collected batches.

    Args:
        sums: :func:`local_sums`' list, summed over ranks.
        groups: the group names its tail belongs to.
        stats: the algorithm's (and the world model's, self-play's) statistics.
        counters: the run's counters (updated in place).
        timings: ``weights_version``, ``weights_staleness``, ``collect_s``, ``update_s``,
            ``weights_fetch_s``.
    """
    env_steps, ret_sum, len_sum, episodes, restarts, recollected, *per_group = sums
    counters["rollout_restarts"] += int(restarts)
    counters["batches_recollected"] += int(recollected)

    def per_episode(value: float) -> float:
        return value / episodes if episodes else math.nan

    row = {
        "episode_return": per_episode(ret_sum),
        "episode_length": per_episode(len_sum),
        "episodes": episodes,
        **{f"return/{g}": per_episode(v) for g, v in zip(groups, per_group, strict=True)},
        **stats,
        "weights_version": timings["weights_version"],
        "weights_staleness": timings["weights_staleness"],
        "rollout_restarts": float(counters["rollout_restarts"]),
        "batches_recollected": float(counters["batches_recollected"]),
        "learner_restarts": float(counters["learner_restarts"]),
        "collect_s": timings["collect_s"],
        "update_s": timings["update_s"],
        "weights_fetch_s": timings["weights_fetch_s"],
    }
    return int(env_steps), row


def write_trace(run_dir: Path, trace: list[dict[str, Any]], env_steps: int) -> None:
    """Append an algorithm's per-update records to ``updates.jsonl`` (``run.update_log``)."""
    with open(run_dir / "updates.jsonl", "a") as fh:
        for record in trace:
            fh.write(json.dumps({"env_steps": env_steps, **record}) + "\n")
    trace.clear()
