"""The run config every process reads: typed sections (``sections``), loading (``loading``).

Import from here: ``from orchestrator.config import Config, load_config``.
"""

from orchestrator.config.loading import (
    apply_override,
    config_to_yaml,
    load_config,
    preset_names,
    redact_url,
)
from orchestrator.config.sections import (
    Config,
    ConfigError,
    EnvConfig,
    LearnerConfig,
    ModelConfig,
    RayConfig,
    RedisConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
    WorldModelConfig,
)

__all__ = [
    "Config",
    "ConfigError",
    "EnvConfig",
    "LearnerConfig",
    "ModelConfig",
    "RayConfig",
    "RedisConfig",
    "RolloutConfig",
    "RunConfig",
    "TrainConfig",
    "WorldModelConfig",
    "apply_override",
    "config_to_yaml",
    "load_config",
    "preset_names",
    "redact_url",
]
