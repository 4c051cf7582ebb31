"""Checkpoints that are checked (issue #17): bad inputs of every class, each with the clear message it
must give and the valid data left byte-identical.

Classes: damaged files (truncated, bytes flipped at the same size, deleted, a damaged manifest, an old
checkpoint without manifest, torch's reader failing with checks off) -> resume falls back to the newest
intact checkpoint, naming the file, and the next losses equal an uninterrupted run's; a named damaged
checkpoint is an error; a full disk during a save (the writer, rank 0's metadata, torch's "unexpected
pos") -> "no space left on device" on every rank, the partial save removed; a second run on one
run_dir -> refused, naming the holder; a killed saver leaves no process behind; `export` of a wrong
path says what the path is.

Rank runs use 2 forked gloo ranks (TP=2: each rank writes its own shard files and RNG file) of the
tiny model of `ckpt_bodies`; trainer runs use the CLI in a subprocess, as `test_trainer_resume` does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqo_megatron.checkpoint_integrity import (
    MANIFEST_FILE,
    disk_full_message,
    file_crc32,
    is_damage,
    one_line,
    verify_directory,
)
from dqo_megatron.training import checkpointing
from dqo_megatron.training.checkpointing import COMPLETE_MARKER, CheckpointError
from dqo_megatron.training.run_dir_lock import LOCK_FILE, RunDirInUse, RunDirLock
from tests.helpers.distributed import run_distributed
from tests.training.ckpt_bodies import (
    lm_body,
    lm_setup,
    lm_train_step,
    local_params,
    shutdown_writer_manager,
)
from tests.training.test_trainer_resume import _losses

REPO = Path(__file__).resolve().parents[2]
STEP2, STEP4 = "step_00000002", "step_00000004"
TP2 = dict(tensor_model_parallel_size=2)  # each rank writes shard files of its own


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def flip_bytes(path: Path, at: float = 0.5, count: int = 16) -> None:
    """Invert `count` bytes in the middle of `path`, keeping its size (a silently overwritten block)."""
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * at))
        data = f.read(count)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


RANK0_PICKLE = "<rank 0's pickle>"
"""Stands for the file only rank 0 writes that exists in this release's checkpoints (`rank0_file`)."""


def rank0_file(step_dir: Path, name: str) -> str:
    """`name`, or for `RANK0_PICKLE` Megatron's common state where this megatron-core writes it: common.pt
    (<= 0.16); 0.19 keeps it inside the .distcp files, so then metadata.json, its other rank-0 file."""
    if name != RANK0_PICKLE:
        return name
    return "common.pt" if (step_dir / "common.pt").exists() else "metadata.json"


def make_legacy(step_dir: Path) -> None:
    """Make `step_dir` look like a checkpoint saved before manifests existed."""
    (step_dir / MANIFEST_FILE).unlink()
    marker = json.loads((step_dir / COMPLETE_MARKER).read_text())
    marker.pop("manifest")
    (step_dir / COMPLETE_MARKER).write_text(json.dumps(marker))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """TP=2: train 4 steps, save after steps 2 and 4; returns (root, rank results) -- the uninterrupted run."""
    root = tmp_path_factory.mktemp("integrity") / "ckpt"
    results = run_distributed(lm_body, 2, TP2, dict(until=4, save_at=(2, 4), save_root=str(root)))
    return root, results


def _copy(saved, tmp_path: Path) -> Path:
    root = tmp_path / "ckpt"
    shutil.copytree(saved[0], root)
    return root


# ------------------------------------------------------------------------------------ the manifest
def test_manifest_lists_every_file_with_its_size_and_crc(saved):
    root, _ = saved
    step = root / STEP4
    manifest = json.loads((step / MANIFEST_FILE).read_text())
    on_disk = {str(p.relative_to(step)) for p in step.rglob("*") if p.is_file()} - {COMPLETE_MARKER, MANIFEST_FILE}
    assert set(manifest["files"]) == on_disk
    assert {
        "__0_0.distcp",
        "__1_0.distcp",
        "rng/rank_00000.pt",
        "rng/rank_00001.pt",
        ".metadata",
        "extra_state.pt",
    } <= on_disk  # each rank's own files, hashed by that rank
    for rel, entry in manifest["files"].items():
        size, crc = file_crc32(step / rel)
        assert entry == {"size": size, "crc32": f"{crc:08x}"}, rel
    marker = json.loads((step / COMPLETE_MARKER).read_text())
    assert marker["manifest"] == MANIFEST_FILE and marker["bytes"] == sum(e["size"] for e in manifest["files"].values())
    assert verify_directory(step).problems == [] and verify_directory(step).has_manifest


