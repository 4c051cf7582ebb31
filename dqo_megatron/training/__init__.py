"""Training: `train` (the loop, `trainer.py`) and the pieces it is built from - the forward step / loss
contract and one optimizer step on Megatron's schedules (`step.py`), DDP / optimizer / scheduler
(`megatron_setup.py`)."""

from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, build_scheduler, wrap_with_ddp
from dqo_megatron.training.step import StepResult, lm_forward_step, lm_loss_func, train_step
from dqo_megatron.training.trainer import TrainSummary, train

__all__ = [
    "StepResult",
    "TrainSummary",
    "attach_finalize",
    "build_optimizer",
    "build_scheduler",
    "lm_forward_step",
    "lm_loss_func",
    "train",
    "train_step",
    "wrap_with_ddp",
]
