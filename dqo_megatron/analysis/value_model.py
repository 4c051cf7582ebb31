"""Load a trained value network in one process (TP=PP=1) and read per-token values ``V(s)``.

Two kinds of checkpoint hold a value network:

* a **training checkpoint** (``run_dir/checkpoints/step_N``, written by `dqo-megatron train` under any
  layout) of a run whose algorithm learns a value (dqo, dro). The run's resolved config
  (``run_dir/config.yaml``) says the model and the value mode: ``separate`` (a second GPT + head:
  keys ``value.*`` and ``value_head.*``) or ``shared`` (the head on the policy's trunk: ``policy.*`` and
  ``value_head.*``). Only the trunk that feeds the head is built and loaded, never the other members.
* a **value conversion checkpoint** (``convert hf-to-megatron --value``, ``checkpoint.json`` kind
  ``value``): a GPT with the head stored as its ``value_head`` submodule.

Either becomes a `ValueModel`: the trunk GPT (run with `final_hidden_states_only`, so no logits are
computed) and the `ValueHead`, exactly as `PolicyValueModel` computes the values during training: the
value at position ``t`` is ``V`` of the state made of ``tokens[0..t]`` (the state whose next action is
``tokens[t+1]``).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, PrecisionConfig, RunConfig, dtypes

CheckpointKind = Literal["training", "value_conversion"]
_STEP_RE = re.compile(r"^step_(\d+)$")


@dataclass
class ValueCheckpoint:
    """A checkpoint that holds a value network, resolved (nothing loaded yet)."""

    path: Path
    """The checkpoint directory (``step_N`` of a run, or a conversion checkpoint)."""
    kind: CheckpointKind
    """training: a `dqo-megatron train` checkpoint; value_conversion: a `convert --value` checkpoint."""
    model: ModelConfig
    """The architecture of the trunk."""
    value_mode: Literal["separate", "shared", "value_checkpoint"]
    """Where the head sits: a separate value GPT, the policy's trunk, or a value conversion checkpoint."""
    run: Optional[RunConfig] = None
    """The run's resolved config (training checkpoints only)."""
    step: Optional[int] = None
    """The training step (from the ``step_N`` name), None for conversion checkpoints."""
    run_dir: Optional[Path] = None
    """The run directory (``run_dir`` of ``run_dir/checkpoints/step_N``); None for conversion checkpoints."""
    label: str = ""
    """A short name for output files: ``<run_dir name>-step_N`` or the directory name."""


def _run_config_for(step_dir: Path, run_config: Optional[str | Path]) -> RunConfig:
    from dqo_megatron.config import load_config

    path = Path(run_config) if run_config else step_dir.absolute().parent.parent / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"{step_dir}: the run's config {path} does not exist (give the run's resolved config "
            "with --config / run_config)"
        )
    run = load_config(RunConfig, path)
    from dqo_megatron.algorithms import all_algorithms, get

    if not get(run.algorithm).needs_value:
        with_value = ", ".join(a.name for a in all_algorithms() if a.needs_value)
        raise ConfigError(
            f"{step_dir}: run config {path} has algorithm={run.algorithm!r}, which learns no value "
            f"network (only {with_value} do)"
        )
    return run


def _training_checkpoint(step_dir: Path, run_config: Optional[str | Path]) -> ValueCheckpoint:
    run = _run_config_for(step_dir, run_config)
    match = _STEP_RE.match(step_dir.name)
    step = int(match.group(1)) if match else None
    run_dir = step_dir.absolute().parent.parent
    return ValueCheckpoint(
        path=step_dir,
        kind="training",
        model=run.model,
        value_mode=run.value.mode,
        run=run,
        step=step,
        run_dir=run_dir,
        label=f"{run_dir.name}-{step_dir.name}",
    )