@pytest.mark.parametrize(
    "damage,file,words",
    [
        ("truncate", "__1_0.distcp", "bytes, the manifest says"),
        ("flip", "__0_1.distcp", "checksum"),
        ("delete", "rng/rank_00001.pt", "missing"),
        ("append", RANK0_PICKLE, "bytes, the manifest says"),
        ("manifest", MANIFEST_FILE, "its own checksum"),
        ("manifest_deleted", MANIFEST_FILE, "COMPLETE marker says one was written"),
        ("legacy_truncate", "__0_0.distcp", "torch's .metadata needs at least"),
        ("legacy_metadata", ".metadata", "unreadable"),
    ],
)
def test_every_kind_of_damage_is_found_and_named(saved, tmp_path, damage, file, words):
    step = _copy(saved, tmp_path) / STEP4
    target = step / rank0_file(step, file)
    if damage.startswith("legacy"):
        make_legacy(step)
    if damage in ("truncate", "legacy_truncate", "legacy_metadata"):
        truncate(target)
    elif damage == "flip":
        flip_bytes(target)
    elif damage in ("delete", "manifest_deleted"):
        target.unlink()
    elif damage == "append":
        with open(target, "ab") as f:
            f.write(b"\0" * 10)
    elif damage == "manifest":  # a size edited inside the manifest: caught by its own checksum
        manifest = json.loads(target.read_text())
        manifest["files"][rank0_file(step, RANK0_PICKLE)]["size"] += 1
        target.write_text(json.dumps(manifest))
    before = snapshot(step)
    required = checkpointing.marker_says_manifest(checkpointing.read_marker(step))
    check = verify_directory(step, "full", manifest_required=required)
    assert len(check.problems) == 1, check.problems
    assert str(target) in check.problems[0] and words in check.problems[0]
    assert "\n" not in check.problems[0]
    assert snapshot(step) == before  # checking changes nothing


def test_size_mode_reads_nothing_and_off_checks_nothing(saved, tmp_path):
    step = _copy(saved, tmp_path) / STEP4
    flip_bytes(step / "__0_0.distcp")
    assert verify_directory(step, "size").problems == []  # same size: only `full` reads the bytes
    assert verify_directory(step, "size").checked_bytes == 0
    truncate(step / "__0_0.distcp")
    assert "__0_0.distcp" in verify_directory(step, "size").problems[0]
    assert verify_directory(step, "off").problems == []
    with pytest.raises(ValueError, match="choose one of full, size, off"):
        verify_directory(step, "fast")


# --------------------------------------------------------------------------- resume past the damage
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _resume_body(root: str, resume: str, verify: str, until: int) -> dict:
    """Resume (auto or a path) under TP=2 and train to `until`; the warnings, or the error, on each rank."""
    info, chunks, ddp, optimizer, scheduler = lm_setup(TP2)
    records = _Records()
    logging.getLogger(checkpointing.__name__).addHandler(records)
    out: dict = {"losses": {}}
    try:
        resumed = checkpointing.resume_checkpoint(root, resume, ddp, optimizer, scheduler, verify=verify)
        path, extra = resumed
        out["path"], step = str(path), int(extra["step"])
        while step < until:
            out["losses"][step + 1] = lm_train_step(info, ddp, optimizer, scheduler, step)
            step += 1
        out["params"] = local_params(chunks)
    except CheckpointError as err:
        out["error"] = (type(err).__name__, str(err))
    finally:
        shutdown_writer_manager()
        logging.getLogger(checkpointing.__name__).removeHandler(records)
    out["warnings"] = records.lines
    return out


