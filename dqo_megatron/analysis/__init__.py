"""Analyses of trained checkpoints: the value network against synthetic process scores (value_analysis).

The library never imports typer; the command is `dqo-megatron value-analysis` (dqo_megatron/cli/analysis.py).
"""

from dqo_megatron.analysis.correlation import binned_means, correlation_summary, pearson, rankdata, spearman
from dqo_megatron.analysis.value_analysis import (
    RESULTS_FILE,
    StepSample,
    ValueAnalysisConfig,
    analyze_values,
    format_row,
    load_rows,
    prepare_samples,
    run_value_analysis,
)
from dqo_megatron.analysis.scores import SCORE_KINDS, parse_process_scores, resolve_score_kind, step_ends, step_scores

__all__ = [
    "RESULTS_FILE", "SCORE_KINDS", "StepSample", "ValueAnalysisConfig", "analyze_values", "binned_means",
    "correlation_summary", "format_row", "load_rows", "parse_process_scores", "pearson", "prepare_samples", "rankdata", "resolve_score_kind",
    "run_value_analysis", "spearman", "step_ends", "step_scores",
]  # fmt: skip
