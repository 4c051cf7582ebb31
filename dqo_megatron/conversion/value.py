"""Value-network checkpoints: a policy's trunk (every GPTModel tensor, copied) plus a scalar head.

The head is `dqo_megatron.models.value_head.ValueHead` (``V = w . x + b`` on the final hidden states,
fp32), attached as the GPTModel's ``value_head`` submodule, so the checkpoint stores it under the global
keys ``value_head.weight [1, h]`` and ``value_head.bias [1]`` next to the trunk's keys. The LM head
(``output_layer``) is kept: the value network is a full copy of the policy's architecture, and the same
checkpoint then loads into the policy builder. Zero-initialized by default (``V = 0`` at the start), or
taken from another value checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from dqo_megatron.config import ModelConfig, ParallelConfig
from dqo_megatron.conversion.megatron_io import (
    WEIGHTS_DIR,
    CheckpointInfo,
    build_empty_chunks,
    check_output,
    checked_load,
    load_chunks,
    read_metadata,
    save_chunks,
    single_process_layout,
    staged_output,
    write_metadata,
)
from dqo_megatron.conversion.registry import ConversionError


def load_value_head(head: torch.nn.Module, value_ckpt: str | Path) -> None:
    """Fill `head` from the ``value_head.*`` tensors of a value checkpoint (collective)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    _cfg, info = read_metadata(value_ckpt)
    if info.kind != "value":
        raise ConversionError(f"{value_ckpt} is a {info.kind} checkpoint; the head must come from a value checkpoint")
    sharded = make_sharded_tensors_for_checkpoint(head.state_dict(keep_vars=True), "value_head.", {}, ())
    try:
        state = checked_load(sharded, Path(value_ckpt) / WEIGHTS_DIR)
    except ConversionError as exc:
        raise ConversionError(f"cannot take the value head from {value_ckpt}: {exc}") from None
    head.load_state_dict({k.removeprefix("value_head."): v for k, v in state.items()}, strict=True)


def attach_value_head(chunk, cfg: ModelConfig, init_from: Optional[str | Path] = None) -> torch.nn.Module:
    """Attach a `ValueHead` (zero weight and bias, or `init_from`'s) to a GPTModel chunk as
    ``chunk.value_head``; returns it. The chunk's sharded state dict then includes the head."""
    from dqo_megatron.models.value_head import ValueHead

    head = ValueHead.from_config(chunk.config)
    if init_from is not None:
        load_value_head(head, init_from)
    chunk.value_head = head
    return head


def value_from_megatron(
    src: str | Path, out: str | Path, *, overwrite: bool = False, value_head: Optional[str | Path] = None
) -> float:
    """Write a value checkpoint `out` from the policy checkpoint `src` (trunk copied, head zero or from
    `value_head`); returns the seconds it took."""
    start = time.perf_counter()
    inputs = [Path(src)] + ([Path(value_head)] if value_head is not None else [])
    check_output(Path(out).absolute(), overwrite, inputs)
    cfg, info = read_metadata(src)
    if info.kind != "policy":
        raise ConversionError(f"{src} is already a {info.kind} checkpoint")
    with staged_output(out, overwrite, inputs) as tmp, single_process_layout():
        (chunk,) = build_empty_chunks(cfg, ParallelConfig(), info.torch_dtype)
        load_chunks([chunk], Path(src) / WEIGHTS_DIR)
        attach_value_head(chunk, cfg, value_head)
        save_chunks([chunk], tmp / WEIGHTS_DIR)
        write_metadata(
            tmp,
            cfg,
            CheckpointInfo(family=info.family, dtype=info.dtype, kind="value", source=str(Path(src).absolute())),
        )
        hf_src = Path(src) / "hf"
        if hf_src.is_dir():
            import shutil

            shutil.copytree(hf_src, tmp / "hf")
    return time.perf_counter() - start
