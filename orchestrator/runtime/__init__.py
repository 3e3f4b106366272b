"""Where a run executes: one module per process, and what those processes share.

Processes: ``driver`` (what ``shoal run`` starts; ``ray_driver`` and ``placement`` are its
Ray side), ``learner`` (a learner rank: in-process or the actor ``shoal-learner-<r>``, running
``loop``), ``rollout`` (the rollout worker actor ``shoal-rollout-<i>``, and the rank's handle on
it). Shared: ``checkpoint``, ``metrics`` (and ``ray_metrics``), ``services`` (the run's Redis),
``rundir`` (the run directory's files).
"""
