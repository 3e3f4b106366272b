"""shoal envs: the batch-first ``VecMultiAgentEnv`` contract, native scenarios, adapters."""

from envs.base import AgentInfo, EnvError, Observation, StepResult, VecMultiAgentEnv, name_group
from envs.registry import EnvSettings, available, make, register

__all__ = [
    "AgentInfo",
    "EnvError",
    "EnvSettings",
    "Observation",
    "StepResult",
    "VecMultiAgentEnv",
    "available",
    "make",
    "name_group",
    "register",
]
