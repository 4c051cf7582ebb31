"""Evaluation: accuracy on GSM8K / MATH / MATH500 with greedy and sampled decoding (`dqo-megatron eval`).

  scoring          pure functions: grade fixed outputs, accuracy with MATH per-subject / per-level breakdowns
  config           EvalConfig: models, datasets (built-in or NAME=PATH), decodings
  results          EvalResults: accuracy per model, dataset and decoding; generation cost
  report           results.json, results.md (the paper's Table 3 layout), accuracy.png
  run              evaluate(cfg, backends): generate (cached), grade, collect EvalResults, write the report
  during_training  the trainer's held-out evaluator (HeldOutEvaluator; the schedule is training/evals.py)

See docs/evaluation.md.
"""

from dqo_megatron.eval.config import BUILTIN_DATASETS, DECODINGS, EvalConfig
from dqo_megatron.eval.results import EvalResults
from dqo_megatron.eval.run import evaluate
from dqo_megatron.eval.scoring import Accuracy, GradedProblem, ScoreSummary, grade_outputs, score_outputs, summarize

__all__ = [
    "BUILTIN_DATASETS",
    "DECODINGS",
    "EvalConfig",
    "EvalResults",
    "evaluate",
    "Accuracy",
    "GradedProblem",
    "ScoreSummary",
    "grade_outputs",
    "score_outputs",
    "summarize",
]
