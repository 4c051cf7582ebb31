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
import io
import json
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Optional, Sequence

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
    if parts and ((sum(p.shape[0] for p in parts), *parts[0].shape[1:]) != tuple(param.shape)
                  or any(p.dtype != param.dtype or p.shape[1:] != parts[0].shape[1:] for p in parts)):  # fmt: skip
        raise ValueError(f"parts {[tuple(p.shape) for p in parts]} ({parts[0].dtype}) do not concatenate into "
                         f"{tuple(param.shape)} ({param.dtype})")  # fmt: skip
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
        raise ConversionError(f"a deferred tensor computed {tuple(value.shape)} {value.dtype}, its parameter is "
                              f"{tuple(param.shape)} {param.dtype}")  # fmt: skip
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

    weights_dir = Path(weights_dir)
    if torch.distributed.get_rank() == 0:
        weights_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    deferred: dict[int, tuple[torch.Tensor, _Deferred]] = {}
    if consume and _in_process_writer_available():
        deferred = {param.untyped_storage().data_ptr(): (param, getattr(param, _DEFERRED))
                    for chunk in chunks for param in chunk.parameters() if hasattr(param, _DEFERRED)}  # fmt: skip
    else:
        materialize_deferred(chunks)
    state = sharded_state_dict(chunks)
    if consume:
        _build_factories_consuming_params(state, deferred)
    with _in_process_write_results(), _in_process_file_writer(free_written=consume, deferred=deferred):
        dist_checkpointing.save(state, str(weights_dir))


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
    return (tensor.storage_offset() == 0 and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() == tensor.untyped_storage().nbytes())  # fmt: skip


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


def _write_buckets_in_process(original, free_written, deferred, transform_list, use_msc, rank, write_buckets,
                              results_queue) -> None:  # fmt: skip
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
                results = [_write_item(*transform_list, stream, data, item, storage_key, **extra)
                           for item, data in bytes_data]  # fmt: skip
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

    return [(name, key, (bytes_data, [(item, value(tensor)) for item, tensor in tensor_data]))
            for name, key, (bytes_data, tensor_data) in write_buckets]  # fmt: skip


def _deferred_value(tensor: torch.Tensor, param: torch.Tensor, deferred: _Deferred) -> torch.Tensor:
    """The value of `tensor`, a view of deferred `param`'s buffer: computed now."""
    value = _computed(deferred, param)
    if _whole_storage(tensor):
        return value.view(tensor.shape)
    return value.as_strided(tensor.size(), tensor.stride(), tensor.storage_offset()).clone()


# ------------------------------------------------------------------------------ tensor records
class _RecordSkeleton(io.RawIOBase):
    """What ``torch.save`` writes under `torch.serialization.skip_data`: every byte except the storages',
    whose places it skips with ``seek(n, SEEK_CUR)`` -- kept as the pieces around those gaps."""

    def __init__(self) -> None:
        super().__init__()
        self.pieces, self.gaps, self.position = [bytearray()], [], 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.pieces[-1] += view
        self.position += view.nbytes
        return view.nbytes

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_CUR and offset > 0:
            self.gaps.append(offset)
            self.pieces.append(bytearray())
            self.position += offset
        elif not (whence == os.SEEK_CUR and offset == 0 or whence == os.SEEK_SET and offset == self.position):
            raise io.UnsupportedOperation("only skipping forward")
        return self.position

    def tell(self) -> int:
        return self.position


_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_MASK64 = (1 << 64) - 1


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t."""
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & _MASK64)) & _MASK64


@dataclass
class _TailPlan:
    """Where the CRC32 of a record's storage bytes goes in the part of the zip that follows them.

    ``torch.save`` (PyTorchStreamWriter) writes a stored zip: local headers with data descriptors (the CRC
    comes after the data), a central directory (the CRC again), and an ``.data/serialization_id`` record
    whose second 20 digits are ``c10::hash_combine`` folded over the records' CRCs in order (so it
    changes with the data too, as does its own CRC)."""

    tail: bytearray
    data_entry: int
    """Offset in `tail` of the storage record's central directory entry."""
    crcs: list
    """CRC of every record before the serialization id, in order; None marks the storage record's."""
    id_at: int
    """Offset in `tail` of the serialization id's 40 digits (its data descriptor follows them)."""
    id_entry: int
    """Offset in `tail` of the serialization id's central directory entry."""

    def apply(self, crc: int) -> bytearray:
        tail = bytearray(self.tail)
        crc_bytes = _U32.pack(crc)
        tail[4:8] = crc_bytes  # the storage record's data descriptor
        tail[self.data_entry + 16 : self.data_entry + 20] = crc_bytes
        seed = 0
        for value in self.crcs:
            seed = _hash_combine(seed, crc if value is None else value)
        new_id = tail[self.id_at : self.id_at + 20] + f"{seed:020d}".encode()
        tail[self.id_at : self.id_at + 40] = new_id
        id_crc = _U32.pack(zlib.crc32(new_id))
        tail[self.id_at + 44 : self.id_at + 48] = id_crc  # its data descriptor: PK\7\8, crc
        tail[self.id_entry + 16 : self.id_entry + 20] = id_crc
        return tail


