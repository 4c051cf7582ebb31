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
import functools
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Sequence

import torch
import yaml

from dqo_megatron.checkpoint_integrity import (
    MANIFEST_FILE,
    ManifestError,
    all_gather,
    children_die_with_parent,
    dcp_size_problems,
    deferred_single_rank_errors,
    one_line,
    save_error_message,
    verify_directory,
    write_manifest_everywhere,
)
from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig
from dqo_megatron.config.loader import from_dict, to_dict
from dqo_megatron.conversion.record_writer import (
    _WRITER_THREADS,
    _fast_records_ok,
    _file_backed_ranges,
    _malloc_trim,
    _release,
    _write_tensor_record,
    _Writeback,
)
from dqo_megatron.conversion.registry import ConversionError
from dqo_megatron.outputs import OutputError, check_apart, refuse_existing, staged_dir

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INFO_FILE = "checkpoint.json"
CONFIG_FILE = "model_config.yaml"
WEIGHTS_DIR = "weights"
HF_DIR = "hf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Names written in checkpoint.json (torch's spelling without the ``torch.`` prefix)."""


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
        return DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (only the three parameter dtypes are accepted)."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConversionError(f"parameter dtype {dtype} is not supported (float32, bfloat16, float16)")
    return name


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
    if info.dtype not in DTYPES:
        raise ConversionError(f"{path / INFO_FILE}: dtype {info.dtype!r} not one of {sorted(DTYPES)}")
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


_DEFERRED = "_dqo_deferred"
"""Attribute of a parameter whose value is computed when it is written (`defer`)."""


@dataclass(frozen=True)
class _Deferred:
    make: Callable[[], torch.Tensor]
    parts: tuple


def defer(param: torch.nn.Parameter, make: Callable[[], torch.Tensor], parts: Sequence[torch.Tensor] = ()) -> None:
    """Declare `param`'s value to be ``make()`` without computing it now.

    Its buffer (uninitialized and never touched, so never resident) keeps the shape for the sharded
    state dict. The converter's `save_chunks(consume=True)` computes the value just before writing it
    and frees it right after, so e.g. the fused QKV of all layers never exist at once. `parts`, when
    given, are tensors whose concatenation along dim 0 the value is (the gated fc1 = ``[gate; up]``):
    where Megatron's checkpoint stores exactly one part (its fc1 halves), the part is written as it is,
    with no copy. Anything else that uses the parameter must call `materialize_deferred` first
    (`save_chunks` does whenever it cannot write the value itself).
    """
    parts = tuple(parts)
    if parts and (
        (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) != tuple(param.shape)
        or any(p.dtype != param.dtype or p.shape[1:] != parts[0].shape[1:] for p in parts)
    ):
        raise ValueError(
            f"parts {[tuple(p.shape) for p in parts]} ({parts[0].dtype}) do not concatenate into "
            f"{tuple(param.shape)} ({param.dtype})"
        )
    setattr(param, _DEFERRED, _Deferred(make, parts))
    if param.numel() == 0 or not _whole_storage(param.data):  # the writer finds buffers by their address
        _materialize(param)


def materialize_deferred(chunks: list) -> None:
    """Compute every deferred parameter's value into its buffer (see `defer`)."""
    for chunk in chunks:
        for param in chunk.parameters():
            _materialize(param)


@torch.no_grad()
def _materialize(param: torch.Tensor) -> None:
    deferred = getattr(param, _DEFERRED, None)
    if deferred is not None:
        param.data.copy_(_computed(deferred, param))  # into the buffer: views made of it see the value
        delattr(param, _DEFERRED)


def _computed(deferred: _Deferred, param: torch.Tensor) -> torch.Tensor:
    value = deferred.make()
    if value.shape != param.shape or value.dtype != param.dtype:
        raise ConversionError(
            f"a deferred tensor computed {tuple(value.shape)} {value.dtype}, its parameter is "
            f"{tuple(param.shape)} {param.dtype}"
        )
    return value.contiguous()