@pytest.mark.parametrize(
    "damage,file,verify",
    [
        ("flip", "__0_1.distcp", "full"),  # weights overwritten at the same size: the checksum
        ("delete", "__1_0.distcp", "full"),
        ("legacy_truncate", "__1_0.distcp", "full"),  # no manifest: torch's index still names it
        ("reader_error", "__0_0.distcp", "off"),  # no checks: torch's reader fails after a partial load
    ],
)
def test_damaged_newest_checkpoint_resumes_from_the_previous_one_exactly(saved, tmp_path, damage, file, verify):
    root = _copy(saved, tmp_path)
    target = root / STEP4 / file
    if damage == "legacy_truncate":
        make_legacy(root / STEP4)
        make_legacy(root / STEP2)
    if damage == "flip":
        flip_bytes(target)
    elif damage == "delete":
        target.unlink()
    else:
        truncate(target)
    before = snapshot(root)
    results = run_distributed(_resume_body, 2, str(root), "auto", verify, 4)
    uninterrupted = saved[1]
    for rank, res in enumerate(results):
        assert "error" not in res, res.get("error")
        assert res["path"] == str(root / STEP2), f"rank {rank} resumed from {res['path']}"
        # the next losses and weights equal the uninterrupted run's from that step, bit for bit
        assert res["losses"] == {3: uninterrupted[rank]["losses"][3], 4: uninterrupted[rank]["losses"][4]}
        for name, value in uninterrupted[rank]["params"].items():
            assert value.equal(res["params"][name]), f"rank {rank}: {name}"
    warned = results[0]["warnings"]  # rank 0 reports
    assert any(str(target) in line and "damaged" in line for line in warned), warned
    assert any(f"resuming from {root / STEP2}" in line for line in warned), warned
    assert all("\n" not in line and "Traceback" not in line for line in warned)
    assert snapshot(root) == before  # neither the intact nor the damaged checkpoint was touched


def test_a_named_damaged_checkpoint_is_an_error_and_all_damaged_is_no_silent_restart(saved, tmp_path):
    root = _copy(saved, tmp_path)
    flip_bytes(root / STEP4 / "__1_0.distcp")
    named = run_distributed(_resume_body, 2, str(root), str(root / STEP4), "full", 4)
    for res in named:  # every rank gets it: none is left waiting
        kind, message = res["error"]
        assert kind == "CheckpointDamaged" and str(root / STEP4 / "__1_0.distcp") in message and "checksum" in message
    truncate(root / STEP2 / "__0_0.distcp")
    before = snapshot(root)
    every = run_distributed(_resume_body, 2, str(root), "auto", "full", 4)
    for res in every:
        kind, message = res["error"]
        assert kind == "CheckpointError" and "no intact checkpoint" in message and "another run_dir" in message
        assert "__1_0.distcp" in message and "__0_0.distcp" in message
    assert snapshot(root) == before


def test_torch_reader_errors_become_one_line():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise EOFError()
    except EOFError as err:
        wrapped = _wrap_exception(err)
    exc = CheckpointException("read", {0: wrapped, 1: wrapped})
    assert not isinstance(exc, Exception)  # why every catch names it explicitly
    assert one_line(exc) == "rank 0: EOFError; rank 1: EOFError"
    assert is_damage(exc) and not is_damage(RuntimeError("size mismatch for embedding.weight"))


# ------------------------------------------------------------------------------------------ disk full
_GIB = 1 << 30


