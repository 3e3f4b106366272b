"""shoal's metrics on Ray's metrics endpoint (and so in Prometheus, Grafana and the dashboard).

Ray exports these with a ``ray_`` prefix, counters with a ``_total`` suffix:
``ray_shoal_env_steps_total``, ``ray_shoal_episode_team_return`` and so on. Every series is
tagged with ``run_id`` and ``role`` (``learner``, ``rollout`` or ``driver``), which is what
``deploy/monitoring/grafana/shoal-dashboard.json`` filters on.
"""

from __future__ import annotations

import math
from typing import Any

from ray.util.metrics import Counter, Gauge

TAG_KEYS = ("run_id", "role")

# Metric rows use these keys; each maps to one gauge (name, description).
_GAUGES = {
    "env_steps_per_s": ("shoal_env_steps_per_second", "Env steps per second (one world step)"),
    "episode_return": ("shoal_episode_team_return", "Mean team return of finished episodes"),
    "policy_loss": ("shoal_policy_loss", "PPO clipped surrogate loss"),
    "value_loss": ("shoal_value_loss", "Value loss on normalised targets"),
    "entropy": ("shoal_entropy", "Mean policy entropy"),
    "weights_version": ("shoal_weights_version", "Weights version in use"),
    "weights_staleness": ("shoal_weights_staleness", "Versions between acting and latest"),
    "redis_rtt_ms": ("shoal_redis_rtt_ms", "Redis round-trip latency"),
}


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
            for key, (name, desc) in _GAUGES.items()
        }
        self._steps = Counter(
            "shoal_env_steps", description="Env steps collected", tag_keys=TAG_KEYS
        )
        self._restarts = Counter(
            "shoal_rollout_restarts",
            description="Rollout worker restarts (lost batches are re-collected)",
            tag_keys=TAG_KEYS,
        )
        self._last_steps = 0.0
        self._last_restarts = 0.0

    def log(self, row: dict[str, Any]) -> None:
        """Set every gauge present in ``row`` and advance the counters to its totals."""
        for key, gauge in self._gauges.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                gauge.set(float(value), tags=self.tags)
        steps = float(row.get("env_steps", self._last_steps))
        if steps > self._last_steps:
            self._steps.inc(steps - self._last_steps, tags=self.tags)
            self._last_steps = steps
        restarts = float(row.get("rollout_restarts", self._last_restarts))
        if restarts > self._last_restarts:
            self._restarts.inc(restarts - self._last_restarts, tags=self.tags)
            self._last_restarts = restarts

    def close(self) -> None:
        """Nothing to flush: Ray exports on its own schedule."""
