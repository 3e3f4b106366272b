"""Where shoal runs: ``config``, ``cli`` (what the user types), ``runtime`` (a run's processes)."""