def resolve_checkpoints(paths: Sequence[str | Path], run_config: Optional[str | Path] = None) -> list[ValueCheckpoint]:
    """Expand and identify the checkpoints to analyse, in the given order.

    Each path may be: a training checkpoint (has a ``COMPLETE`` marker); a checkpoint root
    (``run_dir/checkpoints``) or a run directory (has ``checkpoints/``), which stand for all their
    complete ``step_*`` checkpoints, oldest first; or a value conversion checkpoint (has
    ``checkpoint.json`` of kind ``value``).

    Args:
        paths: the checkpoint paths.
        run_config: the run's resolved config for training checkpoints (default: ``config.yaml`` of
            the run directory two levels above each ``step_N``).
    Raises:
        ConfigError / FileNotFoundError naming the path that is none of these.
    """
    from dqo_megatron.conversion.megatron_io import INFO_FILE, read_metadata
    from dqo_megatron.training.checkpointing import is_complete, list_checkpoints

    found: list[ValueCheckpoint] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if is_complete(path):
            found.append(_training_checkpoint(path, run_config))
        elif (path / INFO_FILE).is_file():
            cfg, info = read_metadata(path)
            if info.kind != "value":
                raise ConfigError(
                    f"{path} is a {info.kind} conversion checkpoint: it has no value head (make one "
                    "with `dqo-megatron convert hf-to-megatron --value`, or analyse a DQO training "
                    "checkpoint)"
                )
            found.append(
                ValueCheckpoint(
                    path=path,
                    kind="value_conversion",
                    model=cfg,
                    value_mode="value_checkpoint",
                    label=path.absolute().name,
                )
            )
        else:
            root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
            steps = list_checkpoints(root)
            if not steps:
                raise ConfigError(
                    f"{path} is neither a complete training checkpoint (no COMPLETE marker), a run "
                    f"directory / checkpoint root with complete step_* checkpoints, nor a value "
                    f"conversion checkpoint (no {INFO_FILE})"
                )
            found.extend(_training_checkpoint(step_dir, run_config) for _, step_dir in steps)
    labels: dict[str, int] = {}
    for ckpt in found:  # unique labels: they name output files
        n = labels.get(ckpt.label, 0)
        labels[ckpt.label] = n + 1
        if n:
            ckpt.label = f"{ckpt.label}-{n + 1}"
    return found


