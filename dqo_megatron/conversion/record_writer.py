"""Writing checkpoint records fast: byte for byte what `torch.save` writes, without its two passes.

Used by `in_process_save`'s in-process writer for `dist_checkpointing`'s torch_dist files. `_record_bytes`
writes a tensor's zip record with the bytes checksummed piecewise (GIL released) and the CRC patched in
where torch.save puts it; `_fast_records_ok` checks once per process that the result equals
torch.save's output, else every record goes through torch.save. `_Writeback` starts the kernel's
write-out as a file grows (so the final fsync is short); `_release` / `_malloc_trim` give memory back
as records are written.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Optional

import torch


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
    samples = [
        torch.randn(37, 5, generator=generator).to(torch.bfloat16),
        torch.randn(3, generator=generator),
        torch.arange(1000, dtype=torch.int64).reshape(10, 100),
    ]
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
