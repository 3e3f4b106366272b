"""The key namespace: every key of a run lives under ``shoal:{run_id}:``.

:func:`key` builds those keys and enforces the run-id rule; :data:`RUNS_KEY` is the one key
outside any run, the set of run ids that recorded state.
"""

from __future__ import annotations

import re

__all__ = ["RUNS_KEY", "key"]

RUNS_KEY = "shoal:runs"

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def key(run_id: str, *parts: str | int) -> str:
    """The Redis key ``shoal:{run_id}:{part}:...``.

    Raises:
        ValueError: If ``run_id`` is empty, too long, or has characters outside
            ``[A-Za-z0-9._-]`` (a colon would make keys ambiguous).
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise ValueError(
            f"run_id {run_id!r} must be 1-128 characters from [A-Za-z0-9._-], starting "
            "with a letter or digit"
        )
    return ":".join(("shoal", run_id, *map(str, parts)))
