"""The train loop: DQO (or a baseline) on Megatron-Core, top to bottom, out of three components.

    setup         `run_setup.setup`: data -> models (policy, value, reference) -> DDP -> optimizer, schedule
                  (`TrainParts`)
    checkpointer  `checkpointer.Checkpointer`: resume from the newest intact checkpoint in run_dir (or the
                  one named), save every N steps, on SIGTERM and at evaluated steps, the final save
    metrics       `metrics_logger.MetricsLogger`: console, run_dir/metrics.jsonl, TensorBoard, W&B
    loop          micro-batches -> Megatron's forward/backward schedule -> step (skipped if non-finite)
                  -> log -> evaluate (eval.interval) -> checkpoint

run_dir is locked for the whole run. Everything that is per-rank (data shard, RNG, checkpoint shards) is
handled by the pieces it calls; rank 0 prints and writes TensorBoard.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training.algorithms import derived_metrics, rl_forward_step
from dqo_megatron.training.checkpointer import Checkpointer, TrainingDiverged
from dqo_megatron.training.evals import EvalSchedule, EvaluatorFactory, build_evaluator
from dqo_megatron.training.metrics_logger import MetricsLogger, check_wandb
from dqo_megatron.training.policy_value import with_resolved_packing
from dqo_megatron.training.run_setup import TrainParts, setup
from dqo_megatron.training.step import microbatch_iterators, train_step

logger = logging.getLogger(__name__)


@dataclass
class TrainSummary:
    """What a `train` call did (the same on every rank)."""

    start_step: int = 0
    """Step the run started from (> 0 after a resume)."""
    steps: int = 0
    """Optimizer steps completed (counting from 0, including the resumed part)."""
    losses: list[float] = field(default_factory=list)
    """Global loss of each step taken in this call."""
    metrics: list[dict] = field(default_factory=list)
    """All reduced metrics of each step taken in this call."""
    skipped_nonfinite: int = 0
    """Steps not applied because the loss was NaN/inf."""
    stopped_by: str = "done"
    """done | sigterm | nonfinite."""
    checkpoints: list[str] = field(default_factory=list)
    """Checkpoint directories written by this call."""
    best_evaluation: object = None
    """With eval.interval: the `Evaluation` (step, accuracy, checkpoint) the selection rule picks."""
    model_chunks: list = field(default_factory=list, repr=False)
    """This rank's trained `PolicyValueModel` chunks (for evaluation in the same process)."""
    nonfinite_in_a_row: int = field(default=0, repr=False)
    """Steps skipped in a row up to now (train.max_consecutive_nonfinite stops the run)."""

    def record(self, result) -> None:
        """One step's `StepResult`."""
        self.losses.append(result.loss)
        self.metrics.append(result.metrics)
        self.nonfinite_in_a_row = 0 if result.update_successful else self.nonfinite_in_a_row + 1
        self.skipped_nonfinite += 0 if result.update_successful else 1


def train(run: RunConfig, make_evaluator: EvaluatorFactory | None = None) -> TrainSummary:
    """Train `run.algorithm` on `run.data.train_prefix` for `run.train.train_steps` steps (collective).

    `make_evaluator(run, dp_rank, dp_size)` builds what measures the policy every `eval.interval` steps
    (`dqo_megatron.eval.during_training.HeldOutEvaluator`, which `dqo-megatron train` passes); it is
    called only when the interval is set, and then required (ConfigError without it).

    Holds `run.run_dir`'s lock for the whole run (`run_dir_lock`): a second run on the same run_dir
    refuses to start (RunDirInUse naming the holder) before it writes anything there."""
    from dqo_megatron import parallel
    from dqo_megatron.training.run_dir_lock import run_dir_lock

    _check_run(run)
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    run = with_resolved_packing(run, log=info.rank == 0)  # auto: by layer spec; config.yaml records it
    with run_dir_lock(run.run_dir):
        parts = setup(run, info)
        checkpointer = Checkpointer(run, parts)
        summary = TrainSummary(start_step=checkpointer.resume(), model_chunks=parts.chunks)
        evaluator = build_evaluator(run, make_evaluator, info.dp_rank, info.dp_size)
        evals = EvalSchedule(
            run, parts.is_logger, evaluator, start=parts.value_warmup, resumed_at=checkpointer.resumed_at
        )
        step = summary.start_step
        with MetricsLogger(run, parts, start_step=step) as metrics:
            with checkpointer:  # SIGTERM becomes a flag: the step is saved, then the run stops
                if evals.due(step):  # the starting policy: the baseline the picked checkpoint must beat
                    _evaluate_and_save(evals, parts, step, checkpointer, metrics)
                while step < run.train.train_steps:
                    result, seconds = _step(run, parts)
                    step += 1
                    summary.record(result)
                    metrics.log_step(step, result, seconds)
                    if summary.nonfinite_in_a_row >= run.train.max_consecutive_nonfinite:
                        summary.stopped_by = "nonfinite"
                        break
                    stop = checkpointer.preempted()
                    if evals.due(step) and not stop:  # saves the evaluated step too
                        _evaluate_and_save(evals, parts, step, checkpointer, metrics)
                    else:  # the interval, SIGTERM
                        checkpointer.maybe_save(step, evals.keep_steps(), stop=stop)
                    if stop:
                        summary.stopped_by = "sigterm"
                        break
            if summary.stopped_by == "done":
                checkpointer.final_save(step, evals.keep_steps())
    summary.steps, summary.checkpoints, summary.best_evaluation = step, checkpointer.saved, evals.best
    if summary.stopped_by == "nonfinite":
        raise TrainingDiverged(
            f"stopped after {run.train.max_consecutive_nonfinite} consecutive steps with a "
            f"NaN/inf loss (step {step}); lower train.lr or check the data"
        )
    return summary


