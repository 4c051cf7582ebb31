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
import ctypes
import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
import yaml

from dqo_megatron.config import ConfigError, ModelConfig, ParallelConfig
from dqo_megatron.config.loader import from_dict, to_dict
from dqo_megatron.conversion.registry import ConversionError

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
        raise ConversionError(f"{path}: checkpoint format version {info.format_version}, this code reads "
                              f"{FORMAT_VERSION}")  # fmt: skip
    if info.dtype not in DTYPES:
        raise ConversionError(f"{path / INFO_FILE}: dtype {info.dtype!r} not one of {sorted(DTYPES)}")
    try:
        cfg = from_dict(ModelConfig, yaml.safe_load((path / CONFIG_FILE).read_text()) or {}, "model")
    except (ConfigError, yaml.YAMLError) as exc:
        raise ConversionError(f"{path / CONFIG_FILE}: {exc}") from None
    return cfg, info


# ------------------------------------------------------------------------------------------- output
@contextlib.contextmanager
def staged_output(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A temporary directory beside `out` that becomes `out` when the block succeeds.

    Fails before any work when `out` exists and not `overwrite`. On error the temporary directory is
    removed, so no partial output is ever visible under `out`; on success an existing `out` is replaced
    (renamed aside, then deleted) only after the new one is complete.
    """
    out = Path(out).absolute()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output(out: Path, overwrite: bool) -> None:
    """ConversionError when `out` exists (and not `overwrite`) or is a file."""
    if out.exists() and not overwrite:
        raise ConversionError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory")


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
    empty or absent).

    `consume=True` (the converter, which discards the model afterwards): split tensors are handed to the
    writer as owned copies while their fused parameter is freed, so the save does not hold the model's
    fc1 twice. Megatron stores the gated fc1 as two halves (a `ShardedTensorFactory`, so that any TP can
    take its slice of each); the halves are views, and the file writer clones every view it gets -- all
    of them at once (measured: +0.4 GiB on a 0.5B model). The chunks are unusable afterwards.
    """
    from megatron.core import dist_checkpointing

    weights_dir = Path(weights_dir)
    if torch.distributed.get_rank() == 0:
        weights_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    state = sharded_state_dict(chunks)
    if consume:
        _build_factories_consuming_params(state)
    with _in_process_write_results(), _in_process_file_writer(free_written=consume):
        dist_checkpointing.save(state, str(weights_dir))


def _build_factories_consuming_params(state: dict) -> None:
    """Replace each `ShardedTensorFactory` in `state` by what it builds, with owned copies of the data, and
    free the parameter it was built from -- one factory at a time, so at most one extra layer is held."""
    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def own(item):
        if isinstance(item, ShardedTensor):
            item.data = item.data.clone()
        return item

    def build(item):
        if not isinstance(item, ShardedTensorFactory):
            return item
        built = item.build()
        dict_list_map_inplace(own, built)
        source = item.data
        source.data = source.data.new_empty(0)  # the Parameter (keep_vars): its storage goes now
        _malloc_trim()
        return built

    dict_list_map_inplace(build, state)
    _malloc_trim()


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


@contextlib.contextmanager
def _in_process_file_writer(free_written: bool = False) -> Iterator[None]:
    """Write the torch_dist files in this process (one file after another) instead of in forked children.

    Megatron's synchronous save still forks one writer process per file (`write_preloaded_data_multiproc`);
    each child serializes its tensors while sharing the parent's pages, and the forks, their queues and
    joins cost time on a small machine. Here the same `_write_item` records (torch.save per tensor, the
    same WriteResults, so the same files and metadata) are written by this process. Each file is fsync'd
    once, in a background thread while the next file is being written, and all before the save returns
    (so before the caller renames the staging directory).

    `free_written=True` (the converter, which discards the model): every tensor's storage is released as
    soon as its record is written, so memory falls during the save instead of staying at the model's size.
    """
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    original = FileSystemWriterAsync.__dict__.get("write_preloaded_data_multiproc")
    if original is None:  # megatron-core changed: keep its writer
        yield
        return
    FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(
        functools.partial(_write_buckets_in_process, original.__func__, free_written)
    )
    try:
        yield
    finally:
        FileSystemWriterAsync.write_preloaded_data_multiproc = original


def _write_buckets_in_process(original, free_written, transform_list, use_msc, rank, write_buckets,
                              results_queue) -> None:  # fmt: skip
    """Drop-in for `FileSystemWriterAsync.write_preloaded_data_multiproc`: puts ``{file index: [WriteResult]}``
    (or the exception) on `results_queue`, like Megatron's."""
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    from torch.distributed.checkpoint.filesystem import _write_item

    if use_msc:  # object storage: Megatron's own path
        return original(transform_list, use_msc, rank, write_buckets, results_queue)
    extra = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    users: dict[int, int] = {}  # storage -> items still to write from it (never free one still needed)
    for _, _, (_, tensor_data) in write_buckets:
        for _, tensor in tensor_data:
            key = tensor.untyped_storage().data_ptr()
            users[key] = users.get(key, 0) + 1
    file_maps = _file_backed_ranges() if free_written else []
    results: dict = {}
    syncs = []
    try:
        streams = [open(file_name, "wb") for file_name, _, _ in write_buckets]
        try:
            for index, (_, storage_key, (bytes_data, _)) in enumerate(write_buckets):
                results[index] = [_write_item(*transform_list, streams[index], data, item, storage_key, **extra)
                                  for item, data in bytes_data]  # fmt: skip
            # Owned (freeable) tensors first, so memory has fallen before mapped ones are paged in.
            order = [(index, item, tensor) for index, (_, _, (_, tensor_data)) in enumerate(write_buckets)
                     for item, tensor in tensor_data]  # fmt: skip
            if free_written:
                order.sort(key=lambda entry: not entry[2].untyped_storage().resizable())
            for index, item, tensor in order:
                storage_key = write_buckets[index][1]
                results[index].append(_write_item(*transform_list, streams[index], tensor, item, storage_key, **extra))
                key = tensor.untyped_storage().data_ptr()
                users[key] -= 1
                if free_written and users[key] == 0 and key != 0:
                    _release(tensor.untyped_storage(), file_maps)
            for stream in streams:
                stream.flush()
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        with ThreadPoolExecutor(max_workers=len(streams)) as fsync_pool:
            syncs = [fsync_pool.submit(_fsync_close, stream) for stream in streams]
            for sync in syncs:
                sync.result()
        if free_written:
            _malloc_trim()
    except Exception as exc:  # noqa: BLE001 -- Megatron's protocol: the exception goes on the queue
        results = exc
    results_queue.put(results)


def _release(storage, file_maps: list[tuple[int, int]]) -> None:
    """Give a written storage's memory back: resize owned storages to 0; for storages that map a file (the
    safetensors reader returns tensors backed by the shard's mmap, resident once touched), drop the
    pages from this process (``madvise(MADV_DONTNEED)``: unmodified file pages read back unchanged if
    ever touched again; the page cache keeps them, outside this process's memory)."""
    if storage.resizable():
        big = storage.nbytes() >= 1 << 20
        storage.resize_(0)
        if big:
            _malloc_trim()
        return
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not any(lo <= start and end <= hi for lo, hi in file_maps):
        return
    page = os.sysconf("SC_PAGE_SIZE")
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


def _file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of regular files (Linux; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/") and fields[4] != "0":
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


@functools.lru_cache(maxsize=1)
def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _malloc_trim() -> None:
    """Return freed heap memory to the OS (glibc keeps freed chunks below its mmap threshold)."""
    try:
        _libc().malloc_trim(0)
    except (AttributeError, OSError):
        pass


def _fsync_close(stream) -> None:
    try:
        os.fsync(stream.fileno())
    finally:
        stream.close()


def load_chunks(chunks: list, weights_dir: str | Path) -> None:
    """Load `weights_dir` into this rank's chunks in place, whatever layout saved it (collective)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    weights_dir = Path(weights_dir)
    if not (weights_dir / "metadata.json").is_file():
        raise ConversionError(f"{weights_dir}: not a Megatron distributed checkpoint (no metadata.json)")
    try:
        state = dist_checkpointing.load(sharded_state_dict(chunks), str(weights_dir))
    except CheckpointingException as exc:
        raise ConversionError(f"{weights_dir}: cannot be loaded into this model: {exc}") from None
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"chunk{i}"], strict=True)


@contextlib.contextmanager
def single_process_layout() -> Iterator[None]:
    """Megatron at TP=PP=1 in this process for the duration (creating a world-size-1 gloo/NCCL group when
    none exists, and tearing it down after); reuses an existing world-size-1 TP=1 PP=1 setup."""
    from megatron.core import parallel_state

    from dqo_megatron import parallel

    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1 or (
            parallel_state.model_parallel_is_initialized()
            and (parallel_state.get_tensor_model_parallel_world_size() != 1
                 or parallel_state.get_pipeline_model_parallel_world_size() != 1)
        ):  # fmt: skip
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
