"""HF <-> Megatron conversion (the library behind ``dqo-megatron convert ...`` and tools/convert_checkpoint.py).

hf_to_megatron: read HF safetensors shard by shard, re-layout per family, fill an uninitialized TP=1 PP=1
    GPTModel (the model's parameters take over the converted tensors: the model's size is held once),
    save it with `dist_checkpointing` so it loads under any layout; optionally as a value network.
megatron_to_hf: load at TP=1 PP=1, write HF safetensors one output shard at a time + config.json +
    the tokenizer files.
Both write into a temporary directory beside the output and rename it at the end (after `verify`
passed, when asked), so a failure leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig, dtypes
from dqo_megatron.config.schema import validate_model_layout
from dqo_megatron.conversion import hf_io
from dqo_megatron.conversion.hf_tokenizer import (
    ExportTokenizer,
    check_tokenizer_fits,
    checked_tokenizer_source,
    export_tokenizer,
    read_export_tokenizer,
)
from dqo_megatron.conversion.lean_save import defer
from dqo_megatron.conversion.megatron_io import (
    HF_DIR,
    WEIGHTS_DIR,
    CheckpointInfo,
    build_empty_chunks,
    check_output,
    dtype_name,
    load_chunks,
    read_metadata,
    save_chunks,
    single_process_layout,
    staged_output,
    write_metadata,
)
from dqo_megatron.conversion.registry import ConversionError, family, family_for_hf_config
from dqo_megatron.conversion.verify import DEFAULT_TOLERANCE, ParityReport, verify_parity

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What a conversion did."""

    output: Path
    """The written directory."""
    model: ModelConfig
    """The model's configuration."""
    dtype: str
    """Stored parameter dtype."""
    seconds: float
    """Wall time of the conversion (verification included)."""
    parity: Optional[ParityReport] = None
    """The parity check, when asked for."""


def check_layouts(cfg: ModelConfig, layouts: Sequence[ParallelConfig]) -> None:
    """ConversionError when `cfg` cannot be split into one of `layouts` (heads, KV groups, FFN, layers)."""
    for layout in layouts:
        try:
            validate_model_layout(cfg, layout, seq_length=cfg.seq_length)
        except ConfigError as exc:
            raise ConversionError(
                f"the model cannot be split into TP={layout.tensor_model_parallel_size} "
                f"PP={layout.pipeline_model_parallel_size}: {exc}"
            ) from None


def _resolve_dtype(requested: str, found: set[torch.dtype], where: Path) -> torch.dtype:
    if requested != "auto":
        try:
            return dtypes.torch_dtype(requested)
        except ConfigError:
            raise ConversionError(f"dtype {requested!r} is not one of auto, fp32, bf16, fp16") from None
    if len(found) != 1:
        raise ConversionError(
            f"{where}: floating tensors have dtypes {sorted(map(str, found))}; pass dtype explicitly (fp32, bf16, fp16)"
        )
    dtype = next(iter(found))
    dtype_name(dtype)  # refuses float64 and friends
    return dtype


def _fail_on_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ConversionError(f"{report.summary()}; nothing was written")


