"""Megatron's training machinery around our models: DDP wrapping, the optimizer (the value network's
parameter group with its own learning rate), the learning-rate scheduler (one schedule per member) and
the gradient-finalize hook. `step.py` runs one optimizer step with them.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dqo_megatron.parallel import unwrap
from dqo_megatron.training.member_step import MEMBER_KEY


def wrap_with_ddp(
    chunks: Sequence[torch.nn.Module], grad_reduce_in_fp32: bool = True, use_distributed_optimizer: bool = False
) -> list:
    """Wrap model chunks in Megatron's DistributedDataParallel (grads live in `param.main_grad`).

    Gradient reduction is not overlapped with backward (the CPU path cannot overlap; on GPU this is
    the trainer's choice). Only the first chunk uses bucketing, as in Megatron-LM.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return [
        DistributedDataParallel(config=_config_of(c), ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]


def build_optimizer(
    ddp_chunks: Sequence[torch.nn.Module],
    *,
    lr: float,
    clip_grad: float = 1.0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    min_lr: float = 0.0,
    value_lr: float | None = None,
    value_min_lr: float | None = None,
    use_distributed_optimizer: bool = False,
):
    """Megatron's optimizer over the DDP-wrapped chunks, in the chunks' precision (fp32 on CPU).

    Parameters marked as value parameters (`dqo_megatron.models.value_head.VALUE_HEAD_ATTR`: the value
    network and the value head) form their own group with peak `value_lr` (default `lr`); biases and
    norms get no weight decay (Megatron's standard groups).
    """
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer, get_standard_config_overrides

    from dqo_megatron.models.value_head import VALUE_HEAD_ATTR

    config = _config_of(ddp_chunks[0])
    opt_config = OptimizerConfig(
        optimizer=optimizer,
        lr=lr,
        min_lr=min_lr,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        clip_grad=clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    overrides = dict(get_standard_config_overrides(opt_config))
    # The value parameters always get a group of their own, tagged so the scheduler can give them
    # their own schedule (Megatron passes override keys through into the param group).
    overrides[ParamKey(attr=VALUE_HEAD_ATTR)] = {
        "max_lr": lr if value_lr is None else value_lr,
        "min_lr": min_lr if value_min_lr is None else value_min_lr,
        MEMBER_KEY: "value",
    }
    return get_megatron_optimizer(opt_config, list(ddp_chunks), config_overrides=overrides)


def _policy_value_scheduler_class():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class PolicyValueScheduler(OptimizerParamScheduler):
        """Megatron's scheduler, with its own warmup length and decay style for the value group.

        Megatron's `get_lr` reads max/min LR from each group but warmup and decay shape from the
        scheduler; for the value group we swap the shape in for the call.
        """

        def __init__(
            self,
            optimizer,
            *,
            value_shape: dict | None,
            policy_delay: int = 0,
            adam_betas: tuple[float, float] | None = None,
            **kwargs,
        ):
            self.value_shape = value_shape  # before super().__init__, which already calls get_lr
            self.policy_delay = policy_delay
            self.adam_betas = adam_betas
            super().__init__(optimizer, **kwargs)

        def get_lr(self, param_group: dict) -> float:
            if param_group.get(MEMBER_KEY) != "value":
                return self._policy_lr(param_group)
            if self.value_shape is None:
                return super().get_lr(param_group)
            names = tuple(self.value_shape)
            saved = {k: getattr(self, k) for k in names}
            try:
                for k in names:
                    setattr(self, k, self.value_shape[k])
                return super().get_lr(param_group)
            finally:
                for k, v in saved.items():
                    setattr(self, k, v)

        def state_dict(self) -> dict:
            return {**super().state_dict(), "policy_delay": self.policy_delay}

        def load_state_dict(self, state: dict) -> None:
            # Megatron checks its own fields; the critic warm-up shifts the policy's schedule, so a
            # checkpoint written with another value.warmup_steps cannot continue this one exactly.
            saved = int(state.get("policy_delay", 0))
            if saved != self.policy_delay:
                raise ValueError(
                    f"the checkpoint's schedule has value.warmup_steps={saved}, this run "
                    f"{self.policy_delay}: set value.warmup_steps={saved} to resume it"
                )
            super().load_state_dict({k: v for k, v in state.items() if k != "policy_delay"})

        def _policy_lr(self, param_group: dict) -> float:
            # Critic warm-up: the policy stands still for `policy_delay` steps, then runs its own
            # schedule as if it started there.
            if not self.policy_delay:
                return super().get_lr(param_group)
            if self.num_steps < self.policy_delay:
                return 0.0
            steps = self.num_steps
            try:
                self.num_steps = steps - self.policy_delay
                lr = super().get_lr(param_group)
            finally:
                self.num_steps = steps
            return lr * self._adam_restart(steps)

        def _adam_restart(self, steps: int) -> float:
            # During the warm-up Adam counted the policy's steps with zero gradients (Megatron's
            # checkpoints need one step count for all parameters), so at its k-th real step Adam
            # bias-corrects with t = delay + k instead of k: m/(1-b1^t) / sqrt(v/(1-b2^t)). Scaling
            # the LR by [(1-b1^t)/(1-b1^k)] * sqrt[(1-b2^k)/(1-b2^t)] makes the update exactly the one a
            # fresh Adam takes (up to eps). The LR set now is used by Adam's step t = steps + 1.
            if self.adam_betas is None:
                return 1.0
            b1, b2 = self.adam_betas
            t, k = steps + 1, steps - self.policy_delay + 1
            return (1 - b1**t) / (1 - b1**k) * math.sqrt((1 - b2**k) / (1 - b2**t))

    return PolicyValueScheduler


def build_scheduler(
    optimizer,
    *,
    lr: float,
    min_lr: float,
    warmup_steps: int,
    decay_steps: int,
    decay_style: str,
    weight_decay: float = 0.0,
    value_warmup_steps: int | None = None,
    value_decay_style: str | None = None,
    policy_delay: int = 0,
    adam_betas: tuple[float, float] | None = None,
):
    """Megatron's `OptimizerParamScheduler`: linear warmup, then constant/cosine/linear decay.

    The value group (see `build_optimizer`) has its own peak/final LR from its param group and,
    when `value_warmup_steps` / `value_decay_style` are given, its own warmup and decay style
    (decaying over the same `decay_steps`); otherwise it follows the policy's shape.
    `policy_delay` (the critic warm-up, `value.warmup_steps`): the policy's LR is 0 for that many
    steps, then its warmup and decay run over the remaining `decay_steps - policy_delay` steps; with
    `adam_betas` (the optimizer is Adam) its LR is also corrected for the warm-up steps Adam counted with
    zero gradients, so the policy's first steps are those of a fresh Adam.
    """
    value_shape = None
    if value_warmup_steps is not None or value_decay_style is not None:
        v_warm = warmup_steps if value_warmup_steps is None else value_warmup_steps
        value_shape = {
            "lr_warmup_steps": v_warm,
            "lr_decay_style": value_decay_style or decay_style,
            "lr_decay_steps": max(decay_steps, v_warm + 1),
            "init_lr": 0.0,
        }
    if policy_delay and value_shape is None:  # the value group keeps the unshifted schedule
        value_shape = {
            "lr_warmup_steps": warmup_steps,
            "lr_decay_style": decay_style,
            "lr_decay_steps": max(decay_steps, warmup_steps + 1),
            "init_lr": 0.0 if warmup_steps else lr,
        }
    policy_decay = max(decay_steps - policy_delay, warmup_steps + 1)
    return _policy_value_scheduler_class()(
        optimizer,
        value_shape=value_shape,
        policy_delay=policy_delay,
        adam_betas=adam_betas if policy_delay else None,
        init_lr=0.0 if warmup_steps else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=policy_decay,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
    )


def attach_finalize(ddp_chunks: Sequence[torch.nn.Module], finalize: Callable | None = None) -> None:
    """Let Megatron's schedule finalize grads (DP/SP/embedding all-reduces, divide by token count).

    `finalize` defaults to Megatron's `finalize_model_grads`.
    """
    if finalize is None:
        from megatron.core.distributed import finalize_model_grads as finalize

    for chunk in ddp_chunks:
        _config_of(chunk).finalize_model_grads_func = finalize


def _config_of(module: torch.nn.Module):
    return unwrap(module, lambda m: hasattr(m, "config"), "config").config