class _TrunkAndHead(torch.nn.Module):
    """The trunk member and the head of a training checkpoint, under the checkpoint's names.

    `load_checkpoint` reads the keys our `sharded_state_dict` asks for (``<member>.*`` and
    ``value_head.*``) and ignores the others (the other members, the optimizer).
    """

    def __init__(self, member: str, gpt: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.member = member
        self.add_module(member, gpt)
        self.value_head = head

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """``<member>.*`` of the trunk and ``value_head.*`` (see `members_sharded_state_dict`)."""
        from dqo_megatron.training.policy_value import members_sharded_state_dict

        return members_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load member by member (a Float16Module-wrapped trunk's own names carry ``module.``)."""
        from dqo_megatron.models.value_head import unwrap_gpt

        def sub(prefix: str) -> dict:
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}

        unwrap_gpt(getattr(self, self.member)).load_state_dict(sub(f"{self.member}."), strict=strict)
        self.value_head.load_state_dict(sub("value_head."), strict=strict)


class ValueModel(torch.nn.Module):
    """A value network: trunk GPT + `ValueHead`, in eval mode, for per-token values.

    Args:
        trunk: a GPTModel (possibly Float16Module-wrapped), TP=PP=1.
        head: the `ValueHead` on its final hidden states.
    """

    def __init__(self, trunk: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head
        self.eval()

    @property
    def device(self) -> torch.device:
        """Where the parameters live (inputs are moved there)."""
        return self.head.weight.device

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        document_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Values ``[b, s]`` (fp32) of token ids ``[b, s]``: entry ``t`` is ``V(tokens[.., 0..t])``.

        Attention is causal, so right padding does not change the values of earlier positions. Packed
        rows: `document_ids` ``[b, s]`` (the sequence of every token) and `position_ids` restarting per
        sequence; attention then stops at sequence boundaries (`dqo_megatron.models.packed`; local spec only,
        ConfigError on Transformer Engine's).
        """
        from dqo_megatron.models.packed import document_attention_mask, masks_documents, rotary_from_position_ids
        from dqo_megatron.models.value_head import final_hidden_states_only, unwrap_gpt

        tokens = tokens.to(self.device)
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=self.device).expand_as(tokens)
        position_ids = position_ids.to(self.device)
        mask, rope = None, contextlib.nullcontext()
        if document_ids is not None:
            if not masks_documents(self.trunk):  # TE's causal attention would ignore the mask: silently wrong
                raise ConfigError(
                    "pack_rows (value-analysis --pack-rows) needs the local layer spec; Transformer Engine's "
                    "attention does not take the document mask: leave it unset"
                )
            mask = document_attention_mask(document_ids.to(self.device))
            rope = rotary_from_position_ids([unwrap_gpt(self.trunk)], position_ids)
        with rope, final_hidden_states_only(self.trunk):
            hidden = self.trunk(tokens, position_ids, mask)  # [s, b, h]
        return self.head(hidden)  # [b, s]


def _build_trunk(model: ModelConfig, dtype: str) -> torch.nn.Module:
    """An uninitialized (to be loaded) GPT of `model` at TP=PP=1 on this process's device."""
    from dqo_megatron.models import build_model_chunks

    precision = PrecisionConfig(dtype=dtype)  # type: ignore[arg-type]
    torch_dtype = dtypes.torch_dtype(precision.resolved_dtype(torch.cuda.is_available()))
    overrides = {"perform_initialization": False, "params_dtype": torch_dtype, "pipeline_dtype": torch_dtype}
    (gpt,) = build_model_chunks(model, ParallelConfig(), precision, config_overrides=overrides)
    return gpt


def load_value_model(ckpt: ValueCheckpoint, dtype: str = "auto") -> ValueModel:
    """Build and load the value network of `ckpt` (needs Megatron initialized at TP=PP=1, world size 1:
    see `dqo_megatron.conversion.megatron_io.single_process_layout`).

    Args:
        ckpt: from `resolve_checkpoints`.
        dtype: trunk dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16 or fp16 (the head stays fp32).
    Raises:
        CheckpointError / ConversionError naming the checkpoint when it does not fit the model.
    """
    from dqo_megatron.models.value_head import ValueHead, unwrap_gpt
    from dqo_megatron.parallel import device_for_this_process

    trunk = _build_trunk(ckpt.model, dtype)
    head = ValueHead.from_config(unwrap_gpt(trunk).config).to(device_for_this_process())
    if ckpt.kind == "training":
        from dqo_megatron.training.checkpointing import load_checkpoint

        member = "value" if ckpt.value_mode == "separate" else "policy"
        load_checkpoint(ckpt.path, [_TrunkAndHead(member, trunk, head)], restore_rng=False)
    else:
        from dqo_megatron.conversion.megatron_io import WEIGHTS_DIR, load_chunks

        gpt = unwrap_gpt(trunk)
        gpt.value_head = head  # stored as the GPT's submodule in a value checkpoint
        try:
            load_chunks([gpt], ckpt.path / WEIGHTS_DIR)
        finally:
            del gpt._modules["value_head"]
    return ValueModel(trunk, head)


def sequence_values(
    model: ValueModel,
    sequences: Sequence[np.ndarray],
    batch_size: int = 8,
    pad_id: int = 0,
    row_length: Optional[int] = None,
) -> list[np.ndarray]:
    """Per-position values of each token sequence, batched by similar length with right padding, or
    packed into rows of `row_length` tokens (first-fit decreasing, as the trainer's `train.packing`).

    Args:
        model: the value network.
        sequences: token ids, each ``[T_i]`` (int).
        batch_size: sequences per forward pass (packed: rows per forward pass).
        pad_id: token id used for padding (never read back: attention is causal).
        row_length: pack into rows of this many tokens (each sequence at most that long); None: pad.
    Returns:
        float64 ``[T_i]`` per sequence, in the input order: entry ``t`` is ``V(tokens[0..t])``.
    """
    if row_length is not None:
        return _packed_sequence_values(model, sequences, max(1, batch_size), pad_id, row_length)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[Optional[np.ndarray]] = [None] * len(sequences)
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + max(1, batch_size)]
        width = max(len(sequences[i]) for i in idx)
        batch = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for row, i in enumerate(idx):
            batch[row, : len(sequences[i])] = torch.as_tensor(np.asarray(sequences[i], dtype=np.int64))
        values = _finite(model(batch).double().cpu().numpy(), len(idx))
        for row, i in enumerate(idx):
            out[i] = values[row, : len(sequences[i])]
    return out  # type: ignore[return-value]


def _packed_sequence_values(
    model: ValueModel, sequences: Sequence[np.ndarray], rows_per_pass: int, pad_id: int, row_length: int
) -> list[np.ndarray]:
    from dqo_megatron.training.packing import first_fit_decreasing, lay_out_rows

    lengths = [len(s) for s in sequences]
    rows = first_fit_decreasing(lengths, row_length)  # refuses a sequence longer than a row
    out: list[Optional[np.ndarray]] = [None] * len(sequences)
    for start in range(0, len(rows), rows_per_pass):
        tokens, positions, documents, offsets = lay_out_rows(
            sequences, rows[start : start + rows_per_pass], row_length, pad_id
        )
        values = _finite(model(tokens, positions, documents).double().cpu().numpy(), len(offsets))
        for i, (r, at) in offsets.items():
            out[i] = values[r, at : at + lengths[i]]
    return out  # type: ignore[return-value]


def _finite(values: np.ndarray, count: int) -> np.ndarray:
    if not np.isfinite(values).all():
        raise ValueError(
            f"the value network gives non-finite values (NaN/inf) for {count} sequences: its "
            "weights are damaged or training diverged; check the checkpoint (it cannot be analysed)"
        )
    return values
