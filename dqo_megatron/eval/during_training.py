"""Held-out accuracy during training (`eval.interval`), and the rule that picks the checkpoint.

Why: at lambda = 1 DQO's policy loss equals its value loss by construction, so no training curve says
which checkpoint is the best policy; the paper picks checkpoints by evaluation. The trainer calls
`HeldOutEvaluator` every `eval.interval` steps of the policy (from the step it starts moving, after
any critic warm-up, to the last), on the policy it is
training, with greedy decoding (the same `generate` loop and prompt framing as the `megatron` rollout
backend); every evaluated step is also saved, and `best_evaluation` names the checkpoint to keep:

    the evaluated step with the highest held-out accuracy; on a tie, the earliest (least trained).

Pick it on a validation split disjoint from the test problems you report, or the test accuracy of the
picked checkpoint is biased upwards (the demo does so).

Layout: TP = PP = CP = 1 (the cache-less decoder runs one whole model per process); the problems are
split over data-parallel ranks and the counts summed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

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


def check_layout(run: RunConfig) -> None:
    """ConfigError when `eval.interval` is set on a layout the in-training evaluator cannot run."""
    p = run.parallel
    if run.eval.interval and (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                              p.context_parallel_size) != (1, 1, 1):  # fmt: skip
        raise ConfigError("eval.interval needs TP = PP = CP = 1 (the greedy decoder holds a whole model per "
                          "process); set eval.interval=0 and evaluate saved checkpoints with `dqo-megatron eval`")  # fmt: skip


def _tokenizer_and_stops(run: RunConfig) -> tuple[str, str | None]:
    if run.eval.tokenizer:
        return run.eval.tokenizer, None
    if run.init.policy:
        from dqo_megatron.conversion.megatron_io import HF_DIR

        hf = Path(run.init.policy) / HF_DIR
        if hf.is_dir():
            return str(hf), str(hf)
    raise ConfigError("eval.interval needs a tokenizer: set eval.tokenizer (HF directory or sentencepiece .model), "
                      "or start from a `convert hf-to-megatron` checkpoint (init.policy) that holds hf/")  # fmt: skip


def greedy_correct(backend, problems: list, max_new_tokens: int) -> int:
    """How many of `problems` (`tasks.datasets.Problem`) `backend` answers correctly with greedy decoding."""
    from dqo_megatron.eval.scoring import grade_outputs
    from dqo_megatron.rollout.backend import SamplingParams
    from dqo_megatron.process_scores.cache import prefix_seed

    if not problems:
        return 0
    prompts = [p.prompt for p in problems]
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    out = backend.generate(prompts, params, seeds=[prefix_seed(0, p, "") for p in prompts])
    return sum(bool(g.correct[0]) for g in grade_outputs(problems, [c[0].text for c in out]))


class HeldOutEvaluator:
    """Greedy accuracy of the policy on `run.eval.problems` (this data-parallel rank's share)."""

    def __init__(self, run: RunConfig, dp_rank: int, dp_size: int):
        from dqo_megatron.eval.run import select
        from dqo_megatron.tasks.datasets import load_problems

        check_layout(run)
        cfg = run.eval
        if not Path(cfg.problems).exists():
            raise ConfigError(f"eval.problems={cfg.problems!r} does not exist")
        self.mine = select(load_problems(cfg.problems, task=cfg.task), cfg.limit or None, "spread")[dp_rank::dp_size]
        self.tokenizer, self.hf_dir = _tokenizer_and_stops(run)
        self.run = run

    def __call__(self, policy, step: int) -> Evaluation:
        """Evaluate `policy` (the TP=PP=1 GPTModel being trained); collective over data-parallel ranks."""
        from megatron.core import parallel_state

        from dqo_megatron.rollout.megatron_backend import MegatronBackend

        started = time.perf_counter()
        backend = MegatronBackend.over_module(policy, self.run.model, self.tokenizer, hf_dir=self.hf_dir,
                                              batch_size=self.run.eval.batch_size)  # fmt: skip
        correct, failure = 0, None
        try:  # a failure on one rank must not leave the others waiting in the all-reduce below
            correct = greedy_correct(backend, self.mine, self.run.eval.max_new_tokens)
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            failure = exc
        counts = torch.tensor([float(correct), float(len(self.mine)), float(failure is not None)],
                              device=next(policy.parameters()).device)  # fmt: skip
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        if counts[2] > 0:
            raise RuntimeError(f"held-out evaluation at step {step} failed on {int(counts[2])} rank(s)"
                               + (f": {type(failure).__name__}: {failure}" if failure else "")) from failure
        correct, n = int(counts[0]), int(counts[1])
        return Evaluation(step=step, accuracy=correct / max(n, 1), correct=correct, problems=n,
                          seconds=time.perf_counter() - started)  # fmt: skip


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
    checkpoint steps must survive pruning (the best so far). Resumes from `run_dir/evals.jsonl`."""

    def __init__(self, run: RunConfig, dp_rank: int, dp_size: int, is_logger: bool, start: int = 0,
                 resumed_at: int | None = None):  # fmt: skip
        self.interval = run.eval.interval
        self.start = start  # the critic warm-up: the policy does not move before this step
        self.last_step = run.train.train_steps
        self.run_dir = run.run_dir
        self.is_logger = is_logger
        self.evaluator = HeldOutEvaluator(run, dp_rank, dp_size) if self.interval else None
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
            logger.info("eval step %d: held-out greedy accuracy %.2f%% (%d/%d, %.1f s)", step,
                        100 * evaluation.accuracy, evaluation.correct, evaluation.problems, evaluation.seconds)  # fmt: skip
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
