"""Training checkpoints: model chunks, optimizer, schedulers, RNG states and the loop's own state.

Layout of a checkpoint root (``run_dir/checkpoints``)::

    <root>/
      latest                  text: the step of the newest checkpoint (written by tmp + rename)
      step_00000100/          one complete checkpoint
        COMPLETE              JSON marker, written last (fsync) -- a directory without it is ignored
        .metadata, *.distcp,  megatron.core.dist_checkpointing (torch_dist): the model chunks'
        common.pt,            `sharded_state_dict()` under "model" (or "model0", "model1", ... under
        metadata.json         virtual PP, as Megatron-LM) and the optimizer's under "optimizer"
        extra_state.pt        rank 0: step, the caller's `extra`, scheduler states, layout
        rng/rank_00000.pt     one per rank: python / numpy / torch / CUDA / Megatron tracker RNG
      .tmp_step_00000200/     a save in progress (or killed); never read, removed by the next save

Atomicity: every rank writes into ``.tmp_step_N``; after a barrier rank 0 writes ``COMPLETE``, renames
the directory to ``step_N`` (one `os.replace`), then rewrites ``latest``, then prunes. A crash at any
point leaves the previous ``step_*`` directory untouched and complete; `find_latest_checkpoint`
trusts ``latest`` only when it names a complete directory and otherwise scans for the newest one.

Model and optimizer are stored by global (layout-free) keys, so a checkpoint saved under one TP/PP/VPP
layout loads under another; RNG states are per rank and are restored only under the same layout.
Everything of ours is read back with ``torch.load(weights_only=True)``: `extra` and scheduler states
must be tensors and Python primitives (checked at save time).

`PolicyValueModel` (several GPTs + a value head in one chunk) gets its sharded state dict from
`policy_value_sharded_state_dict`: each member's GPT keys under ``policy.`` / ``value.`` /
``reference.`` (a frozen reference held in the run is saved too, so a resume needs nothing else),
and the replicated head as ``value_head.weight`` / ``value_head.bias``.

On load, optimizer param-group settings (max_lr, betas, ...) come from the resuming run's config and
the LR/WD position from the scheduler state; per-parameter state (Adam moments, step) from the
checkpoint (see `_param_groups_of_this_run` for why Megatron's group matching is bypassed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
LATEST_FILE = "latest"
EXTRA_STATE_FILE = "extra_state.pt"
RNG_DIR = "rng"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp_"
_TRASH_PREFIX = ".trash_"
_MEMBERS = ("policy", "value", "reference")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the model/optimizer it is loaded into."""


def step_dir_name(step: int) -> str:
    """``step_00000042`` for step 42 (the name of a checkpoint directory under the root)."""
    return f"step_{int(step):08d}"


