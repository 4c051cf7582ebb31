"""What every loss shares: input checks, the fp32 compute dtype, reductions and the result types.

The result types carry Megatron's `loss_func` contract: `(loss_sum, count, metrics)`. Megatron (with
`calculate_per_token_loss`) adds `count` over micro-batches and data-parallel ranks and divides the
summed gradients once by the global count, so every token (or sequence) of the global batch weighs the
same however the batch was split. Each metric is a 2-element tensor `[numerator, denominator]`;
Megatron's trainer adds both over micro-batches and ranks and reports numerator / denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from dqo_megatron.losses.segments import ResponseSegments

Tensor = torch.Tensor

REDUCTIONS = ("token", "sequence")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(c) for c in choices)}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:  # also rejects NaN
        raise ValueError(f"{name}={value!r} must be > 0")


def check_tensor(name: str, value: object, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_float(name: str, value: Tensor) -> Tensor:
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_token_tensors(response_mask: object, **tensors: Optional[Tensor]) -> torch.Size:
    """All given `[batch, seq]` tensors (None skipped) must have the mask's 2-D shape."""
    mask = check_tensor("response_mask", response_mask, ndim=2)
    for name, value in tensors.items():
        if value is None:
            continue
        check_tensor(name, value)
        if value.shape != mask.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but response_mask has shape {tuple(mask.shape)}; "
                "every per-token tensor must be [batch, seq] aligned per response position"
            )
    return mask.shape


def as_bool_mask(response_mask: Tensor) -> Tensor:
    """The 0/1 response mask as bool; any other value is an error (a soft mask would silently reweight)."""
    if response_mask.dtype == torch.bool:
        return response_mask
    if not ((response_mask == 0) | (response_mask == 1)).all():
        raise ValueError("response_mask must contain only 0 and 1 (or be a bool tensor)")
    return response_mask != 0


def check_document_ids(document_ids: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    if document_ids is None:
        return None
    check_tensor("document_ids", document_ids)
    if document_ids.shape != shape:
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} but response_mask has shape {tuple(shape)}"
        )
    if document_ids.is_floating_point() or document_ids.is_complex() or document_ids.dtype == torch.bool:
        raise ValueError(f"document_ids must be an integer tensor, got dtype {document_ids.dtype}")
    return document_ids


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs (the loss math is never done in low precision); fp64 if any
    input is fp64 (tests)."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def masked(x: Tensor, mask: Tensor, dtype: torch.dtype, *, detach: bool = False) -> Tensor:
    """`x` in the compute dtype with non-response positions set to exactly 0.

    Padding may hold anything (-inf log-probs, NaN values); `where` keeps it out of the forward pass
    and gives those positions an exact zero gradient.
    """
    if detach:
        x = x.detach()
    x = x.to(dtype)
    return torch.where(mask, x, torch.zeros((), dtype=dtype, device=x.device))


def reduction_weights(segments: ResponseSegments, reduction: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-token weights and the count that turn a per-token loss into Megatron's `(sum, count)`.

    token:    sum = sum_h loss_h,                 count = number of response tokens;
    sequence: sum = sum_docs mean_(h in doc) loss_h = sum_h loss_h / len(doc(h)),
              count = number of documents (sequences; each packed document counts once).
    """
    if reduction == "token":
        return segments.mask.to(dtype), segments.num_tokens().to(torch.int)
    length = segments.document_length(dtype)
    weights = torch.where(segments.mask, 1.0 / length.clamp(min=1.0), torch.zeros_like(length))
    return weights, segments.num_documents().to(torch.int)


def ratio_metric(numerator: Tensor, denominator: Tensor | float | int) -> Tensor:
    """A metric in Megatron's reporting format: a detached 2-element `[numerator, denominator]` tensor."""
    numerator = numerator.detach()
    denominator = torch.as_tensor(denominator, device=numerator.device).to(numerator.dtype)
    return torch.stack([numerator.reshape(()), denominator.reshape(())])


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Largest `x` over the mask, 0 for an empty mask."""
    lowest = torch.finfo(x.dtype).min
    largest = torch.where(mask, x, torch.full_like(x, lowest)).max()
    return torch.where(mask.any(), largest, torch.zeros_like(largest))


@dataclass(frozen=True)
class LossOutput:
    """A loss in Megatron's `loss_func` form plus its local mean.

    loss_sum: differentiable scalar; backpropagate it and divide gradients by the global `count`.
    count: int32 scalar (response tokens, sequences or pairs, as the loss says).
    metrics: name -> detached `[numerator, denominator]` (see the module docstring).
    """

    loss_sum: Tensor
    count: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Mean over this batch: `loss_sum / count` (0 when the batch has nothing to average)."""
        return self.loss_sum / self.count.clamp(min=1).to(self.loss_sum.dtype)

    def loss_func_output(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """`(loss_sum, count, metrics)`, what a Megatron `loss_func` returns."""
        return self.loss_sum, self.count, self.metrics


@dataclass(frozen=True)
class PolicyValueLossOutput(LossOutput):
    """Losses with a policy part (gradient only into the log-probs) and a value part (gradient only
    into the values). `loss_sum = policy_loss_sum + value_loss_sum`; both share `count`, so one backward
    pass of `loss_sum` trains both networks with their own correctly scaled gradients."""

    policy_loss_sum: Optional[Tensor] = None
    value_loss_sum: Optional[Tensor] = None

    @property
    def policy_loss(self) -> Tensor:
        return self.policy_loss_sum / self.count.clamp(min=1).to(self.policy_loss_sum.dtype)

    @property
    def value_loss(self) -> Tensor:
        return self.value_loss_sum / self.count.clamp(min=1).to(self.value_loss_sum.dtype)
