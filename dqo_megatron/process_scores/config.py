"""What a process-scores run does (`ProcessScoresConfig`) and what it did (`ProcessScoresSummary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.records import SkipCounter
from dqo_megatron.process_scores.rewards import ASSIGN_MODES
from dqo_megatron.process_scores.steps import SPLITTERS, compile_pattern
from dqo_megatron.rollout.backend import SamplingParams
from dqo_megatron.tasks.prompts import TASKS


@dataclass
class ProcessScoresConfig:
    """Inputs, output, splitting, sampling and reward assignment of a process-scores run."""

    inputs: list[str] = field(default_factory=list)
    """Labeled rollout record files (.jsonl/.parquet/datasets directory, globs allowed); failed records need
    `reference_answer` and `task` (or `task` below)."""
    output: str = ""
    """Output JSON Lines file (written atomically, records in input order)."""
    model_id: str = ""
    """Names the generating model in the cache key (its path or name), so completions of another model are
    never reused."""
    num_completions: int = 20
    """M: completions sampled from each step prefix (the paper: 20)."""
    splitter: Literal["auto", "lines", "paragraphs", "step_markers", "regex"] = "auto"
    """How responses are cut into steps (see dqo_megatron.process_scores.steps)."""
    split_pattern: str | None = None
    """Boundary regex for splitter="regex": a step ends where a match ends."""
    max_steps: int | None = None
    """Merge neighbouring steps so that a response has at most this many (caps the cost); None: no cap."""
    assign: Literal["last_correct", "every_correct", "value"] = "every_correct"
    """From solvable prefixes to step rewards (`dqo_megatron.process_scores.scores` describes the modes)."""
    step_reward: float = 0.1
    """r: the process reward of one step (outcome rewards are 1 / 0). Our notes on the paper give no value;
    0.1 keeps K x r < 1 for responses of up to ~9 steps, so no failed response outscores a correct one."""
    temperature: float = 1.0
    """Completion sampling temperature (our notes on the paper give none; 1.0 = the model's distribution)."""
    top_p: float = 0.9
    """Nucleus sampling of the completions (the paper: 0.9)."""
    top_k: int = 16
    """Top-k of the completions (the paper: 16)."""
    max_new_tokens: int = 512
    """Longest completion in tokens; a completion cut here rarely holds an answer and counts as wrong."""
    seed: int = 1234
    """Base seed; each prefix's seed derives from it, the prompt and the prefix."""
    prefixes_per_call: int = 16
    """Prefixes per backend call (each gives M completions); the backend splits its rows into its own batches."""
    task: Literal["auto", "gsm8k", "math"] = "auto"
    """Answer format; auto: each record's `task` field."""
    timeout_s: float = 5.0
    """MATH: seconds per answer comparison (a timeout counts as wrong)."""
    cache: str | None = None
    """Completion cache (JSON Lines); None: `<output>.cache.jsonl`; "" disables caching."""
    replace_rewards: bool = False
    """Replace the process rewards a failed record already has (otherwise such a record is an error)."""
    overwrite: bool = False
    """Replace an existing output file (only once the new one is complete); without it, an error."""
    skip_invalid: bool = False
    """Skip invalid records (counted by reason; they are not written) instead of stopping at the first."""
    dry_run: bool = False
    """Plan and state the cost, generate nothing, write nothing."""
    progress: bool = True
    """Progress bar on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs:
            raise ConfigError("inputs: process-scores needs at least one record file")
        if not self.output and not self.dry_run:
            raise ConfigError("output: process-scores needs an output path")
        if not isinstance(self.num_completions, int) or self.num_completions < 1:
            raise ConfigError(f"num_completions={self.num_completions!r}: must be an integer >= 1")
        if self.splitter not in SPLITTERS:
            raise ConfigError(f"splitter={self.splitter!r}: choose one of {list(SPLITTERS)}")
        if self.splitter == "regex":
            if not self.split_pattern:
                raise ConfigError("split_pattern: splitter='regex' needs a pattern")
            try:
                compile_pattern(self.split_pattern)
            except ValueError as exc:
                raise ConfigError(f"split_pattern: {exc}") from None
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 2):
            raise ConfigError(f"max_steps={self.max_steps!r}: must be an integer >= 2 (or None)")
        if self.assign not in ASSIGN_MODES:
            raise ConfigError(f"assign={self.assign!r}: choose one of {list(ASSIGN_MODES)}")
        if not (isinstance(self.step_reward, (int, float)) and self.step_reward > 0):
            raise ConfigError(f"step_reward={self.step_reward!r}: must be a number > 0")
        if self.task not in ("auto",) + TASKS:
            raise ConfigError(f"task={self.task!r}: choose auto, gsm8k or math")
        if not isinstance(self.prefixes_per_call, int) or self.prefixes_per_call < 1:
            raise ConfigError(f"prefixes_per_call={self.prefixes_per_call!r}: must be an integer >= 1")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s}: must be > 0")
        try:
            self.sampling_params()
        except ValueError as exc:
            raise ConfigError(f"sampling (temperature/top_p/top_k/max_new_tokens): {exc}") from None
        if self.temperature == 0 and self.num_completions > 1:
            raise ConfigError("temperature=0 (greedy) gives one completion per prefix: set num_completions=1")

    def sampling_params(self) -> SamplingParams:
        """The backend's SamplingParams for the completions (n = num_completions)."""
        return SamplingParams(
            n=self.num_completions,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_new_tokens=self.max_new_tokens,
        )

    @property
    def cache_path(self) -> str | None:
        """The cache file in use, or None when caching is off."""
        if self.cache == "":
            return None
        return self.cache if self.cache is not None else self.output + ".cache.jsonl"


@dataclass
class ProcessScoresSummary:
    """What a process-scores run did."""

    records: int = 0
    """Records read (valid ones)."""
    failed: int = 0
    """Failed responses (the ones scored)."""
    prefixes: int = 0
    """Step prefixes of the failed responses (each needs M completions)."""
    unique_prefixes: int = 0
    """Distinct (prompt, prefix) pairs among them."""
    cached_prefixes: int = 0
    """Distinct prefixes whose completions were already in the cache."""
    completions_total: int = 0
    """unique_prefixes x M."""
    completions_generated: int = 0
    """Completions generated by this run."""
    solvable_prefixes: int = 0
    """Distinct prefixes with at least one correct completion."""
    answer_checks: int = 0
    """Answer comparisons run (distinct final answers per reference; see AnswerMemo)."""
    rewarded_records: int = 0
    """Failed records that got at least one non-zero process reward."""
    seconds: float = 0.0
    skips: SkipCounter = field(default_factory=SkipCounter)

    def plan(self, m: int) -> str:
        """The cost statement printed before generation."""
        return (
            f"process-scores: {self.records} records, {self.failed} failed -> {self.prefixes} step prefixes "
            f"({self.unique_prefixes} distinct, {self.cached_prefixes} cached) x M={m}: "
            f"{(self.unique_prefixes - self.cached_prefixes) * m} completions to generate "
            f"(of {self.completions_total})"
        )

    def report(self) -> str:
        """Human-readable summary."""
        rate = self.completions_generated / self.seconds if self.seconds > 0 else 0.0
        return (
            f"records {self.records}, failed {self.failed}, prefixes {self.prefixes} ({self.unique_prefixes} distinct, "
            f"{self.solvable_prefixes} solvable), completions generated {self.completions_generated} "
            f"({rate:.1f}/s), answer checks {self.answer_checks}, cached prefixes {self.cached_prefixes}, "
            f"records with process rewards "
            f"{self.rewarded_records}, {self.seconds:.1f} s\n{self.skips.report()}"
        )