# ------------------------------------------------------------------------------------------ finding
def is_complete(path: str | Path) -> bool:
    """Whether `path` is a checkpoint directory whose save finished (has the COMPLETE marker)."""
    return (Path(path) / COMPLETE_MARKER).is_file()


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete ``step_*`` directory under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_RE.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def find_latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint to resume from under `root`, or None when there is none.

    ``<root>/latest`` wins when it names a complete ``step_*`` directory (so a run resumed from an
    older checkpoint keeps following its own line, even if newer directories of an abandoned line
    exist). Otherwise (missing, unreadable, or pointing at an incomplete/removed directory) the newest
    complete ``step_*`` directory is returned. ``.tmp_*`` directories are never considered.
    """
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        text = latest.read_text().strip()
        try:
            candidate = root / step_dir_name(int(text))
        except ValueError:
            logger.warning("checkpoint root %s: %s holds %r, not a step; scanning instead", root, latest, text)
        else:
            if is_complete(candidate):
                return candidate
            logger.warning("checkpoint root %s: %s names %s, which is not a complete checkpoint; scanning "
                           "for the newest complete one", root, latest, candidate.name)  # fmt: skip
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_resume(root: str | Path | None, resume: str | None) -> Path | None:
    """What to resume from: ``"auto"`` -> `find_latest_checkpoint(root)` (None when there is none),
    ``"none"`` / ``""`` / None -> None, anything else -> that checkpoint directory.

    Raises FileNotFoundError / CheckpointError naming the path when an explicit checkpoint is missing or
    incomplete.
    """
    choice = "" if resume is None else str(resume).strip()
    if choice.lower() in ("", "none"):
        return None
    if choice.lower() == "auto":
        return None if root is None else find_latest_checkpoint(root)
    path = Path(choice).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"resume checkpoint {path} does not exist")
    if not is_complete(path):
        hint = ""
        if path.is_dir() and list_checkpoints(path):
            hint = " (it is a checkpoint root: use resume 'auto' or name one of its step_* directories)"
        elif _TMP_PREFIX in path.name:
            hint = " (a save that never finished)"
        raise CheckpointError(f"resume checkpoint {path} is not a complete checkpoint: no {COMPLETE_MARKER} "
                              f"marker{hint}")  # fmt: skip
    return path


# --------------------------------------------------------------------------- model state dicts
def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside Megatron's DDP / Float16Module wrappers (what Megatron-LM checkpoints)."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(module)


def _sharding_metadata() -> dict:
    # Fully reshardable formats (layout-free keys), without per-sub-optimizer key prefixes, so that
    # a change of parameter grouping (e.g. a separate value learning rate) keeps keys stable.
    return {"chained_optim_avoid_prefix": True, "distrib_optim_sharding_type": "fully_sharded_model_space"}


def policy_value_sharded_state_dict(model, prefix: str = "", sharded_offsets: tuple = (),
                                    metadata: dict | None = None) -> dict:  # fmt: skip
    """Sharded state dict of a `PolicyValueModel`: its members' GPT keys under ``<prefix><member>.``,
    the value head (``weight [1, h]``, ``bias [1]``, replicated over TP and DP/CP, present on the last
    pipeline stage only) as plain ShardedTensors under ``<prefix>value_head.``."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = {}
    for name in _MEMBERS:
        member = getattr(model, name, None)
        if member is not None:
            state.update(member.sharded_state_dict(prefix=f"{prefix}{name}.", sharded_offsets=sharded_offsets,
                                                   metadata=metadata))  # fmt: skip
    if getattr(model, "value_head", None) is not None:
        head = model.value_head.state_dict(keep_vars=True)
        # No TP axis: every TP/DP/CP rank holds the whole head; replica ids make one rank save it.
        state.update(make_sharded_tensors_for_checkpoint(head, f"{prefix}value_head.", {}, sharded_offsets))
    return state


def _model_keys(n_chunks: int) -> list[str]:
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _models_sharded_state_dict(models: Sequence[torch.nn.Module]) -> dict:
    return {key: model.sharded_state_dict(metadata=_sharding_metadata()) for key, model in
            zip(_model_keys(len(models)), models)}  # fmt: skip


def _load_model_state(model: torch.nn.Module, state: dict, where: str) -> None:
    """`model.load_state_dict(state)`, member by member for a `PolicyValueModel` (its members may be
    wrapped in Float16Module, whose parameter names carry an extra ``module.`` the checkpoint keys lack)."""
    from dqo_megatron.training.policy_value import PolicyValueModel

    try:
        if isinstance(model, PolicyValueModel):
            for name in _MEMBERS:
                member = getattr(model, name)
                if member is not None:
                    sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
                    _unwrap(member).load_state_dict(sub, strict=True)
            if model.value_head is not None:
                sub = {k[len("value_head.") :]: v for k, v in state.items() if k.startswith("value_head.")}
                model.value_head.load_state_dict(sub, strict=True)
        else:
            model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{where}: the checkpoint's model does not fit this model: {err}") from err


# --------------------------------------------------------------------------------------------- RNG
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


def rng_state() -> dict:
    """This process's RNG states: python, numpy (as tensors), torch CPU, CUDA (current device), and
    Megatron's model-parallel RNG tracker (the TP-region / expert / data-parallel generators)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # numpy is optional for us; nothing to save then
        pass
    else:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["tracker"] = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    return state


def set_rng_state(state: Mapping) -> None:
    """Restore what `rng_state` returned (parts absent from `state` are left alone)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            pass
        else:
            s = state["numpy"]
            np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                                 s["cached_gaussian"]))  # fmt: skip
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("tracker"):
        get_cuda_rng_tracker().set_states({k: v.clone() for k, v in state["tracker"].items()})


def _as_tuple(obj):
    # random.setstate wants the nested tuples back exactly (torch.save keeps tuples; be safe anyway).
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


# ---------------------------------------------------------------------------------- file helpers
_PLAIN = (type(None), bool, int, float, str, torch.Tensor)


