"""The converter's save path, fast and lean: parameters computed only when written, split tensors
handed over instead of cloned, the torch_dist files written by threads of this process.

`dist_checkpointing.save` as shipped forks a writer process per file, clones every view it is given
and holds the whole model while writing. A one-off conversion does not need any of that: `defer`
attaches a parameter's value uncomputed, `build_factories_consuming_params` replaces Megatron's
factories by owned copies one at a time and frees the fused parameter, and `in_process_save` writes
the same records (`record_writer`) in-process, releasing each storage once written.
`megatron_io.save_chunks` uses all three; training checkpoints use `in_process_writer` only.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

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


def build_factories_consuming_params(state: dict, deferred: Optional[dict] = None) -> None:
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
    from dqo_megatron.compat.megatron_api import file_writer_attribute

    return file_writer_attribute() is not None


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

    from dqo_megatron.compat.megatron_api import file_writer_attribute

    name = file_writer_attribute()
    if name is None:  # megatron-core changed: keep its writer
        yield
        return
    original = FileSystemWriterAsync.__dict__[name]
    setattr(
        FileSystemWriterAsync,
        name,
        staticmethod(functools.partial(_write_buckets_in_process, original.__func__, free_written, deferred or {})),
    )
    try:
        yield
    finally:
        setattr(FileSystemWriterAsync, name, original)


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


def deferred_parameters(chunks: list, consume: bool) -> dict:
    """``{buffer address: (parameter, deferred value)}`` of the chunks' deferred parameters, for the
    in-process writer to compute when it writes them; empty (every deferred parameter computed now)
    unless `consume` and this megatron-core's writer can be replaced."""
    if not (consume and _in_process_writer_available()):
        materialize_deferred(chunks)
        return {}
    return {
        param.untyped_storage().data_ptr(): (param, getattr(param, _DEFERRED))
        for chunk in chunks
        for param in chunk.parameters()
        if hasattr(param, _DEFERRED)
    }


@contextlib.contextmanager
def in_process_save(free_written: bool = False, deferred: Optional[dict] = None) -> Iterator[None]:
    """`in_process_writer` for the converter: also frees each storage once written (`free_written`) and
    computes `deferred` parameters (`deferred_parameters`) just before writing them."""
    with _in_process_write_results(), _in_process_file_writer(free_written=free_written, deferred=deferred):
        yield
