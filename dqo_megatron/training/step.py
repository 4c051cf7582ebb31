"""One optimizer step on Megatron's terms, and the language-model forward step used by SFT and tests.

The contract (Megatron-Core's): `forward_step(data_iterator, model)` returns
`(output, partial(loss_func, batch))`, and `loss_func` returns `(loss_sum, token_count, metrics)`.
With `calculate_per_token_loss=True` Megatron's schedule sums token counts over micro-batches,
`finalize_model_grads` all-reduces them over data- and context-parallel ranks and divides the
gradients once by the global count. So the step is exactly the global token mean, whatever the
split into micro-batches, DP, CP or PP ranks; we never divide inside a micro-batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator, Sequence

import torch


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float
    """Global token-mean loss of the step (over all micro-batches and DP/CP ranks)."""
    tokens: int
    """Tokens that carried loss in the global batch."""
    grad_norm: float
    """Global gradient norm before clipping."""
    update_successful: bool
    """False when the step was not applied (NaN/inf loss, or the optimizer skipped it)."""
    metrics: dict = field(default_factory=dict)
    """Every metric of the loss function, reduced over micro-batches and ranks (numerator/denominator)."""
    grad_norms: dict = field(default_factory=dict)
    """Per-member gradient norms before clipping ({"policy": n, "value": n}) with per-member clipping."""


def wrap_with_ddp(chunks: Sequence[torch.nn.Module], grad_reduce_in_fp32: bool = True,
                  use_distributed_optimizer: bool = False) -> list:
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
    from megatron.core.optimizer import OptimizerConfig, ParamKey, get_megatron_optimizer
    from megatron.core.optimizer import get_standard_config_overrides

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
        "max_lr": lr if value_lr is None else value_lr, "min_lr": min_lr if value_min_lr is None else value_min_lr,
        MEMBER_KEY: "value",
    }  # fmt: skip
    return get_megatron_optimizer(opt_config, list(ddp_chunks), config_overrides=overrides)


MEMBER_KEY = "dqo_member"
"""Param-group key marking the value network's group ("value")."""


def _policy_value_scheduler_class():
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    class PolicyValueScheduler(OptimizerParamScheduler):
        """Megatron's scheduler, with its own warmup length and decay style for the value group.

        Megatron's `get_lr` reads max/min LR from each group but warmup and decay shape from the
        scheduler; for the value group we swap the shape in for the call.
        """

        def __init__(self, optimizer, *, value_shape: dict | None, policy_delay: int = 0,
                     adam_betas: tuple[float, float] | None = None, **kwargs):  # fmt: skip
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
                raise ValueError(f"the checkpoint's schedule has value.warmup_steps={saved}, this run "
                                 f"{self.policy_delay}: set value.warmup_steps={saved} to resume it")  # fmt: skip
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


def build_scheduler(optimizer, *, lr: float, min_lr: float, warmup_steps: int, decay_steps: int, decay_style: str,
                    weight_decay: float = 0.0, value_warmup_steps: int | None = None,
                    value_decay_style: str | None = None, policy_delay: int = 0,
                    adam_betas: tuple[float, float] | None = None):  # fmt: skip
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
            "lr_warmup_steps": v_warm, "lr_decay_style": value_decay_style or decay_style,
            "lr_decay_steps": max(decay_steps, v_warm + 1), "init_lr": 0.0,
        }  # fmt: skip
    if policy_delay and value_shape is None:  # the value group keeps the unshifted schedule
        value_shape = {"lr_warmup_steps": warmup_steps, "lr_decay_style": decay_style,
                       "lr_decay_steps": max(decay_steps, warmup_steps + 1), "init_lr": 0.0 if warmup_steps else lr}  # fmt: skip
    policy_decay = max(decay_steps - policy_delay, warmup_steps + 1)
    return _policy_value_scheduler_class()(
        optimizer, value_shape=value_shape, policy_delay=policy_delay, adam_betas=adam_betas if policy_delay else None,
        init_lr=0.0 if warmup_steps else lr, max_lr=lr,
        min_lr=min_lr, lr_warmup_steps=warmup_steps, lr_decay_steps=policy_decay, lr_decay_style=decay_style,
        start_wd=weight_decay, end_wd=weight_decay, wd_incr_steps=max(decay_steps, 1), wd_incr_style="constant",
    )  # fmt: skip


def attach_finalize(ddp_chunks: Sequence[torch.nn.Module], finalize: Callable | None = None) -> None:
    """Let Megatron's schedule finalize grads (DP/SP/embedding all-reduces, divide by token count).

    `finalize` defaults to Megatron's `finalize_model_grads`.
    """
    if finalize is None:
        from megatron.core.distributed import finalize_model_grads as finalize

    for chunk in ddp_chunks:
        _config_of(chunk).finalize_model_grads_func = finalize