def _tail_plan(tail: bytearray, base: int, nbytes: int) -> Optional[_TailPlan]:
    """Parse the zip after a record's storage bytes (`base`: the tail's offset in the record); None
    unless it is exactly the layout `_TailPlan` describes (anything else: write with torch.save)."""
    try:
        if tail[:4] != b"PK\x07\x08" or _U32.unpack_from(tail, 4)[0] != 0:
            return None
        end = tail.rfind(b"PK\x05\x06")
        count, cd_offset = _U16.unpack_from(tail, end + 10)[0], _U32.unpack_from(tail, end + 16)[0]
        at = cd_offset - base
        if end < 0 or cd_offset == 0xFFFFFFFF or at < 0:
            return None
        crcs, data_entry, id_entry, id_local = [], None, None, None
        for _ in range(count):
            if tail[at : at + 4] != b"PK\x01\x02":
                return None
            crc, size = _U32.unpack_from(tail, at + 16)[0], _U32.unpack_from(tail, at + 24)[0]
            name_len, extra_len, comment_len = (_U16.unpack_from(tail, at + k)[0] for k in (28, 30, 32))
            local = _U32.unpack_from(tail, at + 42)[0]
            name = bytes(tail[at + 46 : at + 46 + name_len])
            if name.endswith(b"/.data/serialization_id"):
                if id_entry is not None or size != 40:
                    return None
                id_entry, id_local = at, local
            elif name.endswith(b"/data/0") and size == nbytes and local < base - nbytes:
                if data_entry is not None or crc != 0:
                    return None
                data_entry = at
                crcs.append(None)
            else:
                crcs.append(crc)
            at += 46 + name_len + extra_len + comment_len
        if data_entry is None or id_entry is None or id_local < base:
            return None
        local = id_local - base
        if tail[local : local + 4] != b"PK\x03\x04":
            return None
        id_at = local + 30 + _U16.unpack_from(tail, local + 26)[0] + _U16.unpack_from(tail, local + 28)[0]
        digits = bytes(tail[id_at : id_at + 40])
        if not digits.isdigit() or tail[id_at + 40 : id_at + 44] != b"PK\x07\x08":
            return None
        seed = 0
        for value in crcs:
            seed = _hash_combine(seed, value or 0)
        if int(digits[20:]) != seed:  # the id is not what this model of it predicts
            return None
        return _TailPlan(tail, data_entry, crcs, id_at, id_entry)
    except (struct.error, ValueError, IndexError):
        return None


_CHUNK = 512 << 10
"""Bytes checksummed then written at a time: half a core's L2 here (measured on the 0.5B benchmark's
943 MB from the page cache: 512 KiB-1 MiB pieces 0.6-0.8 s, 2 MiB 1.4 s, 8 MiB 2.2 s)."""


def _storage_bytes(storage) -> memoryview:
    """The bytes of a CPU storage, without copying."""
    flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    return memoryview(flat.numpy())


def _record_bytes(tensor: torch.Tensor, stream) -> Optional[int]:
    """Write exactly what ``torch.save(tensor, stream)`` writes and return its length, or None (nothing
    written) where this cannot (then use torch.save).

    torch.save computes the zip's CRC32 of the storage bytes itself (miniz, ~1.4 GB/s here, holding the
    GIL), then writes them all through Python's file object: two passes over a tensor larger than the
    caches. Here torch.save writes everything but those bytes (`torch.serialization.skip_data`); the
    bytes are written straight from the storage in `_CHUNK` pieces, each checksummed (zlib, ~4 GB/s,
    GIL released, so two writer threads use two cores) just before it is written, while it is still in
    the core's cache; the CRC then goes where torch.save puts its own (`_TailPlan`). `_fast_records_ok`
    checks once per process that the result is byte for byte torch.save's."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    if tensor.device.type != "cpu" or not 0 < nbytes < 0xFFFFFFFF - (1 << 24):  # no zip64 offsets
        return None
    skeleton = _RecordSkeleton()
    with torch.serialization.skip_data():
        torch.save(tensor, skeleton)
    if skeleton.gaps != [nbytes] or len(skeleton.pieces) != 2:
        return None
    head, tail = skeleton.pieces
    plan = _tail_plan(tail, len(head) + nbytes, nbytes)
    if plan is None:
        return None
    stream.write(head)
    data, crc = _storage_bytes(storage), 0
    for start in range(0, nbytes, _CHUNK):
        piece = data[start : start + _CHUNK]
        crc = zlib.crc32(piece, crc)
        stream.write(piece)
    tail = plan.apply(crc)
    stream.write(tail)
    return len(head) + nbytes + len(tail)


def _write_tensor_record(stream, tensor: torch.Tensor, item, storage_key: str):
    """`_write_item` for a tensor without stream transforms, through `_record_bytes`; None when that
    declines (nothing written)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.storage import WriteResult

    offset = stream.tell()
    length = _record_bytes(tensor, stream)
    if length is None:
        return None
    return WriteResult(index=item.index, size_in_bytes=length, storage_data=_StorageInfo(storage_key, offset, length))


