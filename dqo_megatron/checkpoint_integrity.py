"""Checkpoints that are checked: a manifest of every file's size and CRC32, written at save time and
checked before a load; torch's reader errors and full disks turned into one message naming the file.

One implementation for both kinds of checkpoint directory we write with `dist_checkpointing`:
training checkpoints (`training.checkpointing`) and conversion checkpoints' ``weights/``
(`conversion.megatron_io`). This module raises nothing of its own kind beyond `ManifestError`: the
callers turn what it finds into their own errors (CheckpointError, ConversionError).

``MANIFEST.json``::

    {"format_version": 1, "algorithm": "crc32",
     "files": {"__0_0.distcp": {"size": 405487, "crc32": "9a3c01f2"}, "rng/rank_00000.pt": {...}, ...},
     "files_crc32": "<crc32 of the canonical JSON of "files">"}

Why CRC32 (zlib): ~4 GB/s on one core here (sha256 with SHA-NI: 1.8 GB/s), the GIL released, so
reading the files back costs more than hashing them; it catches truncation, overwritten blocks and
flipped bits (anything but deliberate forgery, which is not what a checkpoint manifest is for).
Each rank hashes the files it wrote (torch_dist names them ``__<rank>_<i>.distcp``; our RNG files
``rng/rank_<rank>.pt``), while they are still in the page cache; rank 0 hashes the rest. At load the
files are spread over all ranks by size and checked in parallel.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from dqo_megatron.errors import first_line
from dqo_megatron.processes import die_with_parent

logger = logging.getLogger(__name__)

MANIFEST_FILE = "MANIFEST.json"
MANIFEST_FORMAT = 1
VERIFY_MODES = ("full", "size", "off")
"""full: sizes and CRC32 of every file; size: sizes only (no reading); off: no check."""

_CHUNK = 8 << 20
_THREADS = 4
"""Files hashed at once by one rank (zlib and file reads release the GIL)."""
_RANK_FILES = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"^rng/rank_(\d+)\.pt$"))
_SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|file write failed")
_FULL_TEXT = {
    errno.ENOSPC: re.compile(rf"\[Errno {errno.ENOSPC}\]|No space left on device"),
    errno.EDQUOT: re.compile(rf"\[Errno {errno.EDQUOT}\]|Disk quota exceeded"),
}
"""An OSError's text inside another error's message (torch passes worker errors on as text)."""
_LOW_SPACE_BYTES = 64 << 20


class ManifestError(RuntimeError):
    """The manifest could not be made (a file could not be read) or read (missing keys, damaged)."""


# ------------------------------------------------------------------------------------------ hashing
def file_crc32(path: str | Path) -> tuple[int, int]:
    """``(size in bytes, CRC32)`` of the file at `path`, read sequentially in 8 MiB pieces."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        with contextlib.suppress(AttributeError, OSError):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def list_files(directory: str | Path, exclude: Iterable[str] = ()) -> list[str]:
    """Relative POSIX paths of the regular files under `directory` (recursively), sorted, minus `exclude`."""
    directory = Path(directory)
    skip = set(exclude) | {MANIFEST_FILE}
    found = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory).as_posix()
        if rel not in skip and path.is_file() and not path.is_symlink():
            found.append(rel)
    return sorted(found)


def writer_rank(rel: str, world: int) -> int:
    """The rank that wrote (and hashes) file `rel`: the rank in its name, else 0."""
    for pattern in _RANK_FILES:
        match = pattern.search(rel)
        if match and int(match.group(1)) < world:
            return int(match.group(1))
    return 0


def _checksums(directory: Path, names: Sequence[str]) -> dict[str, dict]:
    def one(rel: str) -> tuple[str, dict]:
        size, crc = file_crc32(directory / rel)
        return rel, {"size": size, "crc32": f"{crc:08x}"}

    if len(names) <= 1:
        return dict(map(one, names))
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(names))) as pool:
        return dict(pool.map(one, names))


def _files_crc(files: dict) -> str:
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return f"{zlib.crc32(canonical):08x}"


# ------------------------------------------------------------------------------------ collectives
def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj) -> list:
    """`obj` of every rank, by rank (a one-element list without torch.distributed)."""
    import torch.distributed as dist

    rank, world = _rank_and_world()
    if world == 1:
        return [obj]
    every: list = [None] * world
    dist.all_gather_object(every, obj)
    return every


def broadcast(obj):
    """Rank 0's `obj` on every rank (`obj` itself without torch.distributed)."""
    import torch.distributed as dist

    if _rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------- writing
