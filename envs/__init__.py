"""shoal envs: the batch-first ``VecMultiAgentEnv`` contract, native scenarios, adapters."""

from envs.base import EnvError, Observation, StepResult, VecMultiAgentEnv
from envs.registry import EnvSettings, available, make, register

__all__ = [
    "EnvError",
    "EnvSettings",
    "Observation",
    "StepResult",
    "VecMultiAgentEnv",
    "available",
    "make",
    "register",
]
