"""The configuration schema, re-exported from the modules that define it (kept so that
`from dqo_megatron.config.schema import X` goes on working; new code imports from `dqo_megatron.config`).

Every field has a docstring; `__post_init__` checks what can be checked locally and fills family
defaults (fields left as None). Checks that need the world size live in `RunConfig.validate_layout`.
The sections live in:

- `config/model.py`: `ModelConfig`, `ParallelConfig`, `FAMILY_DEFAULTS`, `validate_model_layout`,
  `data_parallel_size`;
- `config/precision.py`: `PrecisionConfig`, the FP8 recipes and `fp8_dimension_problems`;
- `config/training.py`: `TrainConfig`, `LossConfig`, `ValueConfig`, `MAX_LR`;
- `config/data.py`: `DataConfig`, `InitConfig`, `TrainEvalConfig`;
- `config/run.py`: `RunConfig`, which holds them all and checks what spans sections.
"""

from dqo_megatron.config.data import DataConfig, InitConfig, TrainEvalConfig
from dqo_megatron.config.loader import ConfigError
from dqo_megatron.config.model import (
    FAMILY_DEFAULTS,
    Family,
    ModelConfig,
    ParallelConfig,
    data_parallel_size,
    validate_model_layout,
)
from dqo_megatron.config.precision import FP8_DEFAULT_FORMAT, FP8_RECIPES, PrecisionConfig, fp8_dimension_problems
from dqo_megatron.config.run import RunConfig
from dqo_megatron.config.training import MAX_LR, LossConfig, TrainConfig, ValueConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "FAMILY_DEFAULTS",
    "FP8_DEFAULT_FORMAT",
    "FP8_RECIPES",
    "Family",
    "InitConfig",
    "LossConfig",
    "MAX_LR",
    "ModelConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RunConfig",
    "TrainConfig",
    "TrainEvalConfig",
    "ValueConfig",
    "data_parallel_size",
    "fp8_dimension_problems",
    "validate_model_layout",
]