def _disk_full_body(root: str) -> dict:
    """Save step 1, then fail the save of step 2 three ways (rank 1's shard writer: ENOSPC; rank 0's
    .metadata: ENOSPC; rank 0's other writer -- common.pt through `TorchCommonSaveStrategy` on <= 0.16,
    through serialization's `save_common` on 0.17-0.18, metadata.json through `save_config` where common.pt
    is gone (0.19) --: torch's "unexpected pos" with 3 MiB free), then save it."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    info, chunks, ddp, optimizer, scheduler = lm_setup(TP2)
    rank, out = info.rank, {"errors": {}}

    def enospc(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def short_write(*_args, **_kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")

    import torch.distributed.checkpoint.filesystem as torch_fs

    try:
        from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

        rank0_writer = (TorchCommonSaveStrategy, "save_common")
    except ImportError:  # 0.17-0.18 write common.pt through serialization's save_common; 0.19 none
        rank0_writer = (serialization, "save_common" if "save_common" in vars(serialization) else "save_config")
    nearly_full = shutil._ntuple_diskusage(100 * _GIB, 100 * _GIB - (3 << 20), 3 << 20)
    cases = {  # Megatron's writer (a process or a thread per file) calls torch's _write_item, imported by name
        "writer": ([(filesystem_async, "_write_item"), (torch_fs, "_write_item")], enospc, 1),
        "metadata": ([(FileSystemWriterAsync, "finish")], enospc, 0),
        "unexpected_pos": ([rank0_writer], short_write, 0),
    }
    try:
        lm_train_step(info, ddp, optimizer, scheduler, 0)
        checkpointing.save_checkpoint(root, 1, ddp, optimizer, scheduler, extra={"step": 1})
        lm_train_step(info, ddp, optimizer, scheduler, 1)
        for case, (targets, broken, on_rank) in cases.items():
            originals, usage = [(owner, name, owner.__dict__[name]) for owner, name in targets], shutil.disk_usage
            if rank == on_rank:  # one rank fails: every rank must report it (and none hang)
                for owner, name, _ in originals:
                    setattr(owner, name, broken)
                if case == "unexpected_pos":
                    shutil.disk_usage = lambda _path: nearly_full
            try:
                checkpointing.save_checkpoint(root, 2, ddp, optimizer, scheduler, extra={"step": 2})
            except CheckpointError as err:
                out["errors"][case] = str(err)
            finally:
                for owner, name, original in originals:
                    setattr(owner, name, original)
                shutil.disk_usage = usage
        out["saved"] = str(checkpointing.save_checkpoint(root, 2, ddp, optimizer, scheduler, extra={"step": 2}))
    finally:
        shutdown_writer_manager()
    return out


def test_a_full_disk_is_named_on_every_rank_and_the_partial_save_removed(tmp_path):
    root = tmp_path / "ckpt"
    results = run_distributed(_disk_full_body, 2, str(root), timeout=180)  # a hang would fail here
    for rank, res in enumerate(results):
        errors = res["errors"]
        assert set(errors) == {"writer", "metadata", "unexpected_pos"}, f"rank {rank}: {errors}"
        for case, message in errors.items():
            assert "no space left on device writing" in message and ".tmp_step_00000002" in message, (case, message)
            assert "MiB free" in message and "partial checkpoint was removed" in message, (case, message)
            assert "Traceback" not in message and "\n" not in message
        assert "unexpected pos 704 vs 598" in errors["unexpected_pos"] and "3 MiB free" in errors["unexpected_pos"]
        assert res["saved"] == str(root / STEP2)  # with space back, the same save works
    assert not list(root.glob(".tmp_*"))
    assert verify_directory(root / "step_00000001").problems == [] and verify_directory(root / STEP2).problems == []


def test_disk_full_messages(monkeypatch, tmp_path):
    assert disk_full_message(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path).startswith(
        f"disk quota exceeded writing {tmp_path}"
    )
    wrapped = RuntimeError("Worker failure: [Errno 28] No space left on device")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert disk_full_message(wrapped, tmp_path).startswith(f"no space left on device writing {tmp_path}: ")
    plenty = shutil._ntuple_diskusage(100 * _GIB, 50 * _GIB, 50 * _GIB)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: plenty)
    short = disk_full_message(RuntimeError("unexpected pos 704 vs 598"), tmp_path)
    assert short.startswith(f"short write to {tmp_path}") and "51200 MiB free" in short and "quota" in short
    assert disk_full_message(RuntimeError("size mismatch"), tmp_path) is None


# --------------------------------------------------------------------------------- the run_dir lock
def test_a_second_lock_on_a_run_dir_is_refused_naming_the_holder(tmp_path):
    first = RunDirLock(tmp_path / "run")
    first.acquire()
    try:
        with pytest.raises(
            RunDirInUse, match=re.escape(f"in use by pid {os.getpid()} on host {socket.gethostname()} ")
        ):
            RunDirLock(tmp_path / "run").acquire()
    finally:
        first.release()
    second = RunDirLock(tmp_path / "run")
    second.acquire()  # released: free again
    second.release()
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    code = (
        "import sys, time; from dqo_megatron.training.run_dir_lock import RunDirLock; "
        f"RunDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=f"pid {holder.pid} on host"):
            RunDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(tmp_path)
    lock.acquire()  # the kernel dropped the dead holder's flock
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_without_flock_the_recorded_holder_decides(tmp_path, monkeypatch):
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    for holder, refused in (
        ({"host": here, "pid": os.getppid()}, True),
        ({"host": here, "pid": dead.pid}, False),
        ({"host": "node-elsewhere", "pid": 1}, True),
    ):
        (tmp_path / LOCK_FILE).write_text(json.dumps({**holder, "started": "earlier", "command": "train"}))
        lock = RunDirLock(tmp_path)
        if refused:
            with pytest.raises(RunDirInUse, match=re.escape(f"pid {holder['pid']} on host {holder['host']} ")):
                lock.acquire()
        else:
            lock.acquire()  # a dead pid on this host: stale, taken over
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
            lock.release()


# --------------------------------------------------------------------------- writers die with the saver
def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _wait_until_gone(sid: int, seconds: float = 5.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := _session_members(sid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _forking_save_main(root: str, marks: str) -> None:
    """Subprocess body: a process's first save, through Megatron's shipped writer; each per-file writer (a
    forked process on <= 0.16, a thread on 0.19) announces itself and blocks forever."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    from dqo_megatron.parallel import find_free_port

    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(find_free_port())
    )

    def stuck_writer(*_args, **_kwargs):
        Path(marks, str(os.getpid())).touch()
        time.sleep(600)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(stuck_writer)
    info, chunks, ddp, optimizer, scheduler = lm_setup({})
    checkpointing.save_checkpoint(root, 1, ddp, optimizer, scheduler)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_megatron_writer_processes_die_with_a_killed_saver(tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    code = (
        "from tests.training.test_checkpoint_integrity import _forking_save_main; "
        f"_forking_save_main({str(tmp_path / 'ckpt')!r}, {str(marks)!r})"
    )
    saver = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(marks.iterdir()):
            assert saver.poll() is None and time.monotonic() < deadline, "the save never started its writers"
            time.sleep(0.05)
        writers = [int(p.name) for p in marks.iterdir()]
        members = _session_members(saver.pid)
        assert set(writers) <= set(members)
        # the results' multiprocessing Manager, spawned (fork + exec: no at-fork hook reaches it)
        assert any(b"--multiprocessing-fork" in _cmdline(pid) for pid in members), "no Manager: the test is moot"
        os.kill(saver.pid, signal.SIGKILL)  # the saver only, as the OOM killer or a failing node does
        saver.wait()
        assert _wait_until_gone(saver.pid) == [], "writer processes outlived the killed saver"
    finally:
        for pid in _session_members(saver.pid):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ the trainer (CLI)
STEPS = 6
SEQ = 32


def _train(config: Path, *overrides: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "dqo_megatron", "train", "--config", str(config), *overrides]
    if popen:
        return subprocess.Popen(command, cwd=REPO, **popen)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DQO run of 6 steps saving every 2 (checkpoints 2, 4, 6): the uninterrupted reference."""
    from tests.helpers.synthetic_data import write_synthetic_dataset
    from tests.training.test_trainer_resume import _config

    tmp = tmp_path_factory.mktemp("trainer")
    dataset = write_synthetic_dataset(str(tmp / "data" / "train"), docs=12, max_len=SEQ + 1)
    path = _config(tmp, dataset, tmp / "reference", steps=STEPS)
    done = _train(path)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, path


def test_trainer_skips_a_truncated_newest_checkpoint_and_continues_exactly(trained):
    tmp, config = trained
    run_dir = tmp / "damaged"
    shutil.copytree(tmp / "reference", run_dir)
    reference = _losses(run_dir)
    ckpts = run_dir / "checkpoints"
    damaged = ckpts / "step_00000006" / "__0_0.distcp"
    truncate(damaged)
    intact = snapshot(ckpts / STEP4)
    done = _train(config, f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{damaged}: " in done.stderr and "the manifest says" in done.stderr  # which file, why
    assert f"resumed from {ckpts / STEP4} at step 4" in done.stderr
    assert "Traceback" not in done.stderr
    losses = _losses(run_dir)
    assert [losses[s] for s in (5, 6)] == [reference[s] for s in (5, 6)]  # = the uninterrupted run from step 4
    assert snapshot(ckpts / STEP4) == intact
    assert verify_directory(ckpts / "step_00000006").problems == []  # saved anew by the resumed run


def test_a_second_run_on_a_run_dir_refuses_to_start(trained):
    tmp, config = trained
    run_dir = tmp / "locked"
    shutil.copytree(tmp / "reference", run_dir)
    before = snapshot(run_dir)
    lock = RunDirLock(run_dir)
    lock.acquire()
    try:
        done = _train(config, f"run_dir={run_dir}")
    finally:
        lock.release()
    assert done.returncode != 0
    assert f"run_dir {run_dir} is in use by pid {os.getpid()} on host {socket.gethostname()}" in done.stderr
    assert "Traceback" not in done.stderr
    after = snapshot(run_dir)
    after.pop(LOCK_FILE)  # our own holder record
    before.pop(LOCK_FILE)
    assert after == before  # nothing written: no config.yaml, metrics or checkpoint touched


def test_a_trainer_killed_during_a_save_leaves_no_process_behind(trained):
    tmp, config = trained
    run_dir = tmp / "killed"
    proc = _train(
        config, f"run_dir={run_dir}", start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    ckpts = run_dir / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not ((ckpts / ".tmp_step_00000004").exists() and not (ckpts / STEP4).exists()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its second save"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, not its process group
        proc.wait()
        assert _wait_until_gone(proc.pid) == [], "processes of the killed trainer survived it"
    finally:
        for pid in _session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
    assert verify_directory(ckpts / STEP2).problems == []
    lock = RunDirLock(run_dir)
    lock.acquire()  # and its lock died with it
    lock.release()


# ------------------------------------------------------------------------------------------ export
def test_export_of_a_wrong_path_says_what_the_path_is(trained, tmp_path):
    from dqo_megatron.config import ConfigError
    from dqo_megatron.training.export import check_training_checkpoint, export_config_path

    tmp, _ = trained
    run_dir = tmp / "reference"
    cases = {
        tmp_path / "nowhere": "does not exist",
        run_dir / "config.yaml": "is not a training checkpoint (a file",
        run_dir: "is a run directory or checkpoint root",
        run_dir / "checkpoints": "name one of its step_* directories (the newest: ",
        run_dir / "tensorboard": "is not a training checkpoint (no COMPLETE)",
    }
    for path, words in cases.items():
        with pytest.raises(CheckpointError, match=None) as caught:
            check_training_checkpoint(path)
        assert str(path) in str(caught.value) and words in str(caught.value), str(caught.value)
    moved = tmp_path / "elsewhere" / "checkpoints" / "step_00000006"
    shutil.copytree(run_dir / "checkpoints" / "step_00000006", moved)
    with pytest.raises(ConfigError, match="config.yaml does not exist: checkpoint .* is not in the run_dir"):
        export_config_path(moved)
    assert export_config_path(run_dir / "checkpoints" / "step_00000006") == run_dir / "config.yaml"


def _export_body(config: str, checkpoint: str, out: str) -> str:
    from dqo_megatron.config import RunConfig, load_config
    from dqo_megatron.training.export import export_policy_to_megatron

    try:
        export_policy_to_megatron(load_config(RunConfig, config), checkpoint, out)
    except CheckpointError as err:
        return f"{type(err).__name__}: {err}"
    return "exported"


def test_export_of_a_damaged_checkpoint_names_the_file_and_writes_nothing(trained, tmp_path):
    tmp, _ = trained
    step = tmp_path / "run" / "checkpoints" / "step_00000006"
    shutil.copytree(tmp / "reference" / "checkpoints" / "step_00000006", step)
    flip_bytes(step / "__0_1.distcp")
    (message,) = run_distributed(
        _export_body, 1, str(tmp / "reference" / "config.yaml"), str(step), str(tmp_path / "out")
    )
    assert message.startswith("CheckpointDamaged: ") and f"{step / '__0_1.distcp'}: checksum" in message
    assert not (tmp_path / "out").exists()
