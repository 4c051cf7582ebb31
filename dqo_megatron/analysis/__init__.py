"""Analyses of trained checkpoints: the value network against synthetic process scores (value_analysis).

The library never imports typer; the command is `dqo-megatron value-analysis` (dqo_megatron/cli/analysis.py).
"""

from dqo_megatron.analysis.correlation import binned_means, correlation_summary, pearson, rankdata, spearman
from dqo_megatron.analysis.drops import collect_drops, drop_summary, step_drops
from dqo_megatron.analysis.rows import RESULTS_FILE, format_row, load_rows
from dqo_megatron.analysis.scores import (
    SCORE_KINDS,
    SplitConfig,
    StepPlan,
    outcome_of,
    parse_process_scores,
    plan_steps,
    resolve_score_kind,
    step_scores,
)
from dqo_megatron.analysis.value_analysis import (
    VALUE_TARGETS,
    Analysis,
    StepSample,
    ValueAnalysisConfig,
    analyze_values,
    prepare_samples,
    run_value_analysis,
)

__all__ = [
    "RESULTS_FILE",
    "SCORE_KINDS",
    "VALUE_TARGETS",
    "Analysis",
    "SplitConfig",
    "StepPlan",
    "StepSample",
    "ValueAnalysisConfig",
    "analyze_values",
    "binned_means",
    "collect_drops",
    "correlation_summary",
    "drop_summary",
    "format_row",
    "load_rows",
    "outcome_of",
    "parse_process_scores",
    "pearson",
    "plan_steps",
    "prepare_samples",
    "rankdata",
    "resolve_score_kind",
    "run_value_analysis",
    "spearman",
    "step_drops",
    "step_scores",
]