def check_tolerance(tolerance: float) -> None:
    """ConversionError unless `tolerance` (the largest |logit difference| --verify accepts) is finite and >= 0."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        raise ConversionError(f"--tolerance {tolerance}: must be a finite number >= 0 (default {DEFAULT_TOLERANCE})")


def hf_to_megatron(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    layouts: Sequence[ParallelConfig] = (),
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    value: bool = False,
    value_head: Optional[str | Path] = None,
    progress: bool = True,
    make_vocab_size_divisible_by: int = 1,
    seq_length: Optional[int] = None,
) -> ConversionReport:
    """Convert the HF model directory `src` into a dqo-megatron checkpoint directory `out`.

    Args:
        dtype: stored dtype: auto (the source's), fp32, bf16 or fp16.
        make_vocab_size_divisible_by, seq_length: written into ``model_config.yaml`` for runs to copy
            (seq_length None: config.json's ``max_position_embeddings``; longer is refused). The weights
            hold the unpadded vocabulary whatever the padding: a run pads on load.
        layouts: TP/PP layouts the model must be splittable into (checked before anything is read).
        verify: compare logits with transformers on fixed prompts and refuse to write on failure.
        value: write a value network instead (trunk copied, scalar head zero-initialized; see
            `dqo_megatron.conversion.value`); `value_head`: take the head from this value checkpoint.
    Raises ConversionError (unknown architecture, missing shard/tensor, unsplittable layout, existing
    output without `overwrite`, failed parity); nothing is left at `out` then.
    """
    start = time.perf_counter()
    check_tolerance(tolerance)
    src, out = Path(src), Path(out)
    if value_head is not None and not value:
        raise ConversionError("value_head (--value-head) needs value=True (--value)")
    inputs = [src] + ([Path(value_head)] if value_head is not None else [])
    check_output(out.absolute(), overwrite, inputs)
    ckpt = hf_io.HFCheckpoint.open(src)
    fam = family_for_hf_config(ckpt.config, where=str(src / "config.json"))
    cfg = fam.config_from_hf(
        ckpt.config,
        where=str(src / "config.json"),
        seq_length=seq_length,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    check_layouts(cfg, layouts)
    rules = hf_io.plan_import(ckpt, fam, cfg)
    source_dtypes = ckpt.dtypes()
    torch_dtype = _resolve_dtype(dtype, source_dtypes, src)
    logger.info(
        "converting %s (%s, %d layers, hidden %d) to %s in %s",
        src,
        fam.name,
        cfg.num_layers,
        cfg.hidden_size,
        out,
        dtype_name(torch_dtype),
    )
    parity = None
    with staged_output(out, overwrite, inputs) as tmp, single_process_layout():
        with _gc_paused():
            # unpadded rows: the HF tensors go in as they are, and any run's padding loads from them
            unpadded = dataclasses.replace(cfg, make_vocab_size_divisible_by=1)
            (chunk,) = build_empty_chunks(unpadded, ParallelConfig(), torch_dtype)
            _fill_from_hf(chunk, hf_io.stream_megatron_tensors(ckpt, rules, torch_dtype, progress, defer=True))
            kind = "policy"
            if value:
                from dqo_megatron.conversion.value import attach_value_head

                attach_value_head(chunk, cfg, value_head)
                kind = "value"
            save_chunks([chunk], tmp / WEIGHTS_DIR, consume=True)
            del chunk
        write_metadata(
            tmp,
            cfg,
            CheckpointInfo(family=fam.name, dtype=dtype_name(torch_dtype), kind=kind, source=str(src.absolute())),
        )
        (tmp / HF_DIR).mkdir()
        shutil.copy2(src / "config.json", tmp / HF_DIR / "config.json")
        hf_io.copy_side_files(src, tmp / HF_DIR)
        if verify:
            cast = torch_dtype if source_dtypes != {torch_dtype} else None
            parity = verify_parity(src, tmp, tolerance, round_hf_to=cast)
            logger.info(parity.summary())
            _fail_on_parity(parity)
    return ConversionReport(out, cfg, dtype_name(torch_dtype), time.perf_counter() - start, parity)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as Megatron's own checkpoint writer does).

    A full collection walks every object of the process -- with torch, Megatron and their imports
    loaded, ~0.3 s here -- and the conversion's few hundred tensors and plans trigger one at a random
    point; it creates no garbage cycles worth collecting meanwhile (the tensors are freed by reference
    counting as they are written)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@torch.no_grad()
def _fill_from_hf(chunk, tensors) -> None:
    """Hand each converted tensor to the matching parameter (``param.data = tensor``: no copy, and the
    uninitialized buffer is freed before it was ever touched). A `hf_io.DeferredTensor` (QKV, gated fc1)
    is attached to its parameter uncomputed (`lean_save.defer`): the converter's save computes it just
    before the save, or hands its parts over as they are."""
    params = dict(chunk.named_parameters())
    filled = set()
    for name, tensor in tensors:
        if name not in params:
            raise ConversionError(f"converted tensor {name} has no parameter in the Megatron model")
        param = params[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ConversionError(
                f"{name}: converted shape {tuple(tensor.shape)} != Megatron parameter shape "
                f"{tuple(param.shape)} (config.json disagrees with the weights)"
            )
        if isinstance(tensor, hf_io.DeferredTensor) and tensor.dtype == param.dtype:
            defer(param, tensor.make, tensor.parts)
        elif isinstance(tensor, hf_io.DeferredTensor):
            param.data = tensor.make().to(param.dtype).contiguous()
        else:
            param.data = tensor.to(param.dtype).contiguous()
        filled.add(name)
    missing = sorted(set(params) - filled)
    if missing:
        raise ConversionError(f"Megatron parameters left unfilled by the HF checkpoint: {missing[:6]}")


def megatron_to_hf(
    src: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    dtype: str = "auto",
    tokenizer: Optional[str | Path | ExportTokenizer] = None,
    max_shard_size: str | int = "5GB",
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = True,
) -> ConversionReport:
    """Convert the dqo-megatron checkpoint `src` into an HF model directory `out` (safetensors, config.json,
    generation_config.json, the tokenizer of `tokenizer` (an HF tokenizer directory or a sentencepiece .model,
    see `hf_tokenizer.export_tokenizer`; or as `hf_tokenizer.checked_tokenizer_source` read it) or of the
    checkpoint's ``hf/``), loadable by transformers as is. The tokenizer is read once and checked against the
    model's vocabulary before the weights load.

    Args:
        dtype: written dtype: auto (the checkpoint's), fp32, bf16 or fp16.
        max_shard_size: largest safetensors file (e.g. "5GB"); more than one writes an index.
        verify: compare logits of the written HF model with the checkpoint; refuse to write on failure.
    """
    start = time.perf_counter()
    check_tolerance(tolerance)
    src, out = Path(src), Path(out)
    given = tokenizer.path if isinstance(tokenizer, ExportTokenizer) else tokenizer
    inputs = [src] + ([Path(given)] if given is not None else [])
    check_output(out.absolute(), overwrite, inputs)
    tokenizer_source = checked_tokenizer_source(tokenizer)  # a directory or a sentencepiece .model
    cfg, info = read_metadata(src)
    if info.kind != "policy":
        raise ConversionError(f"{src} is a {info.kind} checkpoint; only policy checkpoints have an HF equivalent")
    fam = family(cfg.family)
    out_dtype = info.torch_dtype if dtype == "auto" else _resolve_dtype(dtype, set(), src)
    shipped = tokenizer_source if tokenizer_source is not None else read_export_tokenizer(src / HF_DIR)
    check_tokenizer_fits(shipped, cfg.vocab_size)  # refused now, not after the weights
    max_bytes = hf_io.parse_size(max_shard_size)
    base_config = None
    if (src / HF_DIR / "config.json").is_file():
        import json

        base_config = json.loads((src / HF_DIR / "config.json").read_text())
    parity = None
    with staged_output(out, overwrite, inputs) as tmp, single_process_layout():
        (chunk,) = build_empty_chunks(cfg, ParallelConfig(), info.torch_dtype)
        load_chunks([chunk], src / WEIGHTS_DIR)
        params = {name: p.detach() for name, p in chunk.named_parameters()}
        rules = fam.rules(cfg)

        def get(name: str) -> torch.Tensor:
            return params[name].to(out_dtype)

        def hf_bytes(rule) -> int:
            rows = params[rule.megatron]
            numel = (
                rows.numel()
                if "word_embeddings" not in rule.megatron and "output_layer" not in rule.megatron
                else cfg.vocab_size * rows.shape[1]
            )
            return numel * torch.tensor([], dtype=out_dtype).element_size()

        hf_io.write_hf_safetensors(tmp, rules, get, hf_bytes, max_bytes, progress)
        hf_io.write_json(tmp / "config.json", fam.config_to_hf(cfg, base_config, out_dtype))
        export_tokenizer(shipped, tmp)  # tokenizer files, generation_config.json
        params.clear()  # frees the tensors (the closures above still name the dict)
        del chunk
        if verify:
            cast = out_dtype if out_dtype != info.torch_dtype else None
            parity = verify_parity(tmp, src, tolerance, round_megatron_to=cast)
            logger.info(parity.summary())
            _fail_on_parity(parity)
    return ConversionReport(out, cfg, dtype_name(out_dtype), time.perf_counter() - start, parity)