def collect_manifest(directory: str | Path, exclude: Iterable[str] = ()) -> dict:
    """The manifest of every file under `directory` (collective: each rank hashes the files it wrote).

    Returns the same dict on every rank; raises ManifestError on every rank when any could not read
    its files. Call it after every rank's files are written (after a barrier)."""
    directory = Path(directory)
    rank, world = _rank_and_world()
    entries, error = {}, None
    try:
        mine = [rel for rel in list_files(directory, exclude) if writer_rank(rel, world) == rank]
        entries = _checksums(directory, mine)
    except OSError as err:
        error = f"rank {rank}: {type(err).__name__}: {err}"
    gathered = all_gather((entries, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        raise ManifestError(f"cannot checksum the files of {directory}: {'; '.join(errors)}")
    files = {rel: entry for part, _ in gathered for rel, entry in part.items()}
    files = dict(sorted(files.items()))
    return {"format_version": MANIFEST_FORMAT, "algorithm": "crc32", "files": files, "files_crc32": _files_crc(files)}


def write_manifest(directory: str | Path, manifest: dict) -> Path:
    """Write `manifest` as ``<directory>/MANIFEST.json`` (fsync'd; one process). Returns its path."""
    path = Path(directory) / MANIFEST_FILE
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def write_manifest_everywhere(directory: str | Path, exclude: Iterable[str] = ()) -> dict:
    """`collect_manifest` then `write_manifest` on rank 0 (collective); ManifestError on every rank when
    any rank could not read its files or rank 0 could not write the manifest (a full disk named)."""
    manifest = collect_manifest(directory, exclude)
    failure = None
    if _rank_and_world()[0] == 0:
        try:
            write_manifest(directory, manifest)
        except OSError as err:
            failure = save_error_message([err], Path(directory))[0]
    failures = [f for f in all_gather(failure) if f is not None]
    if failures:
        raise ManifestError(f"writing {Path(directory) / MANIFEST_FILE} failed: {failures[0]}")
    return manifest


def manifest_bytes(manifest: dict) -> int:
    """Total size of the files a manifest lists."""
    return sum(int(entry["size"]) for entry in manifest["files"].values())


# ------------------------------------------------------------------------------------------- reading
def read_manifest(directory: str | Path) -> dict | None:
    """``<directory>/MANIFEST.json`` checked against its own CRC, or None when there is none.

    Raises ManifestError naming the file when it is unreadable or damaged."""
    path = Path(directory) / MANIFEST_FILE
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ManifestError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    try:
        manifest = json.loads(text)
        files = manifest["files"]
        stored = manifest["files_crc32"]
        algorithm = manifest.get("algorithm")
        sizes_ok = all(isinstance(e["size"], int) and isinstance(e["crc32"], str) for e in files.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ManifestError(f"{path}: damaged ({type(err).__name__}: {err})") from None
    if algorithm != "crc32" or manifest.get("format_version") != MANIFEST_FORMAT:
        raise ManifestError(
            f"{path}: format {manifest.get('format_version')} / algorithm {algorithm!r}; this "
            f"code reads format {MANIFEST_FORMAT}, crc32"
        )
    if not sizes_ok or _files_crc(files) != stored:
        raise ManifestError(f"{path}: damaged (its own checksum does not match its contents)")
    return manifest


@dataclass
class Verification:
    """What `verify_directory` found (the same on every rank)."""

    problems: list[str] = field(default_factory=list)
    """One line per damaged, missing or unreadable file, each naming the file; empty: intact."""
    has_manifest: bool = False
    """Whether a manifest was checked (False: an older directory, checked against torch's metadata only)."""
    checked_bytes: int = 0
    """Bytes read and checksummed (mode full)."""


def verify_directory(directory: str | Path, mode: str = "full", *, manifest_required: bool = False) -> Verification:
    """Check `directory` against its manifest (collective: the files are spread over the ranks by size).

    mode: full (sizes and CRC32), size (sizes and presence only), off (nothing). Without a manifest
    (written before manifests existed) the ``.distcp`` files are checked against the sizes torch's
    ``.metadata`` implies (catches truncation and missing files), unless `manifest_required`, when the
    missing manifest itself is the problem. Never raises for a damaged directory: see `problems`."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode {mode!r}: choose one of {', '.join(VERIFY_MODES)}")
    if mode == "off":
        return Verification()
    directory = Path(directory)
    rank, world = _rank_and_world()
    problems, has_manifest, checked = [], False, 0
    try:
        manifest = read_manifest(directory)
    except ManifestError as err:
        manifest, problems = None, [str(err)]
    if manifest is not None:
        has_manifest = True
        share = spread_by_size(manifest["files"], world)[rank]
        problems, checked = _check_files(directory, {rel: manifest["files"][rel] for rel in share}, mode)
    elif not problems and rank == 0:
        if manifest_required:
            problems = [f"{directory / MANIFEST_FILE}: missing (the checkpoint's COMPLETE marker says one was written)"]
        else:
            problems = dcp_size_problems(directory)
    gathered = all_gather((problems, has_manifest, checked))
    every = sorted({p for part, _, _ in gathered for p in part})
    return Verification(every, any(m for _, m, _ in gathered), sum(c for _, _, c in gathered))


def spread_by_size(files: dict, world: int) -> list[list[str]]:
    """`files` (name -> {"size": ...}) split into `world` lists of about equal total size
    (largest first to the least loaded rank; deterministic, so every rank computes the same split)."""
    loads = [(0, r) for r in range(world)]
    shares: list[list[str]] = [[] for _ in range(world)]
    for rel in sorted(files, key=lambda name: (-int(files[name]["size"]), name)):
        load, r = heapq.heappop(loads)
        shares[r].append(rel)
        heapq.heappush(loads, (load + int(files[rel]["size"]), r))
    return shares


def _check_files(directory: Path, expected: dict, mode: str) -> tuple[list[str], int]:
    def one(rel: str) -> tuple[str | None, int]:
        path, want = directory / rel, expected[rel]
        try:
            size = path.stat().st_size
            if size != want["size"]:
                return f"{path}: {size} bytes, the manifest says {want['size']} (truncated or damaged)", 0
            if mode == "size":
                return None, 0
            size, crc = file_crc32(path)
        except FileNotFoundError:
            return f"{path}: missing (the manifest lists it, {want['size']} bytes)", 0
        except OSError as err:
            return f"{path}: unreadable ({type(err).__name__}: {err})", 0
        if f"{crc:08x}" != want["crc32"]:
            return (
                f"{path}: checksum {crc:08x}, the manifest says {want['crc32']} (contents changed since the "
                "save: damaged or overwritten)"
            ), size
        return None, size

    names = sorted(expected)
    if len(names) <= 1:
        results = list(map(one, names))
    else:
        with ThreadPoolExecutor(max_workers=min(_THREADS, len(names))) as pool:
            results = list(pool.map(one, names))
    return [p for p, _ in results if p is not None], sum(n for _, n in results)


def dcp_size_problems(directory: str | Path) -> list[str]:
    """Files of a torch_dist directory that are missing or shorter than its ``.metadata`` says
    (no manifest needed: each stored item records its file, offset and length)."""
    from torch.distributed.checkpoint import FileSystemReader

    directory = Path(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except FileNotFoundError:
        return [f"{directory / '.metadata'}: missing (torch's index of the checkpoint's files)"]
    except Exception as err:  # noqa: BLE001 - an unreadable index is the finding, whatever the error
        return [f"{directory / '.metadata'}: unreadable ({one_line(err)})"]
    problems = []
    for rel, size in sorted(needed.items()):
        path = directory / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing (torch's .metadata lists it)")
            continue
        if actual < size:
            problems.append(f"{path}: {actual} bytes, torch's .metadata needs at least {size} (truncated)")
    return problems


# ------------------------------------------------------------------------------------------ errors
def causes(err: BaseException) -> Iterator[BaseException]:
    """`err` and every exception inside it: causes, contexts, and the per-rank failures of torch's
    CheckpointException (a BaseException whose ``failures`` map rank -> (exception, traceback))."""
    todo, seen = [err], set()
    while todo:
        exc = todo.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        yield exc
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict):
            for wrapped in failures.values():
                todo.append(wrapped[0] if isinstance(wrapped, tuple) else wrapped)
        todo += [exc.__cause__, exc.__context__]


def one_line(err: BaseException) -> str:
    """``Type: first line of the message`` (torch's CheckpointException: its ranks' root errors)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, wrapped in sorted(failures.items()):
            inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
            parts.append(f"rank {rank}: {one_line(inner)}")
        return "; ".join(dict.fromkeys(parts))
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        # torch's text goes on to suggest weights_only=False, i.e. running whatever the file holds:
        # not advice to pass on
        return (
            f"{type(err).__name__}: a pickled file of the checkpoint holds something torch.load(weights_only=True) "
            "refuses (damaged, or not written by Megatron/dqo-megatron); it is not loaded"
        )
    return first_line(err)


_DAMAGE_WORDS = ("PytorchStreamReader", "zip archive", "corrupt", "unexpected EOF", "truncated")


def is_damage(err: BaseException) -> bool:
    """Whether `err` (from reading a checkpoint) says a file is missing, short or garbled, as opposed to a
    checkpoint that does not fit the model (which an older checkpoint of the same run would not fix)."""
    for exc in causes(err):
        if isinstance(
            exc,
            (OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError, json.JSONDecodeError),
        ):
            return True
        if isinstance(exc, RuntimeError) and any(word in str(exc) for word in _DAMAGE_WORDS):
            return True
    return False


def free_space(directory: str | Path) -> tuple[int, int] | None:
    """``(free, total)`` bytes of the filesystem holding `directory` (or its nearest existing parent)."""
    path = Path(directory).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.free, usage.total


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def disk_full_message(err: BaseException, directory: str | Path) -> str | None:
    """The message for a save that failed because the disk is full (or over quota), else None.

    Recognizes OSError ENOSPC / EDQUOT anywhere in `err` (its causes, torch's per-rank failures) and the
    short writes torch's zip writer reports as "unexpected pos A vs B" / "file write failed"."""
    space = free_space(directory)
    free = f"{_mib(space[0])} free of {_mib(space[1])}" if space else "free space unknown"
    for exc in causes(err):
        code = exc.errno if isinstance(exc, OSError) else None
        code = code or next((c for c, text in _FULL_TEXT.items() if text.search(str(exc))), None)
        if code in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
            return f"{what} writing {directory}: {free}"
    for exc in causes(err):
        match = _SHORT_WRITE.search(str(exc)) if isinstance(exc, RuntimeError) else None
        if match is None:
            continue
        if space is None or space[0] < max(_LOW_SPACE_BYTES, space[1] // 200):
            return f"no space left on device writing {directory} (torch's writer: {match.group(0)}): {free}"
        return (
            f"short write to {directory} (torch's writer: {match.group(0)}) although {free}: over a quota, "
            "or an I/O error of the device"
        )
    return None


def save_error_message(errors: Sequence[BaseException], directory: str | Path) -> tuple[str, bool]:
    """``(one line, disk_full)`` for the errors of a failed save into `directory`: a full disk is named
    (`disk_full_message`) whichever of `errors` shows it; otherwise each error in one line."""
    for err in errors:
        message = disk_full_message(err, directory)
        if message is not None:
            return message, True
    return "; ".join(dict.fromkeys(one_line(err) for err in errors)), False


# ------------------------------------------------------------------------- rank-0-only writes
@contextlib.contextmanager
def deferred_single_rank_errors(errors: list) -> Iterator[None]:
    """During a `dist_checkpointing.save`: the files only one rank writes (``common.pt``, torch's
    ``.metadata``, ``metadata.json``) append their exception to `errors` instead of raising it.

    Why: Megatron writes them on rank 0 between collectives; a raise there (a full disk) leaves the
    other ranks waiting in the next collective forever. Deferred, the save runs to its end on every
    rank, and the caller shares `errors` with all ranks (our save does) and fails on every rank."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    def deferring(fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - reported by the caller on every rank
                errors.append(err)

        return call

    # common.pt: through the common save strategy (<= 0.16), through `save_common`, which serialization
    # imports by name (0.17, 0.18), not at all (>= 0.19: a ShardedObject inside the torch_dist files)
    saved = [(FileSystemWriterAsync, "finish"), (serialization, "save_config"), (serialization, "save_common")]
    try:
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy
    except ImportError:
        pass
    else:
        saved.insert(0, (TorchCommonSaveStrategy, "save_common"))
    originals = [(owner, name, owner.__dict__[name]) for owner, name in saved if name in owner.__dict__]
    for owner, name, original in originals:
        setattr(owner, name, deferring(original))
    try:
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


# ----------------------------------------------------------------------- writer processes
_fork_guard = {"active": 0, "parent": None, "registered": False}


def _before_fork() -> None:
    _fork_guard["parent"] = os.getpid()


def _after_fork_in_child() -> None:
    if _fork_guard["active"] and _fork_guard["parent"] is not None:
        die_with_parent(_fork_guard["parent"])


@contextlib.contextmanager
def children_die_with_parent() -> Iterator[None]:
    """Processes forked while inside this block die when this process dies (even by SIGKILL).

    Megatron's torch_dist writer on megatron-core <= 0.16 forks one process per file
    (`write_preloaded_data_multiproc`; 0.17 on use threads): when the trainer is killed during a save they
    stay alive, blocked on queues nobody reads. Spawned processes (fork + exec: Megatron's results
    Manager) are not reached by an at-fork hook; `conversion.torch_dist_save` guards those. ``PR_SET_PDEATHSIG``
    fires when the *thread* that forked ends, so it suits forks made by the saving thread, which are Megatron's."""
    if not _fork_guard["registered"]:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _fork_guard["registered"] = True
    _fork_guard["active"] += 1
    try:
        yield
    finally:
        _fork_guard["active"] -= 1