def save_chunks(chunks: list, weights_dir: str | Path, consume: bool = False) -> None:
    """Save the chunks of every rank into `weights_dir` (collective, synchronous; the directory must be
    empty or absent).

    `consume=True` (the converter, which discards the model afterwards): split tensors are handed to the
    writer as owned copies while their fused parameter is freed, so the save does not hold the model's
    fc1 twice. Megatron stores the gated fc1 as two halves (a `ShardedTensorFactory`, so that any TP can
    take its slice of each); the halves are views, and the file writer clones every view it gets -- all
    of them at once (measured: +0.4 GiB on a 0.5B model). A deferred parameter (`defer`) hands over its
    parts instead when they are those halves, or is computed by the writer just before its record is
    written; every storage is released once written. The chunks are unusable afterwards.
    """
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    weights_dir = Path(weights_dir)
    if torch.distributed.get_rank() == 0:
        weights_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    deferred: dict[int, tuple[torch.Tensor, _Deferred]] = {}
    if consume and _in_process_writer_available():
        deferred = {
            param.untyped_storage().data_ptr(): (param, getattr(param, _DEFERRED))
            for chunk in chunks
            for param in chunk.parameters()
            if hasattr(param, _DEFERRED)
        }
    else:
        materialize_deferred(chunks)
    state = sharded_state_dict(chunks)
    if consume:
        _build_factories_consuming_params(state, deferred)
    errors: list[BaseException] = []
    try:
        with (
            _in_process_write_results(),
            _in_process_file_writer(free_written=consume, deferred=deferred),
            deferred_single_rank_errors(errors),
            children_die_with_parent(),
        ):
            dist_checkpointing.save(state, str(weights_dir))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        errors.insert(0, exc)
    failure = save_error_message(errors, weights_dir)[0] if errors else None
    failures = [f"rank {rank}: {f}" for rank, f in enumerate(all_gather(failure)) if f is not None]
    if failures:
        raise ConversionError(f"saving {weights_dir} failed ({'; '.join(failures)})")
    try:  # what load_chunks checks (checkpoint_integrity, shared with training checkpoints)
        write_manifest_everywhere(weights_dir)
    except ManifestError as exc:  # raised on every rank alike
        raise ConversionError(str(exc)) from None


def _build_factories_consuming_params(state: dict, deferred: Optional[dict] = None) -> None:
    """Replace each `ShardedTensorFactory` in `state` by what it builds, with owned copies of the data, and
    free the parameter it was built from -- one factory at a time, so at most one extra layer is held.

    `deferred` (``{buffer address: (parameter, deferred value)}``, see `defer`) is updated to what the
    writer computes itself: whole parameters shown by plain sharded tensors. A factory's pieces of a
    deferred parameter become its parts when each piece is exactly one part (no copy); otherwise the
    parameter is computed first. So is one that a plain sharded tensor shows only partly (Megatron's
    writer would clone such a view)."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    deferred = {} if deferred is None else deferred

    def materialize_partly_shown(item):
        if isinstance(item, ShardedTensor) and item.data is not None:
            entry = deferred.get(item.data.untyped_storage().data_ptr())
            if entry is not None and not _whole_storage(item.data):
                _materialize(entry[0])
                del deferred[item.data.untyped_storage().data_ptr()]
        return item

    if deferred:
        dict_list_map_inplace(materialize_partly_shown, state)

    def own(item):
        if isinstance(item, ShardedTensor):
            item.data = item.data.clone()
        return item

    def build(item):
        if not isinstance(item, ShardedTensorFactory):
            return item
        built = item.build()
        source = item.data
        later = getattr(source, _DEFERRED, None)
        pieces = [v for v in nested_values(built) if isinstance(v, ShardedTensor)] if later is not None else []
        copied = later is None or not (later.parts and _hand_over_parts(pieces, source, later.parts))
        if copied:
            _materialize(source)
            dict_list_map_inplace(own, built)
        if hasattr(source, _DEFERRED):
            delattr(source, _DEFERRED)
        deferred.pop(source.untyped_storage().data_ptr(), None)
        source.data = source.data.new_empty(0)  # the Parameter (keep_vars): its storage goes now
        if copied:
            _malloc_trim()
        return built

    dict_list_map_inplace(build, state)
    _malloc_trim()


def _whole_storage(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is its whole storage, in order (not a view of a part of it)."""
    return (
        tensor.storage_offset() == 0
        and tensor.is_contiguous()
        and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes()
    )


