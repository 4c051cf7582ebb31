"""Training checkpoints: model chunks, optimizer, schedulers, RNG states and the loop's own state.

Layout of a checkpoint root (``run_dir/checkpoints``)::

    <root>/
      latest                  text: the step of the newest checkpoint (written by tmp + rename)
      step_00000100/          one complete checkpoint
        COMPLETE              JSON marker, written last (fsync) -- a directory without it is ignored
        MANIFEST.json         size and CRC32 of every other file (`checkpoint_integrity`), before COMPLETE
        .metadata, *.distcp,  megatron.core.dist_checkpointing (torch_dist): the model chunks'
        common.pt (<= 0.18),  `sharded_state_dict()` under "model" (or "model0", "model1", ... under
        metadata.json         virtual PP, as Megatron-LM) and the optimizer's under "optimizer"
        extra_state.pt        rank 0: step, the caller's `extra`, scheduler states, layout
        rng/rank_00000.pt     one per rank: python / numpy / torch / CUDA / Megatron tracker RNG
      .tmp_step_00000200/     a save in progress (or killed); never read, removed by the next save

Atomicity: every rank writes into ``.tmp_step_N``; after a barrier the ranks checksum what they wrote,
rank 0 writes ``MANIFEST.json`` and ``COMPLETE``, renames the directory to ``step_N`` (one
`os.replace`), then rewrites ``latest``, then prunes. A crash at any point leaves the previous
``step_*`` directory untouched and complete. A failure on any rank fails the save on every rank (no
rank is left waiting); a full disk is named as such and the partial directory removed at once. The
mechanics of these steps are `checkpoint_commit`'s; this module holds what is saved and loaded.

Integrity: `load_checkpoint` checks the files against the manifest first (``verify``: full = sizes and
CRC32, size, off) and raises `CheckpointDamaged` naming the file; `resume_checkpoint` (``resume=auto``)
then falls back to the newest intact checkpoint. Errors of torch's reader (a BaseException) become one
CheckpointError line. Checkpoints saved before manifests existed load with a warning, checked against
the sizes torch's ``.metadata`` implies.

Model and optimizer are stored by global (layout-free) keys, so a checkpoint saved under one TP/PP/VPP
layout loads under another; RNG states are per rank and are restored only under the same layout.
Everything of ours is read back with ``torch.load(weights_only=True)``: `extra` and scheduler states
must be tensors and Python primitives (checked at save time).

`PolicyValueModel` (several GPTs + a value head in one chunk) gets its sharded state dict from
`policy_value.members_sharded_state_dict`: each member's GPT keys under ``policy.`` / ``value.`` /
``reference.`` (a frozen reference held in the run is saved too, so a resume needs nothing else),
and the replicated head as ``value_head.weight`` / ``value_head.bias``.

On load, optimizer param-group settings (max_lr, betas, ...) come from the resuming run's config and
the LR/WD position from the scheduler state; per-parameter state (Adam moments, step) from the
checkpoint (see `_param_groups_of_this_run` for why Megatron's group matching is bypassed).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from dqo_megatron.checkpoint_integrity import (
    MANIFEST_FILE,
    all_gather,
    broadcast,
    dcp_size_problems,
    is_damage,
    manifest_bytes,
    one_line,
    verify_directory,
)
from dqo_megatron.training.checkpoint_commit import (  # noqa: F401 - _prune re-exported: callers import it from here
    _checksum_and_commit,
    _failure,
    _fresh_directory,
    _gather_errors,
    _prune,
    _raise_if_any,
    _write_shards,
)
from dqo_megatron.training.checkpoint_files import (  # noqa: F401 - re-exported: callers import them from here
    _TMP_PREFIX,
    _TRASH_PREFIX,
    COMPLETE_MARKER,
    EXTRA_STATE_FILE,
    FORMAT_VERSION,
    LATEST_FILE,
    RNG_DIR,
    CheckpointDamaged,
    CheckpointError,
    check_plain,
    find_latest_checkpoint,
    fsync_dir,
    is_complete,
    list_checkpoints,
    load_torch,
    marker_says_manifest,
    read_marker,
    resolve_resume,
    resume_candidates,
    save_torch,
    step_dir_name,
    write_text_atomically,
)
from dqo_megatron.training.policy_value import PolicyValueModel, load_members_state
from dqo_megatron.training.rng_state import rng_state, set_rng_state  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model state dicts
def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's DDP / Float16Module wrappers (what Megatron-LM checkpoints)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


def _sharding_metadata() -> dict:
    # Fully reshardable formats (layout-free keys), without per-sub-optimizer key prefixes, so that
    # a change of parameter grouping (e.g. a separate value learning rate) keeps keys stable.
    return {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "fully_sharded_model_space"}


def _model_keys(n_chunks: int) -> list[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _models_sharded_state_dict(models: Sequence[torch.nn.Module]) -> dict:
    return {
        key: model.sharded_state_dict(metadata=_sharding_metadata())
        for key, model in zip(_model_keys(len(models)), models)
    }


def _load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """`model.load_state_dict(state)` (member by member for a `PolicyValueModel`), any mismatch a
    CheckpointError naming `where`."""
    try:
        if isinstance(model, PolicyValueModel):
            load_members_state(model, state)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: the checkpoint's model does not fit this model: {err}") from err


# ------------------------------------------------------------------------------------------ layout
def _layout() -> dict:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"world_size": torch.distributed.get_world_size()}
    return {
        "world_size": torch.distributed.get_world_size(),
        "tp": ps.get_tensor_model_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
        "vpp": ps.get_virtual_pipeline_model_parallel_world_size(),
        "cp": ps.get_context_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
    }


def _schedulers(scheduler) -> dict:
    """{name: scheduler}: a single scheduler is stored as "scheduler", a mapping by its own names."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    return {"scheduler": scheduler}


