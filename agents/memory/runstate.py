"""Run state in Redis: status, heartbeats, latest metrics and the stop flag of each run.

:func:`list_runs` lists the runs that recorded state, for ``shoal status``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import redis

from agents.memory.client import Client, _caller
from agents.memory.keys import RUNS_KEY, key

__all__ = ["RunState", "list_runs"]

_STATE_FIELDS = frozenset({"status", "started", "updated", "metrics", "config", "stop_requested"})


class RunState:
    """Status, heartbeats, latest metrics and the stop flag of one run.

    ``shoal status`` and ``shoal stop`` use this from any machine that reaches Redis.

    Args:
        client: A client from :func:`connect` (or a plain ``redis.Redis``).
        run_id: The run's id; keys are ``shoal:{run_id}:state`` and ``:heartbeats``.
    """

    def __init__(self, client: Client, run_id: str) -> None:
        self.run_id = run_id
        self.key = key(run_id, "state")
        self._heartbeats_key = key(run_id, "heartbeats")
        self._call = _caller(client)

    def _write(self, fields: Mapping[str, Any]) -> None:
        mapping: dict[Any, Any] = {name: json.dumps(value) for name, value in fields.items()}
        mapping["updated"] = json.dumps(time.time())

        def write(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.hsetnx(self.key, "started", mapping["updated"])
            pipe.hset(self.key, mapping=mapping)
            pipe.sadd(RUNS_KEY, self.run_id)
            pipe.execute()

        self._call(write)

    def set_status(self, status: str, **fields: Any) -> None:
        """Set the status (e.g. ``"running"``) and any extra JSON-serialisable fields."""
        clash = _STATE_FIELDS & fields.keys()
        if clash:
            raise ValueError(f"{sorted(clash)} are reserved run-state fields")
        self._write({"status": status, **fields})

    def set_config(self, summary: Mapping[str, Any]) -> None:
        """Record a JSON-serialisable summary of the run's config."""
        self._write({"config": dict(summary)})

    def set_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Replace the latest metrics (a JSON-serialisable mapping)."""
        self._write({"metrics": dict(metrics)})

    def heartbeat(self, actor_name: str) -> None:
        """Record that ``actor_name`` is alive now (unix time)."""
        self._call(lambda r: r.hset(self._heartbeats_key, actor_name, time.time()))

    def request_stop(self) -> None:
        """Ask the run to stop at its next check."""
        self._write({"stop_requested": True})

    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called."""
        value = self._call(lambda r: r.hget(self.key, "stop_requested"))
        return value is not None and json.loads(value) is True

    def get(self) -> dict[str, Any]:
        """Everything known about the run.

        Returns:
            ``{"run_id", "status", "started", "updated", "config", "metrics",
            "stop_requested", "heartbeats": {actor: unix_time}, **extra_fields}``.

        Raises:
            LookupError: If Redis holds nothing for this run.
        """

        def read(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.hgetall(self.key)
            pipe.hgetall(self._heartbeats_key)
            return pipe.execute()

        state, beats = self._call(read)
        if not state and not beats:
            raise LookupError(f"no run {self.run_id!r} in Redis")
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "status": None,
            "started": None,
            "updated": None,
            "config": {},
            "metrics": {},
            "stop_requested": False,
        }
        for name, value in state.items():
            out[name.decode()] = json.loads(value)
        out["heartbeats"] = {name.decode(): float(value) for name, value in beats.items()}
        return out


def list_runs(client: Client) -> list[str]:
    """Ids of the runs that recorded state in this Redis, sorted."""
    members = _caller(client)(lambda r: r.smembers(RUNS_KEY))
    return sorted(m.decode() if isinstance(m, bytes) else m for m in members)
