"""Evaluation: accuracy on GSM8K / MATH / MATH500 with greedy and sampled decoding (`dqo-megatron eval`).

  scoring  pure functions: grade fixed outputs, accuracy with MATH per-subject / per-level breakdowns
  run      EvalConfig, evaluate(cfg, backends): generate (cached), grade, collect EvalResults
  report   results.json, results.md (the paper's Table 3 layout), accuracy.png

See docs/evaluation.md.
"""

from dqo_megatron.eval.run import BUILTIN_DATASETS, DECODINGS, EvalConfig, EvalResults, evaluate
from dqo_megatron.eval.scoring import (Accuracy, GradedProblem, ScoreSummary, grade_outputs, score_outputs,
                                       summarize)

__all__ = [
    "BUILTIN_DATASETS", "DECODINGS", "EvalConfig", "EvalResults", "evaluate",
    "Accuracy", "GradedProblem", "ScoreSummary", "grade_outputs", "score_outputs", "summarize",
]