# -------------------------------------------------------------------------------------------- save
def save_checkpoint(
    root: str | Path,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler=None,
    extra: dict | None = None,
    keep_last: int | None = 3,
    keep_steps: Sequence[int] = (),
) -> Path:
    """Write ``<root>/step_<step:08d>/`` atomically; return its path. Collective: every rank calls it.

    Args:
        root: checkpoint root (created if needed; a filesystem every rank sees).
        step: the optimizer steps done; names the directory.
        model_chunks: this rank's model chunks (DDP / Float16Module wrappers are unwrapped); several
            chunks (virtual PP) are stored as "model0", "model1", ... like Megatron-LM.
        optimizer: Megatron optimizer (or None to save the model only).
        scheduler: an object with ``state_dict()/load_state_dict()`` (e.g. Megatron's
            `OptimizerParamScheduler`), a mapping name -> such objects, or None.
        extra: the loop's own state (step, sampler position, consumed samples, metrics, ...): tensors
            and python primitives only (checked here, so a bad value fails now, not at resume).
        keep_last: keep this many complete checkpoints up to this one (older ones are deleted after
            the new one is complete); None keeps all.
        keep_steps: steps never pruned, whatever `keep_last` says (e.g. the best evaluated checkpoint).

    A save replacing an existing ``step_N`` (e.g. a run resumed at N and stopped again) moves the old one
    aside first. Raises CheckpointError on every rank when any rank failed (a full disk: "no space left
    on device writing <dir>: N MiB free", the partial directory removed).
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    extra = dict(extra or {})
    check_plain(extra, "extra")
    schedulers = {name: s.state_dict() for name, s in _schedulers(scheduler).items()}
    check_plain(schedulers, "scheduler state")
    rng = rng_state()  # before anything else can draw random numbers
    root = Path(root)
    rank = torch.distributed.get_rank()
    name = step_dir_name(step)
    tmp, final = root / f"{_TMP_PREFIX}{name}", root / name
    started = time.perf_counter()

    # 1. A clean temporary directory (rank 0), seen by everyone before they write.
    _raise_if_any(_gather_errors(_fresh_directory(root, tmp) if rank == 0 else None), final, tmp)
    # 2. Model + optimizer (all ranks, collective), extra state (rank 0), RNG (each rank).
    _write_state(tmp, final, step, model_chunks, optimizer, extra, schedulers, rng)
    # 3. Checksums (every rank, its own files), then the commit (rank 0): manifest, marker, rename,
    #    latest, prune.
    manifest = _checksum_and_commit(root, tmp, final, step, keep_last, keep_steps)
    if rank == 0:
        logger.info(
            "saved checkpoint %s (%.1f s, %.1f MiB)",
            final,
            time.perf_counter() - started,
            manifest_bytes(manifest) / 2**20,
        )
    return final


def _write_state(
    tmp: Path,
    final: Path,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    extra: dict,
    schedulers: dict,
    rng: dict,
) -> None:
    """Write this rank's part of the checkpoint into `tmp`: the model chunks' and the optimizer's shards
    (collective), the extra state (rank 0) and this rank's RNG state. Raises on every rank when any rank
    failed; on return, every rank's files are written."""
    rank = torch.distributed.get_rank()
    models = [_unwrap(c) for c in model_chunks]
    state = _models_sharded_state_dict(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_sharding_metadata())
    errors = _write_shards(state, tmp)
    try:
        if rank == 0:
            save_torch(
                {
                    "format_version": FORMAT_VERSION,
                    "step": int(step),
                    "extra": extra,
                    "schedulers": schedulers,
                    "layout": _layout(),
                    "model_keys": _model_keys(len(models)),
                    "has_optimizer": optimizer is not None,
                },
                tmp / EXTRA_STATE_FILE,
            )
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        save_torch({"layout": _layout(), "rank": rank, "state": rng}, tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    except Exception as err:  # noqa: BLE001 - shared below so that no rank waits forever
        errors.append(err)
    failure = _failure(errors[0], tmp, f"writing {tmp}", errors[1:]) if errors else None
    _raise_if_any(_gather_errors(failure), final, tmp)  # also: every rank's files are written


# -------------------------------------------------------------------------------------------- load
_warned_rng = False


def load_checkpoint(
    path: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    restore_rng: bool = True,
    verify: str = "full",
) -> dict:
    """Load a checkpoint written by `save_checkpoint` into this rank's chunks; return its `extra`.

    Collective. Works under any TP/PP/VPP/DP layout (global keys); the number of chunks may differ
    from the saving run's. The optimizer state (Adam moments, step) is loaded when `optimizer` is
    given; schedulers when `scheduler` is given (same form as at save). RNG states are restored only
    when the checkpoint has this rank's file and was saved under the same layout (else: one warning).
    The returned dict is the saved `extra`, with ``"step"`` set to the saved step if it had none.

    `verify` (full | size | off): what is checked against the manifest before anything is read.
    Raises, on every rank alike: CheckpointDamaged naming the file when a file is missing, truncated or
    changed (by the manifest, or as torch's reader finds it); CheckpointError naming the path when the
    checkpoint is incomplete or does not fit the model/optimizer.
    """
    path = Path(path)
    marker = read_marker(path)
    check = verify_directory(path, verify, manifest_required=marker_says_manifest(marker))
    if check.problems:
        raise CheckpointDamaged(_damage_message(path, check.problems))
    if not check.has_manifest and verify != "off" and torch.distributed.get_rank() == 0:
        logger.warning(
            "checkpoint %s has no %s (saved before manifests existed): checked against torch's index "
            "only, not checksummed",
            path,
            MANIFEST_FILE,
        )

    models = [_unwrap(c) for c in model_chunks]
    meta, state = _on_every_rank(lambda: _prepare_load(path, models, optimizer), path)
    # Tensors we need that the checkpoint lacks (another model, value mode or reference setting):
    # checked before Megatron's load, which fails obscurely on them. They differ per rank.
    mine = _on_every_rank(lambda: _lacking_tensor_keys(state, path), path)
    lacking = sorted({key for keys in all_gather(mine) for key in keys})
    if lacking:
        shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise CheckpointError(
            f"{path} lacks {len(lacking)} tensors this model/optimizer needs: {shown} "
            "(different model, value mode or reference setting?)"
        )
    loaded = _on_every_rank(lambda: _read_shards(path, state), path)
    _on_every_rank(lambda: _apply(path, meta, loaded, models, optimizer, scheduler, restore_rng), path)
    extra = dict(meta.get("extra", {}))
    extra.setdefault("step", meta["step"])
    return extra


def _damage_message(path: Path, problems: Sequence[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"checkpoint {path} is damaged: {'; '.join(problems[:3])}{more}"


def _on_every_rank(fn: Callable, path: Path):
    """``fn()`` on every rank; when it fails on any rank, the same error on every rank (no rank is left
    waiting in the next collective). torch's CheckpointException (a BaseException) and other errors of
    reading become CheckpointDamaged / CheckpointError naming the path (and the damaged file if found)."""
    from torch.distributed.checkpoint.api import CheckpointException

    result, failure = None, None
    try:
        result = fn()
    except CheckpointError as err:
        failure = (str(err), isinstance(err, CheckpointDamaged))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - every error becomes one line
        failure = _reader_failure(path, err)
    failures = [f for f in all_gather(failure) if f is not None]
    if failures:
        message = "; ".join(dict.fromkeys(m for m, _ in failures))
        raise (CheckpointDamaged if any(d for _, d in failures) else CheckpointError)(message)
    return result


def _reader_failure(path: Path, err: BaseException) -> tuple[str, bool]:
    """``(message, damaged)`` for an error out of Megatron's / torch's checkpoint reader."""
    from dqo_megatron.compat.megatron_api import newer_format_problem

    newer = newer_format_problem(path)  # 0.19's files under <= 0.18: a clear cause, not the reader's crash
    if newer:
        return newer, False
    located = dcp_size_problems(path)  # name the file when one is short or missing
    if located or is_damage(err):
        where = f"; {'; '.join(located[:3])}" if located else ""
        return f"checkpoint {path} is damaged: torch's checkpoint reader failed ({one_line(err)}){where}", True
    return f"{path}: cannot load into this model/optimizer: {one_line(err)}", False


def _prepare_load(path: Path, models: list, optimizer) -> tuple[dict, dict]:
    meta = load_torch(path / EXTRA_STATE_FILE)
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None to load the model")
    state = _models_sharded_state_dict(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_sharding_metadata())
    return meta, state


def _read_shards(path: Path, state: dict) -> dict:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    return dist_checkpointing.load(state, str(path), strict=StrictHandling.ASSUME_OK_UNEXPECTED)


def _apply(path: Path, meta: dict, loaded: dict, models: list, optimizer, scheduler, restore_rng: bool) -> None:
    for key, model in zip(_model_keys(len(models)), models):
        _load_model_state(model, loaded[key], f"{path} [{key}]")
    if optimizer is not None:
        with _param_groups_of_this_run(optimizer):
            optimizer.load_state_dict(loaded["optimizer"])
    saved = meta.get("schedulers", {})
    for name, sched in _schedulers(scheduler).items():
        if name not in saved:
            raise CheckpointError(f"{path} has no state for scheduler {name!r} (it has: {sorted(saved) or 'none'})")
        sched.load_state_dict(saved[name])
    if restore_rng:
        _restore_rng(path, meta)


def _lacking_tensor_keys(state: dict, path: Path) -> list[str]:
    """Keys of the plain ShardedTensors in `state` that the checkpoint at `path` does not have."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    return sorted({v.key for v in nested_values(state) if isinstance(v, ShardedTensor) and v.key not in stored})


# ------------------------------------------------------------------------------------------ resume
def resume_checkpoint(
    root: str | Path | None,
    resume: str | None,
    model_chunks: Sequence[torch.nn.Module],
    optimizer=None,
    scheduler=None,
    verify: str = "full",
) -> tuple[Path, dict] | None:
    """Resume as `resume` says; return ``(checkpoint path, its extra)`` or None (start fresh). Collective.

    ``"auto"``: the checkpoints under `root` newest first (`resume_candidates`, listed by rank 0 so
    every rank tries the same ones): a damaged one is reported (which file, why) and skipped, the
    newest intact one is loaded; when every one is damaged, CheckpointError. ``"none"`` / ``""`` /
    None: None. A path: that checkpoint, and any damage is an error (no silent fallback).
    """
    choice = "" if resume is None else str(resume).strip()
    if choice.lower() in ("", "none") and root is not None and list_checkpoints(root):
        steps = [step for step, _ in list_checkpoints(root)]
        raise CheckpointError(
            f"{root} holds checkpoints (steps {steps[0]}..{steps[-1]}) that a fresh start "
            "(train.resume=none) would overwrite: continue them with train.resume=auto, or start "
            "over in another run_dir (or move them away first)"
        )
    if choice.lower() in ("", "none") or (choice.lower() == "auto" and root is None):
        return None
    if choice.lower() != "auto":
        path = resolve_resume(root, choice)
        return path, load_checkpoint(path, model_chunks, optimizer, scheduler, verify=verify)
    rank = torch.distributed.get_rank()
    damaged = []
    for path in broadcast(resume_candidates(root) if rank == 0 else None):
        try:
            extra = load_checkpoint(path, model_chunks, optimizer, scheduler, verify=verify)
        except CheckpointDamaged as err:
            damaged.append(str(err))
            if rank == 0:
                logger.warning("%s; skipping it (left as it is) and trying the previous checkpoint", err)
            continue
        if damaged and rank == 0:
            logger.warning(
                "resuming from %s, the newest intact checkpoint (%d newer damaged one(s) skipped)", path, len(damaged)
            )
        return path, extra
    if damaged:
        raise CheckpointError(
            f"no intact checkpoint under {root}: {' | '.join(damaged)}; restore one, or start over "
            "in another run_dir (the damaged ones are left as they are)"
        )
    return None


@contextlib.contextmanager
def _param_groups_of_this_run(optimizer):
    """While loading, keep the optimizer's param-group settings of this run instead of the checkpoint's.

    Why: Megatron matches saved to current param groups by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr) only. Groups that differ in anything else -- our value network's group, with
    its own max_lr/min_lr -- collide. The fp32/fp16 optimizers then fail ("parameter group that
    doesn't match the size"), or, when the sizes happen to agree, silently drop one group's Adam
    state; the distributed optimizer gives one group the other's max_lr (the policy would resume at
    the value LR). Per-parameter state (moments, step) is keyed by parameter, not by group, and is
    unaffected. So: group hyperparameters come from this run's config, and the LR/WD schedule
    position from the scheduler state (`load_checkpoint` loads it after the optimizer).
    """

    def groups_of_this_run(current_groups: list, _loaded_groups: list) -> list:
        # Index lists of the current groups: the numbering the loaded per-parameter state uses (it
        # was requested through this optimizer's own state_dict()).
        numbered, start = [], 0
        for group in current_groups:
            numbered.append(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": list(range(start, start + len(group["params"]))),
                }
            )
            start += len(group["params"])
        return numbered

    subs = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    inner = [getattr(sub, "optimizer", None) for sub in subs]
    settings = [
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] if opt is not None else None
        for opt in inner
    ]
    for sub in subs:  # an instance attribute shadows Megatron's staticmethod for this load only
        sub._filter_and_reorder_param_groups = groups_of_this_run
    try:
        yield
    finally:
        for sub in subs:
            sub.__dict__.pop("_filter_and_reorder_param_groups", None)
    for opt, saved in zip(inner, settings):  # the distributed optimizer's path does not use the hook
        if opt is not None and len(opt.param_groups) == len(saved):
            for group, own in zip(opt.param_groups, saved):
                group.update(own)


def _restore_rng(path: Path, meta: dict) -> None:
    global _warned_rng
    rank = torch.distributed.get_rank()
    file = path / RNG_DIR / f"rank_{rank:05d}.pt"
    layout = _layout()
    reason = None
    if meta.get("layout") != layout:
        reason = f"saved under layout {meta.get('layout')}, now {layout}"
    elif not file.is_file():
        reason = f"no RNG state for rank {rank}"
    if reason is None:
        saved = load_torch(file)
        set_rng_state(saved["state"])
        return
    if not _warned_rng:
        _warned_rng = True
        logger.warning("checkpoint %s: RNG states not restored (%s); random streams start fresh", path, reason)
