"""Our Megatron checkpoint directory: a layout-free `dist_checkpointing` (torch_dist) save of the model's
`sharded_state_dict()` plus the `ModelConfig` and the HF side files needed to go back.

    <dir>/
      checkpoint.json      format version, kind (policy | value), dtype, family, source
      model_config.yaml    the ModelConfig (what to build before loading)
      weights/             megatron.core.dist_checkpointing, torch_dist (loads under any TP/PP/VPP)
      hf/                  the original config.json and tokenizer files (for megatron-to-hf)

Saving and loading are collective over the initialized layout: every rank passes its chunks' sharded
state dict and Megatron reshards by the global offsets (the TP split of fused QKV by groups, the
gated fc1 halves, the vocab padding, the layer offset of each pipeline stage).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch
import yaml

from dqo_megatron.checkpoint_integrity import (
    MANIFEST_FILE,
    ManifestError,
    all_gather,
    dcp_size_problems,
    one_line,
    save_error_message,
    verify_directory,
    write_manifest_everywhere,
)
from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, dtypes
from dqo_megatron.config.loader import from_dict, to_dict
from dqo_megatron.conversion.lean_save import build_factories_consuming_params, materialize_deferred
from dqo_megatron.conversion.registry import ConversionError
from dqo_megatron.conversion.torch_dist_save import torch_dist_save
from dqo_megatron.outputs import OutputError, check_apart, refuse_existing, staged_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INFO_FILE = "checkpoint.json"
CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"

CHECKPOINT_DTYPES = tuple(dtypes.TORCH_NAMES.values())
"""Names written in checkpoint.json (torch's spelling without the ``torch.`` prefix, `config.dtypes`)."""


@dataclass
class CheckpointInfo:
    """What checkpoint.json records."""

    family: str
    """`ModelConfig.family`."""
    dtype: str
    """Parameter dtype of the stored tensors: float32 | bfloat16 | float16."""
    kind: Literal["policy", "value"] = "policy"
    """policy: a GPTModel; value: a GPTModel (trunk) plus ``value_head.weight [1, h]`` and ``value_head.bias [1]``."""
    source: Optional[str] = None
    """Where it was converted from (a path), for provenance."""
    format_version: int = FORMAT_VERSION
    """Layout version of this directory."""

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a torch dtype."""
        return dtypes.torch_dtype(self.dtype, f"{INFO_FILE} dtype")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (only the three parameter dtypes are accepted)."""
    short = dtypes.dtype_from_torch(dtype)
    if short is None:
        raise ConversionError(f"parameter dtype {dtype} is not supported (float32, bfloat16, float16)")
    return dtypes.TORCH_NAMES[short]


def write_metadata(out: Path, cfg: ModelConfig, info: CheckpointInfo) -> None:
    """Write checkpoint.json and model_config.yaml into `out`."""
    (out / INFO_FILE).write_text(json.dumps(asdict(info), indent=2, sort_keys=True) + "\n")
    (out / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def read_metadata(path: str | Path) -> tuple[ModelConfig, CheckpointInfo]:
    """``(ModelConfig, CheckpointInfo)`` of a checkpoint directory; ConversionError naming what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"Megatron checkpoint directory {path} does not exist")
    for name in (INFO_FILE, CONFIG_FILE, WEIGHTS_DIR):
        if not (path / name).exists():
            raise ConversionError(f"{path}: no {name} (not a dqo-megatron checkpoint; see docs/checkpoints.md)")
    try:
        raw = json.loads((path / INFO_FILE).read_text())
        info = CheckpointInfo(**raw)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ConversionError(f"{path / INFO_FILE}: unreadable ({exc})") from None
    if info.format_version != FORMAT_VERSION:
        raise ConversionError(
            f"{path}: checkpoint format version {info.format_version}, this code reads {FORMAT_VERSION}"
        )
    if info.dtype not in CHECKPOINT_DTYPES:
        raise ConversionError(f"{path / INFO_FILE}: dtype {info.dtype!r} not one of {sorted(CHECKPOINT_DTYPES)}")
    try:
        cfg = from_dict(ModelConfig, yaml.safe_load((path / CONFIG_FILE).read_text()) or {}, "model")
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path / CONFIG_FILE}: {exc}") from None
    return cfg, info


# ------------------------------------------------------------------------------------------- output
@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` when the block succeeds
    (`dqo_megatron.outputs.staged_dir`, its refusals raised as ConversionError).

    Fails before any work when `out` exists and not `overwrite`, or when `out` is, lies inside or
    contains one of `inputs`. On error the temporary directory is removed, so no partial output is
    ever visible under `out`; an existing `out` is replaced only after the new one is complete.
    """
    check_output(Path(out).absolute(), overwrite, inputs)
    with staged_dir(out, overwrite=overwrite, inputs=inputs) as tmp:
        yield tmp


def check_output(out: Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> None:
    """ConversionError when `out` exists (and not `overwrite`), is a file, or overlaps one of `inputs`."""
    try:
        check_apart([out], inputs)
        if out.exists() and not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        refuse_existing([out], overwrite)
    except OutputError as exc:
        raise ConversionError(str(exc)) from None


# ---------------------------------------------------------------------------------------- the model
def build_empty_chunks(cfg: ModelConfig, parallel: ParallelConfig, dtype: torch.dtype) -> list:
    """This rank's GPTModel chunks for `cfg` with uninitialized `dtype` parameters (to be loaded).

    Skipping Megatron's random init saves its time, and untouched ``torch.empty`` pages never become
    resident, so a model being filled from a checkpoint costs its size once. Needs an initialized layout.
    """
    from dqo_megatron.models import build_model_chunks

    overrides = {"perform_initialization": False, "params_dtype": dtype, "pipeline_dtype": dtype}
    # the local spec: conversion maps tensors by its parameter names (TE fuses the norms into the linears);
    # its sharded keys are the TE spec's (local_spec maps them), so the files load under either spec
    return build_model_chunks(cfg, parallel, backend="local", config_overrides=overrides)


def sharded_state_dict(chunks: list) -> dict:
    """Megatron sharded state dict of all chunks of this rank (``{"chunk<i>": ...}``; the stored keys are
    the chunks' global ShardedTensor keys, so the nesting does not reach the files)."""
    return {f"chunk{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def save_chunks(chunks: list, weights_dir: str | Path, consume: bool = False) -> None:
    """Save the chunks of every rank into `weights_dir` (collective, synchronous; the directory must be
    empty or absent), with `dist_checkpointing.save` as shipped (`torch_dist_save`).

    Deferred parameters (`lean_save.defer`) are computed first. `consume=True` (the converter, which
    discards the model afterwards): Megatron's factories are built one at a time with owned data and
    their fused parameter freed (`lean_save.build_factories_consuming_params`; a deferred gated fc1
    hands over its mmapped halves, never computed), so the save does not hold fc1 twice. The chunks are
    unusable afterwards.
    """
    weights_dir = Path(weights_dir)
    if torch.distributed.get_rank() == 0:
        weights_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    if not consume:
        materialize_deferred(chunks)
    state = sharded_state_dict(chunks)
    if consume:
        build_factories_consuming_params(state)
        materialize_deferred(chunks)  # what no factory handed over (QKV): into the buffers the state views
    errors = torch_dist_save(state, weights_dir)
    failure = save_error_message(errors, weights_dir)[0] if errors else None
    failures = [f"rank {rank}: {f}" for rank, f in enumerate(all_gather(failure)) if f is not None]
    if failures:
        raise ConversionError(f"saving {weights_dir} failed ({'; '.join(failures)})")
    try:  # what load_chunks checks (checkpoint_integrity, shared with training checkpoints)
        write_manifest_everywhere(weights_dir)
    except ManifestError as exc:  # raised on every rank alike
        raise ConversionError(str(exc)) from None


# ------------------------------------------------------------------------------ tensor records
def load_chunks(chunks: list, weights_dir: str | Path, verify: str = "full") -> None:
    """Load `weights_dir` into this rank's chunks in place, whatever layout saved it (collective).

    The files are checked against the manifest `save_chunks` wrote first (`verify`: full = sizes and
    CRC32, size, off; directories written before manifests existed: against torch's index, with a
    warning). ConversionError naming the file when one is missing, truncated or changed, or when torch's
    reader fails on it."""
    state = checked_load(sharded_state_dict(chunks), weights_dir, verify)
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"], strict=True)


def checked_load(sharded: dict, weights_dir: str | Path, verify: str = "full") -> dict:
    """`dist_checkpointing.load(sharded, weights_dir)` after checking the files against the manifest
    (`verify`: full, size, off); every failure a ConversionError of one line naming the file."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    from dqo_megatron.compat.megatron_api import newer_format_problem

    weights_dir = Path(weights_dir)
    if not (weights_dir / "metadata.json").is_file():
        raise ConversionError(f"{weights_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    check = verify_directory(weights_dir, verify)
    if check.problems:
        more = f" (and {len(check.problems) - 3} more)" if len(check.problems) > 3 else ""
        raise ConversionError(f"checkpoint {weights_dir} is damaged: {'; '.join(check.problems[:3])}{more}")
    if not check.has_manifest and verify != "off" and torch.distributed.get_rank() == 0:
        logger.warning(
            "%s has no %s (written before manifests existed): checked against torch's index only, not checksummed",
            weights_dir,
            MANIFEST_FILE,
        )
    try:
        return dist_checkpointing.load(sharded, str(weights_dir))
    except CheckpointingException as exc:
        raise ConversionError(f"{weights_dir}: cannot be loaded into this model: {exc}") from None
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's reader errors, in one line
        newer = newer_format_problem(weights_dir)  # 0.19's files under <= 0.18: a clear cause, not the crash
        if newer:
            raise ConversionError(newer) from None
        located = "".join(f"; {p}" for p in dcp_size_problems(weights_dir)[:3] + _unreadable_common(weights_dir))
        raise ConversionError(
            f"checkpoint {weights_dir}: torch's checkpoint reader failed ({one_line(exc)}){located}"
        ) from None


def _unreadable_common(weights_dir: Path) -> list[str]:
    """[a line naming common.pt] when that pickle (Megatron's non-tensor state) does not load, else []:
    torch's reader fails on it with errors that name no file (IndexError, EOFError, ...)."""
    common = weights_dir / "common.pt"
    if not common.is_file():
        return []
    try:
        torch.load(common, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read it is the finding
        return [f"{common}: unreadable ({type(exc).__name__}; damaged or not written by Megatron)"]
    return []


@contextlib.contextmanager
def single_process_layout() -> Iterator[None]:
    """Megatron at TP=PP=1 in this process for the duration (creating a world-size-1 gloo/NCCL group when
    none exists, and tearing it down after); reuses an existing world-size-1 TP=1 PP=1 setup."""
    from megatron.core import parallel_state

    from dqo_megatron import parallel

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1 or (
            parallel_state.model_parallel_is_initialized()
            and (
                parallel_state.get_tensor_model_parallel_world_size() != 1
                or parallel_state.get_pipeline_model_parallel_world_size() != 1
            )
        ):
            raise ConversionError("conversion runs in a single process at TP=1 PP=1; run it outside torchrun")
        if not parallel_state.model_parallel_is_initialized():
            parallel.initialize(ParallelConfig())
        yield
        return
    parallel.initialize(ParallelConfig())
    try:
        yield
    finally:
        parallel.destroy()
