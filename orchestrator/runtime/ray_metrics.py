"""shoal's metrics on Ray's metrics endpoint (and so in Prometheus, Grafana and the dashboard).

Ray exports these with a ``ray_`` prefix, counters with a ``_total`` suffix:
``ray_shoal_env_steps_total``, ``ray_shoal_episode_team_return`` and so on. Every series is
tagged with ``run_id`` and ``role`` (``learner``, ``rollout`` or ``driver``), which is what
``deploy/monitoring/grafana/shoal-dashboard.json`` filters on. With agent groups each group's
return is one more series of ``ray_shoal_group_return``, tagged with its ``group``.
"""

from __future__ import annotations

import math
from typing import Any

from ray.util.metrics import Counter, Gauge

TAG_KEYS = ("run_id", "role")

# Metric rows use these keys; each maps to one gauge (name, description).
GAUGES = {
    "env_steps_per_s": ("shoal_env_steps_per_second", "Env steps per second (one world step)"),
    "episode_return": ("shoal_episode_team_return", "Mean team return of finished episodes"),
    "policy_loss": ("shoal_policy_loss", "PPO clipped surrogate loss"),
    "value_loss": ("shoal_value_loss", "Value loss on normalised targets"),
    "entropy": ("shoal_entropy", "Mean policy entropy"),
    "weights_version": ("shoal_weights_version", "Weights version in use"),
    "weights_staleness": ("shoal_weights_staleness", "Versions between acting and latest"),
    "redis_rtt_ms": ("shoal_redis_rtt_ms", "Redis round-trip latency"),
    "wm_delta_mse": ("shoal_world_model_delta_mse", "World-model next-state error (scale units)"),
    "wm_reward_mse": ("shoal_world_model_reward_mse", "World-model reward error (scale units)"),
    "wm_holdout_delta_mse": (
        "shoal_world_model_holdout_delta_mse",
        "World-model next-state error on each new real batch, before training on it",
    ),
    "wm_holdout_reward_mse": (
        "shoal_world_model_holdout_reward_mse",
        "World-model reward error on each new real batch, before training on it",
    ),
    "wm_weights_version": ("shoal_world_model_weights_version", "World-model weights in use"),
    "wm_weights_staleness": (
        "shoal_world_model_weights_staleness",
        "World-model versions published beyond the ones imagined with",
    ),
    "imagined_share": ("shoal_imagined_share", "Share of PPO samples that were imagined"),
    "imagined_team_reward": ("shoal_imagined_team_reward", "Mean imagined team reward per step"),
    "real_team_reward": ("shoal_real_team_reward", "Mean real team reward per step"),
}
# Row keys that are running totals; each advances one counter (name, description).
COUNTERS = {
    "env_steps": ("shoal_env_steps", "Env steps collected"),
    "rollout_restarts": (
        "shoal_rollout_restarts",
        "Rollout worker restarts (lost batches are re-collected)",
    ),
}


# An agent group's return (row key ``return/<group>``), one series per group.
GROUP_GAUGE = ("shoal_group_return", "Mean return of an agent group in finished episodes")
GROUP_TAG_KEYS = (*TAG_KEYS, "group")


def exported_names() -> list[str]:
    """Every series name as Prometheus sees it (``ray_`` prefix, ``_total`` on counters)."""
    gauges = [f"ray_{name}" for name, _ in (*GAUGES.values(), GROUP_GAUGE)]
    return gauges + [f"ray_{name}_total" for name, _ in COUNTERS.values()]


class RayMetricsSink:
    """A ``MetricsSink`` that mirrors rows into ``ray.util.metrics``.

    Must be created inside a process connected to Ray (driver, learner rank or actor).

    Args:
        run_id: tags every series.
        role: ``learner``, ``rollout`` or ``driver``.
    """

    def __init__(self, run_id: str, role: str) -> None:
        self.tags = {"run_id": run_id, "role": role}
        self._gauges = {
            key: Gauge(name, description=desc, tag_keys=TAG_KEYS)
            for key, (name, desc) in GAUGES.items()
        }
        self._counters = {
            key: Counter(name, description=desc, tag_keys=TAG_KEYS)
            for key, (name, desc) in COUNTERS.items()
        }
        self._totals = dict.fromkeys(COUNTERS, 0.0)
        self._group = Gauge(GROUP_GAUGE[0], description=GROUP_GAUGE[1], tag_keys=GROUP_TAG_KEYS)

    def log(self, row: dict[str, Any]) -> None:
        """Set every gauge present in ``row`` and advance the counters to its totals."""
        for key, gauge in self._gauges.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        for key, value in row.items():
            if (
                key.startswith("return/")
                and isinstance(value, (int, float))
                and math.isfinite(value)
            ):
                self._group.set(float(value), tags={**self.tags, "group": key.split("/", 1)[1]})
        for key, counter in self._counters.items():
            total = float(row.get(key, self._totals[key]))
            if total > self._totals[key]:
                counter.inc(total - self._totals[key], tags=self.tags)
                self._totals[key] = total

    def close(self) -> None:
        """Nothing to flush: Ray exports on its own schedule."""