def _step(run: RunConfig, parts: TrainParts):
    """One optimizer step on the next global batch: (`StepResult` with derived metrics, seconds)."""
    mbs = parts.batches.next_step(parts.num_microbatches)
    data = microbatch_iterators(parts.ddp, mbs)
    t0 = time.perf_counter()
    # the critic warm-up counts applied steps (the scheduler's), like the policy's LR schedule
    warming_up = parts.scheduler.num_steps < parts.value_warmup
    forward_step = partial(rl_forward_step, run, policy_weight=0.0 if warming_up else 1.0)
    result = train_step(
        parts.ddp,
        parts.optimizer,
        data,
        num_microbatches=len(mbs),  # train.micro_batch_tokens: varies from step to step
        seq_length=run.train.seq_length,
        micro_batch_size=parts.pipeline_mbs,
        forward_step=forward_step,
        metric_key="loss",
        member_clips=parts.member_clips,
    )
    result.document_tokens = document_tokens(mbs)
    result.metrics.update(derived_metrics(result.metrics))
    result.metrics.update({f"grad_norm_{m}": n for m, n in result.grad_norms.items()})
    seconds = time.perf_counter() - t0
    if result.update_successful:
        parts.scheduler.step(increment=1)
    return result, seconds


def document_tokens(micro_batches: list[dict]) -> int:
    """Input positions this step's documents fill (`input_tokens`), summed over this rank's micro-batches
    and the data-parallel ranks (collective over the DP group; TP/CP/PP ranks of one DP rank hold the
    same documents, so they are not summed)."""
    import torch
    from megatron.core import parallel_state

    local = sum(batch["input_tokens"].sum() for batch in micro_batches)
    total = torch.as_tensor(local, dtype=torch.float64, device=micro_batches[0]["input_tokens"].device)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    return int(total.item())


def _evaluate_and_save(evals, parts: TrainParts, step: int, checkpointer: Checkpointer, metrics: MetricsLogger) -> None:
    """Held-out accuracy of the policy now, the checkpoint holding it (kept if it is the best), the log."""
    evaluation = evals.evaluate(parts.chunks[0].policy, step)
    metrics.log_eval(step, evaluation)
    checkpoint = checkpointer.maybe_save(step, evals.keep_steps(evaluation), evaluated=True)
    evals.record(evaluation, checkpoint)


def _check_run(run: RunConfig) -> None:
    """ConfigError before anything is built: no dataset named, run_dir overlapping what the run reads, or
    train.wandb_project set without wandb."""
    if not run.data.train_prefix:
        raise ConfigError("data.train_prefix is not set: give the prefix written by `dqo-megatron preprocess`")
    _check_run_dir_apart(run)
    check_wandb(run)


def _check_run_dir_apart(run: RunConfig) -> None:
    """ConfigError when what the run writes (its checkpoints, which it prunes, its config, its logs)
    would overlap what it reads: the dataset, the init checkpoints, the eval problems."""
    from dqo_megatron.data.indexed import dataset_files
    from dqo_megatron.outputs import OutputError, check_apart

    if not run.run_dir:  # a run that writes nothing
        return
    root = Path(run.run_dir)
    written = [root / "checkpoints", root / "config.yaml", root / "tensorboard"]
    read = dataset_files(run.data.train_prefix) + [
        run.init.policy,
        run.init.reference,
        run.init.value,
        run.eval.problems,
    ]
    try:
        check_apart(written, [p for p in read if p])
    except OutputError as exc:
        raise ConfigError(f"run_dir={run.run_dir}: {exc}") from None
