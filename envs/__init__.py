"""shoal envs: the batch-first ``VecMultiAgentEnv`` contract, native scenarios, adapters."""

from envs.base import Observation, StepResult, VecMultiAgentEnv
from envs.registry import available, make, register

__all__ = ["Observation", "StepResult", "VecMultiAgentEnv", "available", "make", "register"]
