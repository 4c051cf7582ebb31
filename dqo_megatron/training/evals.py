"""When the trainer evaluates its policy (`eval.interval`), what it measured, and the rule that picks the
checkpoint:

    the evaluated step with the highest held-out accuracy; on a tie, the earliest (least trained).

Why: at lambda = 1 DQO's policy loss equals its value loss by construction, so no training curve says
which checkpoint is the best policy; the paper picks checkpoints by evaluation. Every evaluated step is
also saved, the best one survives pruning, and `run_dir/evals.jsonl` names it (`best_evaluation`).

How the policy is measured is not decided here: `train(run, make_evaluator)` builds the evaluator
(`dqo_megatron.eval.during_training.HeldOutEvaluator`: greedy accuracy on held-out problems), so the
trainer never imports the eval layer above it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.outputs import atomic_write_text

logger = logging.getLogger(__name__)

EVALS_FILE = "evals.jsonl"
"""One line per evaluation in the run directory: step, accuracy, correct, problems, seconds, checkpoint."""


@dataclass
class Evaluation:
    """One held-out evaluation of the policy."""

    step: int
    accuracy: float
    correct: int
    problems: int
    seconds: float
    checkpoint: str | None = None


Evaluator = Callable[[Any, int], Optional[Evaluation]]
"""(policy, step) -> the Evaluation of the policy at that step (collective over data-parallel ranks)."""

EvaluatorFactory = Callable[[RunConfig, int, int], Evaluator]
"""(run, dp_rank, dp_size) -> the run's Evaluator; `dqo_megatron.eval.during_training.HeldOutEvaluator` is one."""


def build_evaluator(
    run: RunConfig, make_evaluator: EvaluatorFactory | None, dp_rank: int, dp_size: int
) -> Evaluator | None:
    """The evaluator `EvalSchedule` calls: None without eval.interval; ConfigError when the interval is
    set but the caller gave no way to evaluate (a library caller of `train` must pass `make_evaluator`)."""
    if not run.eval.interval:
        return None
    if make_evaluator is None:
        raise ConfigError(
            f"eval.interval={run.eval.interval} needs an evaluator: call train(run, make_evaluator="
            "dqo_megatron.eval.during_training.HeldOutEvaluator) (`dqo-megatron train` does), or set "
            "eval.interval=0"
        )
    return make_evaluator(run, dp_rank, dp_size)


def read_evaluations(run_dir: str | Path) -> list[Evaluation]:
    """The evaluations logged in `run_dir` (the last line of a step wins: a resumed run repeats steps)."""
    path = Path(run_dir) / EVALS_FILE
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: that evaluation was not recorded
            continue
        if isinstance(row, dict) and "step" in row:
            by_step[row["step"]] = Evaluation(**row)
    return [by_step[s] for s in sorted(by_step)]


def best_evaluation(evaluations: list[Evaluation]) -> Evaluation | None:
    """The rule: highest accuracy; on a tie, the earliest step. None without evaluations."""
    if not evaluations:
        return None
    return min(evaluations, key=lambda e: (-e.accuracy, e.step))


def append_evaluation(run_dir: str | Path, evaluation: Evaluation) -> None:
    """Add one line to `run_dir/evals.jsonl` (flushed and fsynced: it decides which checkpoint is kept)."""
    with open(Path(run_dir) / EVALS_FILE, "a") as f:
        f.write(json.dumps(asdict(evaluation)) + "\n")
        f.flush()
        os.fsync(f.fileno())


class EvalSchedule:
    """The trainer's component for `eval.interval`: when to evaluate, what was measured, which
    checkpoint steps must survive pruning (the best so far). Resumes from `run_dir/evals.jsonl`.
    What is measured is the injected evaluator's business (`eval.during_training.HeldOutEvaluator`)."""

    def __init__(
        self,
        run: RunConfig,
        is_logger: bool,
        evaluator: Evaluator | None,
        start: int = 0,
        resumed_at: int | None = None,
    ):
        """`evaluator`: measures the policy at a step (`make_evaluator`'s); None without eval.interval."""
        self.interval = run.eval.interval
        self.start = start  # the critic warm-up: the policy does not move before this step
        self.last_step = run.train.train_steps
        self.run_dir = run.run_dir
        self.is_logger = is_logger
        self.evaluator = evaluator if self.interval else None
        self.evaluations = self._history(resumed_at) if (self.interval and run.run_dir) else []

    def _history(self, resumed_at: int | None) -> list[Evaluation]:
        """The evaluations this run continues: those up to the resumed step (none on a fresh start: an
        older run in the same directory measured other weights). Rank 0 reads and rewrites the log, every
        rank gets its list (all must agree on which steps are due: evaluation and saving are collective)."""
        holder = [None]
        if torch.distributed.get_rank() == 0:
            kept = [e for e in read_evaluations(self.run_dir) if resumed_at is not None and e.step <= resumed_at]
            path = Path(self.run_dir) / EVALS_FILE
            if path.exists() or kept:
                atomic_write_text(path, "".join(json.dumps(asdict(e)) + "\n" for e in kept))
            holder = [kept]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def due(self, step: int) -> bool:
        """Whether `step` (optimizer steps done) is evaluated and not yet measured."""
        if self.evaluator is None or step < self.start or any(e.step == step for e in self.evaluations):
            return False
        return (step - self.start) % self.interval == 0 or step == self.last_step

    def evaluate(self, policy, step: int) -> Evaluation:
        """Measure the policy now (collective)."""
        evaluation = self.evaluator(policy, step)
        if self.is_logger:
            logger.info(
                "eval step %d: held-out greedy accuracy %.2f%% (%d/%d, %.1f s)",
                step,
                100 * evaluation.accuracy,
                evaluation.correct,
                evaluation.problems,
                evaluation.seconds,
            )
        return evaluation

    def keep_steps(self, pending: Evaluation | None = None) -> list[int]:
        """Checkpoint steps never to prune: the best evaluation's (counting `pending`)."""
        best = best_evaluation(self.evaluations + ([pending] if pending else []))
        return [best.step] if best is not None else []

    def record(self, evaluation: Evaluation, checkpoint: str | None) -> None:
        """Remember an evaluation and the checkpoint holding its weights (rank 0 appends evals.jsonl)."""
        evaluation.checkpoint = checkpoint
        self.evaluations.append(evaluation)
        if self.is_logger and self.run_dir:
            append_evaluation(self.run_dir, evaluation)
            best = best_evaluation(self.evaluations)
            logger.info("best so far: step %d (%.2f%%)", best.step, 100 * best.accuracy)

    @property
    def best(self) -> Evaluation | None:
        """The checkpoint the rule picks (module docstring)."""
        return best_evaluation(self.evaluations)