@functools.lru_cache(maxsize=1)
def _fast_records_ok() -> bool:
    """Whether `_record_bytes` reproduces torch.save byte for byte in this torch (checked once per
    process on small tensors; False: every record goes through torch.save)."""
    if not torch.serialization.get_crc32_options():
        return False
    generator = torch.Generator().manual_seed(0)
    samples = [torch.randn(37, 5, generator=generator).to(torch.bfloat16), torch.randn(3, generator=generator),
               torch.arange(1000, dtype=torch.int64).reshape(10, 100)]  # fmt: skip
    try:
        for sample in samples:
            ours, reference = io.BytesIO(), io.BytesIO()
            torch.save(sample, reference)
            if _record_bytes(sample, ours) is None or ours.getvalue() != reference.getvalue():
                return False
    except Exception:  # noqa: BLE001 -- any surprise: use torch.save
        return False
    return True


_WRITER_THREADS = 2
"""Files written at once (one thread each; the record writer releases the GIL for the bytes)."""
_WRITEBACK_BYTES = 32 << 20
"""Write-out of a file being written is started every this many bytes (`_Writeback`)."""


class _Writeback:
    """Starts the kernel's write-out of the files being written, every `_WRITEBACK_BYTES`, so that each
    file's final fsync waits for its tail only (the write-out of the rest overlaps the writing).

    ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` only queues the I/O, but may block while the device queue
    is full (measured: ~0.2 s per GB here), so the calls are made by a thread of its own, on duplicates
    of the writers' descriptors (closed by that thread after its last call for them). A hint: errors are
    ignored, and it does nothing where the call does not exist (not Linux)."""

    def __init__(self) -> None:
        import queue
        import threading

        self.call = _sync_file_range() if _WRITEBACK_BYTES > 0 else None
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = None
        if self.call is not None:
            self.thread = threading.Thread(target=self._run, name="dqo-writeback", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            fd, start, length = job
            if length is None:
                with contextlib.suppress(OSError):
                    os.close(fd)
            else:
                self.call(fd, start, length, 2)  # SYNC_FILE_RANGE_WRITE

    def follow(self, stream) -> "_FollowedFile":
        """A tracker for `stream`: call its `step()` after each record and `close()` before closing it."""
        return _FollowedFile(self, stream)

    def close(self) -> None:
        if self.thread is not None:
            self.jobs.put(None)
            self.thread.join()


class _FollowedFile:
    def __init__(self, writeback: _Writeback, stream) -> None:
        self.writeback, self.stream, self.done = writeback, stream, 0
        self.fd = os.dup(stream.fileno()) if writeback.thread is not None else None

    def step(self) -> None:
        if self.fd is None:
            return
        end = self.stream.tell()
        if end - self.done >= _WRITEBACK_BYTES:
            self.writeback.jobs.put((self.fd, self.done, end - self.done))
            self.done = end

    def close(self) -> None:
        if self.fd is not None:
            self.writeback.jobs.put((self.fd, 0, None))
            self.fd = None


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    try:
        call = _libc().sync_file_range
    except AttributeError:
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


def _release(storage, file_maps: list[tuple[int, int]], trim: bool = True) -> None:
    """Give a written storage's memory back: resize owned storages to 0; for storages that map a file (the
    safetensors reader returns tensors backed by the shard's mmap, resident once touched), drop the
    pages from this process (``madvise(MADV_DONTNEED)``: unmodified file pages read back unchanged if
    ever touched again; the page cache keeps them, outside this process's memory)."""
    if storage.resizable():
        big = trim and storage.nbytes() >= 1 << 20
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