def _hand_over_parts(pieces: list, source: torch.Tensor, parts: tuple) -> bool:
    """Point each piece (a sharded tensor viewing `source`) at the part holding exactly its rows; False,
    changing nothing, unless every piece viewing `source` is one whole part."""
    ptr, size = source.untyped_storage().data_ptr(), source.element_size()
    starts, offset = {}, 0
    for part in parts:
        starts[offset] = part
        offset += part.numel() * size
    plan = []
    for piece in pieces:
        data = piece.data
        if data is None or data.untyped_storage().data_ptr() != ptr:
            continue
        part = starts.get(data.storage_offset() * size)
        if part is None or not data.is_contiguous() or part.numel() != data.numel() or part.dtype != data.dtype:
            return False
        plan.append((piece, part.view(data.shape)))
    for piece, part in plan:
        piece.data = part
    return True


@contextlib.contextmanager
def in_process_writer() -> Iterator[None]:
    """During a synchronous `dist_checkpointing.save`: the torch_dist files are written by threads of this
    process and the results collected in-process (`_in_process_file_writer`, `_in_process_write_results`):
    no forked writer processes and no Manager process, so nothing can outlive a killed saver. Training
    checkpoints use it too."""
    with _in_process_write_results(), _in_process_file_writer():
        yield


@contextlib.contextmanager
def _in_process_write_results() -> Iterator[None]:
    """Collect the file writers' results through an in-process queue during a synchronous save.

    Megatron's `filesystem_async` caches a module-global results queue, by default a multiprocessing
    Manager queue: a spawned interpreter (measured ~2 s to start and ~1 s to stop here) that exists for
    async saves, whose collector runs in another process. `dist_checkpointing.save` without an async
    queue runs the collector in this process (`AsyncRequest.execute_sync`), so a `queue.Queue` carries
    the same results. Without this, the Manager also outlives processes that exit with ``os._exit``.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not hasattr(filesystem_async, "_results_queue"):  # megatron-core changed: keep its default
        yield
        return
    previous = filesystem_async._results_queue
    filesystem_async._results_queue = queue.Queue()
    try:
        yield
    finally:
        filesystem_async._results_queue = previous


def _in_process_writer_available() -> bool:
    """Whether `_in_process_file_writer` can replace Megatron's writer (this megatron-core has it)."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    return FileSystemWriterAsync.__dict__.get("write_preloaded_data_multiproc") is not None


@contextlib.contextmanager
def _in_process_file_writer(free_written: bool = False, deferred: Optional[dict] = None) -> Iterator[None]:
    """Write the torch_dist files in this process (a thread per file) instead of in forked children.

    Megatron's synchronous save still forks one writer process per file (`write_preloaded_data_multiproc`);
    each child serializes its tensors while sharing the parent's pages, and the forks, their queues and
    joins cost time on a small machine. Here the same records (byte for byte what torch.save writes, see
    `_record_bytes`; the same WriteResults, so the same files and metadata) are written by this process,
    one thread per file (Megatron makes two per rank). The kernel's write-out of each file is started
    while it is being written (`_Writeback`), and each file is fsync'd before the save returns (so
    before the caller renames the staging directory).

    `free_written=True` (the converter, which discards the model): every tensor's storage is released as
    soon as its record is written, so memory falls during the save instead of staying at the model's size.
    `deferred` (``{buffer address: (parameter, deferred value)}``, see `defer`): tensors whose storage is
    such a buffer are computed just before their record is written (and freed after).
    """
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.__dict__.get("write_preloaded_data_multiproc")
    if original is None:  # megatron-core changed: keep its writer
        yield
        return
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(
        functools.partial(_write_buckets_in_process, original.__func__, free_written, deferred or {})
    )
    try:
        yield
    finally:
        FileSystemWriterAsync.write_preloaded_data_multiproc = original


