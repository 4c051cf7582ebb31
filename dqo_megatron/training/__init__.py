"""Training: the forward step / loss contract and the optimizer step on Megatron's schedules."""

from dqo_megatron.training.step import (
    StepResult,
    attach_finalize,
    build_optimizer,
    lm_forward_step,
    lm_loss_func,
    train_step,
    wrap_with_ddp,
)

__all__ = ["StepResult", "attach_finalize", "build_optimizer", "lm_forward_step", "lm_loss_func",
           "train_step", "wrap_with_ddp"]  # fmt: skip