def check_plain(obj: Any, where: str = "extra") -> None:
    """Raise TypeError (naming the place) unless `obj` is made of tensors, python scalars/strings and
    dicts/lists/tuples of those -- what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint {where}: key {key!r} is a {type(key).__name__}; use str or int keys")
            check_plain(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints keep "
                    "only tensors, python scalars/strings and dicts/lists of them (convert with int(), "
                    "float() or torch.tensor())")  # fmt: skip


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - name the file whatever went wrong
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _schedulers(scheduler) -> dict:
    """{name: scheduler}: a single scheduler is stored as "scheduler", a mapping by its own names."""
    if scheduler is None:
        return {}
    if isinstance(scheduler, Mapping):
        return dict(scheduler)
    return {"scheduler": scheduler}


# -------------------------------------------------------------------------------------------- save
def save_checkpoint(root: str | Path, step: int, model_chunks: Sequence[torch.nn.Module], optimizer,
                    scheduler=None, extra: dict | None = None, keep_last: int | None = 3,
                    keep_steps: Sequence[int] = ()) -> Path:  # fmt: skip
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
    aside first; a crash between the two renames leaves the previous step as the newest complete one.
    """
    from megatron.core import dist_checkpointing

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")
    extra = dict(extra or {})
    check_plain(extra, "extra")
    schedulers = {name: s.state_dict() for name, s in _schedulers(scheduler).items()}
    check_plain(schedulers, "scheduler state")
    rng = rng_state()  # before anything else can draw random numbers
    root = Path(root)
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    name = step_dir_name(step)
    tmp, final = root / f"{_TMP_PREFIX}{name}", root / name
    started = time.perf_counter()

    # 1. A clean temporary directory (rank 0), seen by everyone before they write.
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"{_TMP_PREFIX}*"):  # left by killed saves; never read
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
            tmp.mkdir()
        except OSError as err:
            error = f"cannot create {tmp}: {type(err).__name__}: {err}"
    _raise_if_any(_gather_errors(error), final)

    # 2. Model + optimizer (all ranks, collective), extra state (rank 0), RNG (each rank).
    models = [_unwrap(c) for c in model_chunks]
    state = _models_sharded_state_dict(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_sharding_metadata())
    dist_checkpointing.save(state, str(tmp))
    error = None
    try:
        if rank == 0:
            _save_torch({"format_version": FORMAT_VERSION, "step": int(step), "extra": extra,
                         "schedulers": schedulers, "layout": _layout(), "model_keys": _model_keys(len(models)),
                         "has_optimizer": optimizer is not None}, tmp / EXTRA_STATE_FILE)  # fmt: skip
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        _save_torch({"layout": _layout(), "rank": rank, "state": rng}, tmp / RNG_DIR / f"rank_{rank:05d}.pt")
    except Exception as err:  # noqa: BLE001 - shared below so that no rank waits forever
        error = f"writing {tmp}: {type(err).__name__}: {err}"
    _raise_if_any(_gather_errors(error), final)  # also: every rank's files are written

    # 3. Commit (rank 0): marker, rename, latest, prune.
    error = None
    if rank == 0:
        try:
            _commit(root, tmp, final, step, world)
            _prune(root, step, keep_last, keep_steps)
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = f"{type(err).__name__}: {err}"
    _raise_if_any(_gather_errors(error), final)
    if rank == 0:
        logger.info("saved checkpoint %s (%.1f s)", final, time.perf_counter() - started)
    return final


def _gather_errors(error: str | None) -> list[tuple[int, str]]:
    """Every rank's error message (rank, message), on every rank; doubles as a barrier."""
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, error)
    return [(rank, message) for rank, message in enumerate(every) if message is not None]


def _raise_if_any(errors: list[tuple[int, str]], final: Path) -> None:
    if errors:
        listed = "; ".join(f"rank {rank}: {message}" for rank, message in errors)
        raise CheckpointError(f"saving checkpoint {final} failed ({listed}); the previous checkpoints are untouched")


