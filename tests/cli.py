"""Run the ``shoal`` command line in a child process, as a user's shell would."""

from __future__ import annotations

import subprocess
import sys


def shoal(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``shoal ARGS...`` with stdout and stderr captured (pipes, not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
