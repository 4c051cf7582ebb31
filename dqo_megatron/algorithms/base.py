"""What an algorithm is: one `Algorithm` object (its models, its batches, its loss, its metrics).

The trainer, the value analysis and the docs read these fields; `dqo_megatron.training.algorithms`
turns the model's per-token outputs into a `LossInputs` and calls `Algorithm.loss` on Megatron's
``loss_func`` contract. Nothing here imports megatron.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Optional

import torch

if TYPE_CHECKING:
    from dqo_megatron.config import RunConfig

ROWS_PER_ITEM = {"samples": 1, "pairs": 2, "kto": 2}
"""Rows of a micro-batch per `train.micro_batch_size` unit, by batch mode (see
`dqo_megatron.training.microbatches.MicroBatches`): samples = one row per document; pairs = rows [0, B) chosen,
[B, 2B) rejected (DPO); kto = rows [0, B) the documents, [B, 2B) mismatched prompt/response rows."""

LossTriple = tuple[torch.Tensor, torch.Tensor, dict]
"""``(loss_sum, count, metrics)``: what a Megatron ``loss_func`` returns (docs/algorithms.md)."""


@dataclass(frozen=True)
class LossInputs:
    """One micro-batch as every loss sees it: whole sequences (gathered over context parallelism),
    ``[b, s]`` tensors aligned per response position (docs/algorithms.md, "The data every loss sees")."""

    run: "RunConfig"
    """The run (`run.loss` holds the coefficients, `run.value` the value network's)."""
    batch: dict
    """The micro-batch as built by `MicroBatches` (extra per-row fields: truncated, desirable, ...)."""
    logp: torch.Tensor
    """log pi(a_h|s_h) of the policy (differentiable)."""
    values: torch.Tensor
    """V(s_h) (differentiable; NaN when the run has no value network)."""
    ref: torch.Tensor
    """log pi_ref(a_h|s_h), from the data or the reference model (no gradient)."""
    behavior: Optional[torch.Tensor]
    """log mu(a_h|s_h) of the sampler; None = the data was sampled from the reference."""
    mask: torch.Tensor
    """1 where position h holds a response token."""
    rewards: torch.Tensor
    """r_h."""
    document_ids: Optional[torch.Tensor]
    """Packed rows: a different id per document (None: one document per row)."""
    policy_weight: float = 1.0
    """Multiplies the policy's loss (0 during the critic warm-up, `value.warmup_steps`)."""

    def with_(self, **changes) -> "LossInputs":
        """A copy with some fields replaced."""
        return replace(self, **changes)


@dataclass(frozen=True)
class Algorithm:
    """One training objective. Register it with `dqo_megatron.algorithms.register`; then
    ``algorithm: <name>`` in a run config trains it (docs/algorithms.md, "Adding an algorithm")."""

    name: str
    """The value of the config key `algorithm`."""
    loss: Callable[[LossInputs], LossTriple]
    """``loss(inputs) -> (loss_sum, count, metrics)`` for one micro-batch; metrics are detached
    ``[numerator, denominator]`` tensors (the trainer adds both over micro-batches and ranks)."""
    needs_value: bool = False
    """Learns a value network (the run builds one, with its own optimizer group and clip)."""
    needs_reference: bool = False
    """Needs reference log-probs (from the data, or a reference model in the run)."""
    reference_from_data: bool = True
    """Whether the data's reference log-probs can stand in for the reference model (False when the
    loss needs the reference on rows that are not in the data, e.g. KTO's mismatched rows)."""
    batch_mode: str = "samples"
    """How micro-batches are built: a key of `ROWS_PER_ITEM`."""
    config_keys: tuple[str, ...] = ()
    """The config keys the loss reads (its section of `loss.*` / `value.*`), for the docs."""
    metrics: tuple[str, ...] = ()
    """The metrics its loss logs (besides ``loss``, which every algorithm logs)."""
    summary: str = ""
    """One line for the docs and `--help`."""

    def __post_init__(self) -> None:
        if self.batch_mode not in ROWS_PER_ITEM:
            raise ValueError(
                f"algorithm {self.name!r}: batch_mode={self.batch_mode!r}: choose one of {sorted(ROWS_PER_ITEM)}"
            )

    @property
    def rows_per_item(self) -> int:
        """Rows of a micro-batch per `train.micro_batch_size` unit."""
        return ROWS_PER_ITEM[self.batch_mode]


def loss_triple(out) -> LossTriple:
    """``(loss_sum, count, metrics)`` of a `dqo_megatron.losses` output."""
    return out.loss_func_output()
