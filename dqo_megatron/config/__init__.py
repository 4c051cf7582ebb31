"""Typed configuration: dataclasses with a docstring under each field, YAML + overrides."""

from dqo_megatron.config.data import DataConfig, InitConfig, TrainEvalConfig
from dqo_megatron.config.loader import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_config,
    save_config,
    to_dict,
)
from dqo_megatron.config.model import (
    FAMILY_DEFAULTS,
    ModelConfig,
    ParallelConfig,
    data_parallel_size,
    validate_model_layout,
)
from dqo_megatron.config.precision import PrecisionConfig
from dqo_megatron.config.run import RunConfig
from dqo_megatron.config.training import LossConfig, TrainConfig, ValueConfig

__all__ = [
    "ConfigError",
    "apply_overrides",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
    "FAMILY_DEFAULTS",
    "InitConfig",
    "DataConfig",
    "LossConfig",
    "ValueConfig",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "TrainConfig",
    "TrainEvalConfig",
    "data_parallel_size",
    "validate_model_layout",
]