def _write_buckets_in_process(
    original, free_written, deferred, transform_list, use_msc, rank, write_buckets, results_queue
) -> None:
    """Drop-in for `FileSystemWriterAsync.write_preloaded_data_multiproc`: puts ``{file index: [WriteResult]}``
    (or the exception) on `results_queue`, like Megatron's."""
    import inspect
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed.checkpoint.filesystem import _write_item

    if use_msc:  # object storage: Megatron's own path, with the deferred values computed first
        return original(transform_list, use_msc, rank, _computed_buckets(write_buckets, deferred), results_queue)
    extra = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    users: dict[int, int] = {}  # storage -> items still to write from it (never free one still needed)
    for _, _, (_, tensor_data) in write_buckets:
        for _, tensor in tensor_data:
            key = tensor.untyped_storage().data_ptr()
            users[key] = users.get(key, 0) + 1
    lock = threading.Lock()
    file_maps = _file_backed_ranges() if free_written else []

    def write_file(index: int) -> list:
        file_name, storage_key, (bytes_data, tensor_data) = write_buckets[index]
        with open(file_name, "wb") as stream:
            followed = writeback.follow(stream)
            try:
                results = [
                    _write_item(*transform_list, stream, data, item, storage_key, **extra) for item, data in bytes_data
                ]
                tensors = list(tensor_data)
                if free_written:  # owned (freeable) tensors first: memory falls before mapped ones are paged in
                    tensors.sort(key=lambda entry: not entry[1].untyped_storage().resizable())
                for item, tensor in tensors:
                    storage = tensor.untyped_storage()
                    key = storage.data_ptr()
                    entry = deferred.get(key)
                    data = tensor if entry is None else _deferred_value(tensor, *entry)
                    result = _write_tensor_record(stream, data, item, storage_key) if fast else None
                    if result is None:
                        result = _write_item(*transform_list, stream, data, item, storage_key, **extra)
                    results.append(result)
                    del data
                    followed.step()
                    if free_written:
                        with lock:
                            users[key] -= 1
                            last = users[key] == 0 and key != 0
                        if last:
                            deferred.pop(key, None)
                            _release(storage, file_maps, trim=entry is None)
                stream.flush()
            finally:
                followed.close()
            os.fsync(stream.fileno())
        return results

    fast = _fast_records_ok() and not any(getattr(t, "extensions", ()) for t in transform_list)
    writeback = _Writeback()
    try:
        workers = max(1, min(len(write_buckets), _WRITER_THREADS))
        if workers == 1:
            results = {index: write_file(index) for index in range(len(write_buckets))}
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(write_file, index) for index in range(len(write_buckets))]
                results = {index: future.result() for index, future in enumerate(futures)}
        if free_written:
            _malloc_trim()
    except Exception as exc:  # noqa: BLE001 -- Megatron's protocol: the exception goes on the queue
        results = exc
    finally:
        writeback.close()
    results_queue.put(results)


def _computed_buckets(write_buckets: list, deferred: dict) -> list:
    """`write_buckets` with every deferred tensor replaced by its value."""

    def value(tensor):
        entry = deferred.get(tensor.untyped_storage().data_ptr())
        return tensor if entry is None else _deferred_value(tensor, *entry)

    return [
        (name, key, (bytes_data, [(item, value(tensor)) for item, tensor in tensor_data]))
        for name, key, (bytes_data, tensor_data) in write_buckets
    ]


def _deferred_value(tensor: torch.Tensor, param: torch.Tensor, deferred: _Deferred) -> torch.Tensor:
    """The value of `tensor`, a view of deferred `param`'s buffer: computed now."""
    value = _computed(deferred, param)
    if _whole_storage(tensor):
        return value.view(tensor.shape)
    return value.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset()).clone()


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