def _write_marker(tmp: Path, step: int, world: int) -> None:
    with open(tmp / COMPLETE_MARKER, "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "step": int(step), "world_size": world, "time": time.time()}, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)  # the marker and everything written before it are durable before the rename


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temporary directory to its final name (atomic on POSIX)."""
    trash = None
    if final.exists():  # os.replace cannot replace a non-empty directory: move the old one aside
        trash = final.with_name(f"{_TRASH_PREFIX}{final.name}.{os.getpid()}")
        os.replace(final, trash)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _commit(root: Path, tmp: Path, final: Path, step: int, world: int) -> None:
    _write_marker(tmp, step, world)
    _publish(tmp, final)
    _write_text_atomically(root / LATEST_FILE, f"{int(step)}\n")


def _prune(root: Path, step: int, keep_last: int | None, keep_steps: Sequence[int] = ()) -> None:
    """Delete complete checkpoints older than `step` beyond the newest ``keep_last - 1`` of them, except
    those of `keep_steps`.

    Newer directories (another line of the run) and incomplete ones are left alone. The marker goes
    first, so a deletion cut short leaves an ignored, incomplete directory rather than a broken one.
    """
    for trash in root.glob(f"{_TRASH_PREFIX}step_*"):
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last is None:
        return
    older = [(s, p) for s, p in list_checkpoints(root) if s < step]
    doomed = [(s, p) for s, p in older[: max(0, len(older) - (keep_last - 1))] if s not in set(keep_steps)]
    for _, path in doomed:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)


# -------------------------------------------------------------------------------------------- load
_warned_rng = False


def load_checkpoint(path: str | Path, model_chunks: Sequence[torch.nn.Module], optimizer=None, scheduler=None,
                    restore_rng: bool = True) -> dict:  # fmt: skip
    """Load a checkpoint written by `save_checkpoint` into this rank's chunks; return its `extra`.

    Collective. Works under any TP/PP/VPP/DP layout (global keys); the number of chunks may differ
    from the saving run's. The optimizer state (Adam moments, step) is loaded when `optimizer` is
    given; schedulers when `scheduler` is given (same form as at save). RNG states are restored only
    when the checkpoint has this rank's file and was saved under the same layout (else: one warning).
    The returned dict is the saved `extra`, with ``"step"`` set to the saved step if it had none.

    Raises CheckpointError naming the path when it is incomplete or does not fit the model/optimizer.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    meta = _load_torch(path / EXTRA_STATE_FILE)
    if optimizer is not None and not meta.get("has_optimizer", True):
        raise CheckpointError(f"{path} was saved without optimizer state; pass optimizer=None to load the model")

    models = [_unwrap(c) for c in model_chunks]
    state = _models_sharded_state_dict(models)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_sharding_metadata())
    # Tensors we need that the checkpoint lacks (another model, value mode or reference setting):
    # checked before Megatron's load, which fails obscurely on them. They differ per rank, so they
    # are gathered and every rank raises together (a lone raise would leave the others hanging).
    lacking = _lacking_tensor_keys(state, path)
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, lacking)
    lacking = sorted({key for keys in every for key in keys})
    if lacking:
        shown = ", ".join(lacking[:5]) + (" ..." if len(lacking) > 5 else "")
        raise CheckpointError(f"{path} lacks {len(lacking)} tensors this model/optimizer needs: {shown} "
                              "(different model, value mode or reference setting?)")  # fmt: skip
    try:
        loaded = dist_checkpointing.load(state, str(path), strict=StrictHandling.ASSUME_OK_UNEXPECTED)
    except Exception as err:  # noqa: BLE001 - e.g. a different optimizer param grouping; name the path
        raise CheckpointError(f"{path}: cannot load into this model/optimizer: {type(err).__name__}: {err}") from err
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
    extra = dict(meta.get("extra", {}))
    extra.setdefault("step", meta["step"])
    return extra


def _lacking_tensor_keys(state: dict, path: Path) -> list[str]:
    """Keys of the plain ShardedTensors in `state` that the checkpoint at `path` does not have."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    stored = dist_checkpointing.load_tensors_metadata(str(path))
    return sorted({v.key for v in nested_values(state) if isinstance(v, ShardedTensor) and v.key not in stored})


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
            numbered.append({**{k: v for k, v in group.items() if k != "params"},
                             "params": list(range(start, start + len(group["params"])))})  # fmt: skip
            start += len(group["params"])
        return numbered

    subs = list(getattr(optimizer, "chained_optimizers", None) or [optimizer])
    inner = [getattr(sub, "optimizer", None) for sub in subs]
    settings = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] if opt is not None else None
                for opt in inner]  # fmt: skip
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
        saved = _load_torch(file)
        set_rng_state(saved["state"])
        return
    if not _warned_rng:
        _warned_rng = True
        logger.warning("checkpoint %s: RNG states not restored (%s); random streams start fresh", path, reason)
