"""Synthetic process scores (the paper's section 4.4): step rewards for failed responses by Monte-Carlo
completion from each step prefix (`dqo-megatron process-scores`).

  steps    split a response into reasoning steps (character offsets)
  rewards  from prefix solvability to step rewards (every_correct, last_correct, value)
  cache    completions on disk keyed by what determines them; per-prefix seeds (also used by eval)
  config   ProcessScoresConfig, ProcessScoresSummary
  scores   process_scores(cfg, backend): plan, generate (cached), grade, write the records

Beside `rollout` in the layer stack: it generates through a rollout backend and grades with `tasks`.
"""

from dqo_megatron.process_scores.cache import CompletionCache, cache_key, prefix_seed
from dqo_megatron.process_scores.config import ProcessScoresConfig, ProcessScoresSummary
from dqo_megatron.process_scores.rewards import ASSIGN_MODES, assign_process_rewards
from dqo_megatron.process_scores.scores import AnswerMemo, check_outputs, is_failed, process_scores
from dqo_megatron.process_scores.steps import SPLITTERS, cap_steps, compile_pattern, split_steps, step_texts

__all__ = [
    "CompletionCache",
    "cache_key",
    "prefix_seed",
    "ProcessScoresConfig",
    "ProcessScoresSummary",
    "ASSIGN_MODES",
    "assign_process_rewards",
    "AnswerMemo",
    "check_outputs",
    "is_failed",
    "process_scores",
    "SPLITTERS",
    "cap_steps",
    "compile_pattern",
    "split_steps",
    "step_texts",
]
