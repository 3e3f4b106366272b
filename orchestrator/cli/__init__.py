"""What the user types: the ``shoal`` command line, one module per group of commands.

``main`` (the parser; run, eval, plot, presets, envs), ``status`` (status, stop), ``jobs``
(submit, jobs) with its Ray Jobs client ``jobs_client``, and ``evaluate`` (what ``shoal eval``
and ``shoal plot`` compute). The commands reach the runtime (``orchestrator.runtime``) and
Redis only when they run, so ``shoal --help`` and an in-process ``shoal run`` need neither
Ray nor Redis installed.
"""
