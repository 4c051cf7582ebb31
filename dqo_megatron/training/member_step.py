"""The optimizer step with one gradient-norm clip per member (policy, value network).

Why not Megatron's own clip: `MegatronOptimizer.step` (and `ChainedOptimizer.step`) compute ONE norm
over every parameter and scale all gradients by `clip / norm`. DQO trains two networks with losses of
very different scale: on the demo the value network's gradient norm is 2-6 while the policy's is
0.006-0.03, so a shared clip at 1.0 shrank the policy's step by 0.16-0.48x on every step, by an amount
the value loss decided. Here each member m gets its own norm and its own clip:

    g_m <- g_m * min(1, clip_m / (||g_m|| + 1e-6))        ||g_m|| over the member's parameters only

and the reported norms are ||g_policy||, ||g_value|| and the total sqrt(sum_m ||g_m||^2).

It reuses Megatron's step in three public pieces (the ones `ChainedOptimizer` composes):
`prepare_grads` (main grads into the fp32 main parameters, unscale, inf check), the per-member norm and
clip (Megatron's `get_grad_norm_fp32` / `clip_grad_by_total_norm_fp32`, which all-reduce over the
optimizer's gradient-statistics group, so tensor/pipeline shards and the distributed optimizer's
data-parallel shards are counted once), then `step_with_ready_grads`. Membership comes from the param
groups: `build_optimizer` tags the value network's groups with ``MEMBER_KEY = "value"``; everything
else is the policy (in value mode "shared" that includes the trunk the value loss also trains).
"""

from __future__ import annotations

import math

import torch

MEMBER_KEY = "dqo_member"
"""Param-group key marking the value network's group ("value"; the optimizer setup tags it)."""

MEMBERS = ("policy", "value")
"""Members in the fixed order every rank reduces their norms in (a rank may hold none of a member's
parameters, e.g. the value head off the last pipeline stage: it still takes part in the all-reduce)."""


def member_of(param_group: dict) -> str:
    """ "value" for the value network's param groups, else "policy"."""
    return param_group.get(MEMBER_KEY) or "policy"


def _counted(param, tp_group) -> bool:
    # A parameter shared between stages (tied embeddings) or replicated across tensor-parallel ranks
    # (norms, biases of row-parallel layers) must enter the norm once, as in Megatron's own norm.
    from megatron.core import tensor_parallel
    from megatron.core.transformer.module import param_is_not_shared

    return param_is_not_shared(param) and tensor_parallel.param_is_not_tensor_parallel_duplicate(param, tp_group)


def _members_params(optimizer) -> tuple[dict[str, list], dict[str, list], object]:
    """{member: main params}, {member: grads counted in its norm}, the grad-stats process group."""
    params = {m: [] for m in MEMBERS}
    grads = {m: [] for m in MEMBERS}
    group = None
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(sub, "is_stub_optimizer", False):
            continue
        group = sub.get_grad_stats_parallel_group() if group is None else group
        tp_group = getattr(sub, "tp_group", None)
        for param_group in sub.optimizer.param_groups:
            member = member_of(param_group)
            for param in param_group["params"]:
                params[member].append(param)
                if param.grad is not None and _counted(param, tp_group):
                    grads[member].append(param.grad)
    return params, grads, group


def _check_supported(optimizer) -> None:
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    if any(getattr(sub.config, "use_precision_aware_optimizer", False) for sub in subs):
        raise NotImplementedError(
            "per-member clipping reads param.grad; Megatron's precision-aware optimizer "
            "keeps decoupled grads: not supported"
        )
    if len(subs) > 1 and not optimizer.grads_states_parallel_group_is_shared():
        raise NotImplementedError("per-member clipping needs one gradient-statistics group (no expert parallelism)")


@torch.no_grad()
def member_clipped_step(optimizer, clips: dict[str, float]) -> tuple[bool, float, dict[str, float]]:
    """One optimizer step with each member's gradients clipped by that member's own norm.

    Args:
        optimizer: a Megatron optimizer (FP32, mixed-precision, distributed, or a ChainedOptimizer).
        clips: {"policy": c, "value": c}; 0 (or a missing member) = no clipping of that member.
    Returns:
        (update_successful, total norm before clipping, {member: norm before clipping}). A non-finite
        norm skips the step (update_successful False) on every rank alike (the norms are all-reduced).
        Collective: every rank of the model- and data-parallel groups must call it.
    """
    # Megatron's optimizer module's own names: the ones its step uses (and the CPU compat layer patches).
    from megatron.core.optimizer import optimizer as megatron_optimizer

    _check_supported(optimizer)
    if optimizer.prepare_grads():  # inf/nan found by the loss scaler (fp16): skip, as Megatron does
        return False, float("nan"), {m: float("nan") for m in MEMBERS}
    params, grads, group = _members_params(optimizer)
    norms = {}
    for member in MEMBERS:  # fixed order: each norm is an all-reduce every rank must join
        norm = float(megatron_optimizer.get_grad_norm_fp32(grads[member], grad_stats_parallel_group=group))
        norms[member] = norm
        clip = clips.get(member, 0.0)
        with_grad = [p for p in params[member] if p.grad is not None]
        if clip > 0 and with_grad and math.isfinite(norm):
            megatron_optimizer.clip_grad_by_total_norm_fp32(with_grad, clip, norm)
    total = math.sqrt(sum(n * n for n in norms.values()))
    if not math.isfinite(total):
        return False, total, norms
    return bool(optimizer.step_with_ready_grads()), total, norms
