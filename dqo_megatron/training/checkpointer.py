"""The train loop's checkpointer: resume, when to save (the interval, SIGTERM, evaluated steps), the
final save, and the refusal to save non-finite weights.

Checkpoints live in ``run_dir/checkpoints`` (`checkpointing.save_checkpoint` / `resume_checkpoint`:
manifests, damaged-checkpoint fallback, pruning to `train.keep_last_checkpoints` minus `keep_steps`).
A run without run_dir saves nothing. Every call here is collective.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch

from dqo_megatron.config import RunConfig, save_config

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """Training stopped: train.max_consecutive_nonfinite steps in a row had a non-finite loss."""

    user_facing = True
    """The message says what to change (the learning rate, the data): not a bug."""


def _any_rank(flag: bool) -> bool:
    from dqo_megatron.parallel import device_for_this_process

    value = torch.tensor([1.0 if flag else 0.0], device=device_for_this_process())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


class _SigtermFlag:
    """Turn SIGTERM into a flag the loop checks between steps (a preempted job saves, then exits)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> "_SigtermFlag":
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: no signal handling
            self._previous = None
        return self

    def _handle(self, *_args) -> None:
        self.raised = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Checkpointer:
    """Resume, save at its own interval (every `train.save_interval` steps, on SIGTERM, at evaluated
    steps), the final save. Use as a context manager around the loop: SIGTERM becomes a flag."""

    def __init__(self, run: RunConfig, parts) -> None:
        self.run = run
        self.parts = parts
        self.root = Path(run.run_dir) / "checkpoints" if run.run_dir else None
        self.interval = run.train.save_interval
        self.saved: list[str] = []
        """Checkpoint directories written by this run."""
        self.resumed_at: int | None = None
        """The step resumed from; None on a fresh start."""
        self._sigterm = _SigtermFlag()

    def __enter__(self) -> "Checkpointer":
        self._sigterm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._sigterm.__exit__(*exc)

    def resume(self) -> int:
        """Write run_dir/config.yaml, load the newest intact checkpoint (`train.resume`,
        `train.verify_checkpoints`) and the data position; the step to start from (0: fresh)."""
        from dqo_megatron.training import checkpointing

        run, parts = self.run, self.parts
        if run.run_dir and parts.is_logger:
            save_config(run, run.run_dir)
        if self.root is None:
            return 0
        # the newest intact checkpoint: damaged newer ones are reported (file, why) and skipped
        resumed = checkpointing.resume_checkpoint(
            self.root,
            run.train.resume,
            parts.ddp,
            parts.optimizer,
            parts.scheduler,
            verify=run.train.verify_checkpoints,
        )
        if resumed is None:
            return 0
        path, extra = resumed
        self.resumed_at = int(extra["step"])
        parts.batches.load_state_dict(extra["data"])
        if parts.is_logger:
            logger.info("resumed from %s at step %d", path, self.resumed_at)
            _note_packing_change(extra.get("packing"), bool(run.train.packing))
        return self.resumed_at

    def preempted(self) -> bool:
        """Whether any rank got SIGTERM (collective): the loop saves this step, then stops."""
        return _any_rank(self._sigterm.raised)

    def maybe_save(self, step: int, keep_steps=(), *, evaluated: bool = False, stop: bool = False) -> str | None:
        """Save `step` if it is due (interval, SIGTERM, an evaluated step); the checkpoint or None."""
        if self.root is None or not (evaluated or stop or (self.interval and step % self.interval == 0)):
            return None
        return self.save(step, keep_steps)

    def final_save(self, step: int, keep_steps=()) -> None:
        """The last step, unless it was just saved."""
        if self.root is not None and not (self.saved and self.saved[-1].endswith(f"{step:08d}")):
            self.save(step, keep_steps)

    def save(self, step: int, keep_steps=()) -> str:
        p = self.parts
        path = str(_save(self.root, step, p.ddp, p.optimizer, p.scheduler, p.batches, self.run.train, keep_steps))
        self.saved.append(path)
        return path


def _save(root: Path, step: int, ddp, optimizer, scheduler, batches, t, keep_steps=()) -> Path:
    from dqo_megatron.training import checkpointing

    # a step whose loss was finite can still leave inf/NaN weights (a huge LR): never save those
    if _any_rank(not all(bool(torch.isfinite(p).all()) for chunk in ddp for p in chunk.parameters())):
        raise TrainingDiverged(
            f"the weights became non-finite (NaN/inf) by step {step}: not saved; lower train.lr "
            "(or value.lr) and resume from the last checkpoint"
        )
    # Every data-parallel rank is at the same sampler position (epoch, batch): one state serves all.
    return checkpointing.save_checkpoint(
        root,
        step,
        ddp,
        optimizer,
        scheduler,
        extra={"step": step, "data": batches.state_dict(), "packing": bool(t.packing)},
        keep_last=t.keep_last_checkpoints,
        keep_steps=keep_steps,
    )


def _note_packing_change(saved, now: bool) -> None:
    """Warn when a run resumes with packing on where its checkpoint was written with it off (or back):
    the steps draw the same documents either way, so the run continues exactly up to fp32 rounding (the
    attention of packed rows sums over other blocks). `saved`: None for checkpoints older than the key."""
    if saved is not None and bool(saved) != now:
        logger.warning(
            "resumed with train.packing=%s; the checkpoint was written with %s: same documents per step, "
            "the losses equal up to fp32 rounding (set train.packing=%s to continue as before)",
            str(now).lower(),
            str(bool(saved)).lower(),
            str(bool(saved)).lower(),
        )
