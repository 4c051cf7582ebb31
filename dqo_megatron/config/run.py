"""`RunConfig`: every section of a run, and the checks that span sections.

Its `__post_init__` checks what the sections alone cannot (sequence lengths, FP8 alignment, the value
learning rate of the chosen algorithm, model against layout); `validate_layout` adds the world size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dqo_megatron.config.data import DataConfig, InitConfig, TrainEvalConfig
from dqo_megatron.config.loader import ConfigError, raise_problems
from dqo_megatron.config.model import ModelConfig, ParallelConfig, data_parallel_size, validate_model_layout
from dqo_megatron.config.precision import PrecisionConfig, fp8_dimension_problems
from dqo_megatron.config.training import MAX_LR, LossConfig, TrainConfig, ValueConfig


@dataclass
class RunConfig:
    """Everything a run needs; written, resolved, into the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Model parallel layout."""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    """Numerical formats."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batching and optimization."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    init: InitConfig = field(default_factory=InitConfig)
    """Initial weights."""
    algorithm: str = "dqo"
    """What to train: dqo (default), or a baseline: dro, dpo, kto, sft, rs (rejection sampling); any name
    registered in `dqo_megatron.algorithms` (docs/algorithms.md, "Adding an algorithm")."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss coefficients."""
    value: ValueConfig = field(default_factory=ValueConfig)
    """The value network (dqo, dro)."""
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    """Held-out accuracy during training and checkpoint selection."""
    run_dir: Optional[str] = None
    """Where logs, checkpoints and the resolved config go (None: nothing is written)."""

    def __post_init__(self) -> None:
        from dqo_megatron.algorithms import get, names

        problems = []
        if self.algorithm not in names():
            problems.append(f"algorithm={self.algorithm!r}: choose one of {', '.join(names())}")
        elif get(self.algorithm).needs_value and self.value.resolved_lr(self.train.lr) > MAX_LR:
            problems.append(
                f"the value network's learning rate {self.value.resolved_lr(self.train.lr):g} (value.lr, "
                f"else value.lr_ratio={self.value.lr_ratio:g} x train.lr={self.train.lr:g}) is above {MAX_LR}"
            )
        if self.train.micro_batch_tokens is not None and self.algorithm in names():
            problems += self._micro_batch_tokens_problems(get(self.algorithm).batch_mode)
        if self.train.seq_length > self.model.seq_length:
            problems.append(
                f"train.seq_length={self.train.seq_length} exceeds model.seq_length={self.model.seq_length}"
            )
        problems += fp8_dimension_problems(
            self.precision, self.model, self.parallel, self.train.micro_batch_size, self.train.seq_length
        )
        if self.precision.fp8_param and not self.train.distributed_optimizer:
            # Megatron's plain mixed-precision optimizer has no FP8-parameter path; the distributed
            # optimizer keeps fp32 main weights and re-quantizes its shard (Megatron-LM requires it too).
            problems.append("precision.fp8_param=true needs train.distributed_optimizer=true")
        raise_problems(problems)
        validate_model_layout(self.model, self.parallel, self.train.seq_length)

    def validate_layout(self, world_size: int) -> int:
        """Check the layout against `world_size`; return the data-parallel size."""
        dp = data_parallel_size(self.parallel, world_size)
        per_step = self.train.micro_batch_size * dp
        if self.train.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={self.train.global_batch_size} must be a multiple of "
                f"train.micro_batch_size={self.train.micro_batch_size} x data-parallel size {dp} "
                f"(= world size {world_size} / (TP*PP*CP))"
            )
        pp, draws = self.parallel.pipeline_model_parallel_size, self.train.global_batch_size // per_step
        if self.parallel.virtual_pipeline_model_parallel_size is not None and draws % pp:
            # Megatron's interleaved schedule runs a step's micro-batches in whole groups of PP
            # (micro-batches by tokens are split up to a multiple of PP, which needs as many draws)
            raise ConfigError(
                f"parallel.virtual_pipeline_model_parallel_size: Megatron's interleaved schedule needs the "
                f"micro-batches of a step in groups of pipeline_model_parallel_size={pp}, and "
                f"train.global_batch_size={self.train.global_batch_size} / (train.micro_batch_size="
                f"{self.train.micro_batch_size} x data-parallel size {dp}) = {draws} is not a multiple of {pp}"
            )
        return dp

    def _micro_batch_tokens_problems(self, batch_mode: str) -> list[str]:
        tokens, seq = self.train.micro_batch_tokens, self.train.seq_length
        problems = []
        if batch_mode == "kto" and tokens < 2 * self.train.micro_batch_size * seq:
            # a KL group (micro_batch_size documents and their mismatched rows) stays in one
            # micro-batch, and each of its documents can need a row of its own
            problems.append(
                f"train.micro_batch_tokens={tokens}: algorithm={self.algorithm} keeps each KL group (the "
                f"train.micro_batch_size={self.train.micro_batch_size} documents of a padded micro-batch and "
                f"their mismatched rows) in one micro-batch, which can need {2 * self.train.micro_batch_size} "
                f"rows: give at least 2 x micro_batch_size x seq_length = {2 * self.train.micro_batch_size * seq}"
            )
        if batch_mode == "pairs" and tokens < 2 * seq:
            # a pair stays in one micro-batch, and two documents of up to seq_length + 1 tokens can need
            # two rows: with fewer, a long pair would stop the run at whichever step draws it
            problems.append(
                f"train.micro_batch_tokens={tokens}: algorithm={self.algorithm} keeps each (chosen, rejected) "
                f"pair in one micro-batch, which can need two rows: give at least 2 x train.seq_length = {2 * seq}"
            )
        return problems

    def num_microbatches(self, world_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        dp = self.validate_layout(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)