def lm_loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Masked token-sum of the language-model loss.

    loss_mask, per_token_loss: ``[batch, seq]`` (per_token_loss = -log pi(label), from the model).
    Returns ``(loss_sum, token_count, {"lm loss": [loss_sum, token_count]})`` (Megatron's contract).
    """
    mask = loss_mask.float()
    loss_sum = (per_token_loss.float() * mask).sum()
    count = mask.sum().to(torch.int)
    return loss_sum, count, {"lm loss": torch.stack([loss_sum.detach(), count.float()])}


def lm_forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """Forward one micro-batch of ``{"tokens", "labels", "loss_mask", "position_ids"}`` (``[b, s]``).

    Under context parallelism the batch is first cut to this rank's load-balanced chunks.
    Returns ``(per_token_loss [b, s_local], partial(lm_loss_func, loss_mask))`` on the last stage.
    """
    batch = next(data_iterator)
    batch = slice_batch_for_context_parallel(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(lm_loss_func, batch["loss_mask"])


def microbatch_iterators(chunks: Sequence[torch.nn.Module], microbatches: list[dict]):
    """What Megatron's schedules take as `data_iterator`: one iterator, or one per model chunk under
    virtual pipeline parallelism (every chunk reads the same micro-batches)."""
    if len(chunks) == 1:
        return iter(microbatches)
    return [iter(list(microbatches)) for _ in chunks]


def model_inputs(batch: dict) -> dict:
    """tokens, position_ids, labels of a ``[b, s]`` micro-batch, cut to this context-parallel rank."""
    return slice_batch_for_context_parallel({k: batch[k] for k in ("tokens", "position_ids", "labels")})


def slice_batch_for_context_parallel(batch: dict) -> dict:
    """This CP rank's part of every ``[b, s]`` tensor (chunks r and 2*cp-1-r of 2*cp); identity at CP=1."""
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    if parallel_state.get_context_parallel_world_size() == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch), cp_group=parallel_state.get_context_parallel_group())


def train_step(
    ddp_chunks: Sequence[torch.nn.Module],
    optimizer,
    data_iterator: Iterator[dict] | list[Iterator[dict]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_step: Callable = lm_forward_step,
    metric_key: str = "lm loss",
    skip_nonfinite: bool = True,
    member_clips: dict[str, float] | None = None,
) -> StepResult:
    """Zero grads, run Megatron's forward/backward schedule over the micro-batches, step.

    `data_iterator` yields micro-batches for this data-parallel rank (a list of iterators, one per
    chunk, under virtual pipeline parallelism). `forward_step`'s metrics must include `metric_key`
    as ``[loss_sum, token_count]``; every metric is reduced the same way into `StepResult.metrics`.
    With `skip_nonfinite`, a step whose global loss is NaN/inf is not applied
    (``update_successful=False``): the weights stay as they were. `member_clips` ({"policy": c,
    "value": c}): clip each member's gradient by its own norm (`member_step.member_clipped_step`)
    instead of Megatron's one global clip; the norms land in `StepResult.grad_norms`.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=forward_step,
        data_iterator=data_iterator,
        model=list(ddp_chunks),
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    totals = reduce_metrics(losses)
    loss_sum, tokens = totals.get(metric_key, (float("nan"), 0.0))
    loss = loss_sum / max(tokens, 1)
    if skip_nonfinite and not math.isfinite(loss):
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        update_successful, grad_norm, grad_norms = False, float("nan"), {}
    elif member_clips is not None:
        from dqo_megatron.training.member_step import member_clipped_step

        update_successful, grad_norm, grad_norms = member_clipped_step(optimizer, member_clips)
    else:
        (update_successful, grad_norm, _), grad_norms = optimizer.step(), {}
    return StepResult(
        loss=loss,
        tokens=int(tokens),
        grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
        update_successful=bool(update_successful),
        metrics={k: num / den if den else float("nan") for k, (num, den) in totals.items()},
        grad_norms=grad_norms,
    )


def reduce_metrics(losses: list[dict]) -> dict[str, tuple[float, float]]:
    """Sum every ``[numerator, denominator]`` metric over micro-batches and DP/CP ranks, shared from the
    last pipeline stage. Returns ``{name: (numerator, denominator)}``, the same on every rank.

    Every rank must call it (collective). Names come from the last stage and are broadcast.
    """
    from megatron.core import parallel_state

    names = sorted({k for item in losses for k in item})
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        holder = [names if parallel_state.is_pipeline_last_stage() else None]
        last = torch.distributed.get_process_group_ranks(pp_group)[-1]
        torch.distributed.broadcast_object_list(holder, src=last, group=pp_group)
        names = holder[0]
    totals = torch.zeros(len(names), 2, dtype=torch.float64)
    for item in losses:
        for i, name in enumerate(names):
            totals[i] += item[name].detach().double().cpu().view(2)
    from dqo_megatron.parallel import device_for_this_process

    totals = totals.to(device_for_this_process())
    torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    # Only the last pipeline stage computed a loss; the others hold zeros: a sum shares it.
    torch.distributed.all_reduce(totals, group=pp_group)
    return {name: (float(totals[i, 0]), float(totals[i, 1])) for i, name in enumerate(names)}


def _config_of(module: torch.nn.Module):
    while not hasattr(module, "config") and hasattr(module, "module"):
        module = module.module
    return module.config
