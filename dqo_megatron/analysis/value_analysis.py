"""Value analysis: does a trained value network know where an answer is won or lost?

The DQO paper (Ji et al. 2024, Figure 2) compares the learned ``V`` with synthetic process scores (its
section 4.4) on held-out responses. For every checkpoint given:

* every held-out record with a known outcome is tokenized exactly as `dqo-megatron preprocess` does
  (`tokenize_records`: chat template, ``prompt_ids + response_ids + [eos]``) and each step's end offset
  is mapped to the response token holding the step's last character (`step_token_indices`, the token
  preprocessing puts the step's process reward on);
* ``V(after step j)`` is V read at that token: the value of the prompt plus the response through step
  j, the prefix the process score judges; ``V(s0)`` is V at the last prompt token;
* **all answers** enter: correct responses (every prefix solvable) as well as failed ones (see
  `scores.py` for the steps and scores of each kind of record);
* what is measured depends on what the checkpoint's algorithm trains (`VALUE_TARGETS`, from the run's
  resolved config):

  - **token-level** values (``dqo``; also value conversion checkpoints): Pearson and Spearman
    correlation of ``V(after step j)`` with the step's score over all steps of all answers; the value
    **drop at the first unsolvable step** against the drop at steps that stay solvable (`drops.py`);
    ``V(s0)`` against each prompt's success rate (``initial``, optional);
  - **prompt-level** values (``dro``: its loss trains V only at the last prompt token, V(x)): no
    per-step number (V elsewhere was never trained, so a correlation there would measure nothing);
    ``V(x)`` against each prompt's empirical success rate over its held-out responses.

One JSON line per checkpoint goes to ``<out_dir>/value_analysis.jsonl`` (fields: `rows.py`), one PNG per
checkpoint, and, when several checkpoints of one run are given, a trend PNG per run (`plot.py`).
Runs in one process at TP=PP=1 (see `value_model.py`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from dqo_megatron.analysis.correlation import binned_means, correlation_summary
from dqo_megatron.analysis.drops import collect_drops, drop_summary, step_drops
from dqo_megatron.analysis.rows import (
    RESULTS_FILE,
    build_row,
    format_row,
    json_safe,
    load_rows,
    trend_file_names,
    trend_groups,
)
from dqo_megatron.analysis.scores import (
    PREFIX_KINDS,
    SCORE_KINDS,
    ScoreKind,
    SplitConfig,
    StepPlan,
    plan_steps,
    resolve_score_kind,
    resolve_split,
    step_scores,
)
from dqo_megatron.config import ConfigError
from dqo_megatron.config.dtypes import canonical_dtype
from dqo_megatron.data.records import RecordError, SkipCounter, TrajectoryRecord, read_records, write_jsonl
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, step_token_indices, tokenize_records
from dqo_megatron.outputs import check_apart, refuse_existing

logger = logging.getLogger(__name__)

__all__ = [
    "RESULTS_FILE",
    "VALUE_TARGETS",
    "Analysis",
    "StepSample",
    "ValueAnalysisConfig",
    "analyze_values",
    "format_row",
    "load_rows",
    "prepare_samples",
    "run_value_analysis",
]

VALUE_TARGETS = {"dqo": "token", "dro": "prompt", None: "token"}
"""Where each algorithm trains V: token (every response state) or prompt (V(x) only). None: a value
conversion checkpoint, whose training is unknown, read as token-level."""
PROMPT_ONLY_REASON = "DRO trains V(x) only: V at the last prompt token, compared with prompt success in initial"
_CHUNK = 256


@dataclass
class ValueAnalysisConfig:
    """What to analyse and where to write it."""

    checkpoints: list[str] = field(default_factory=list)
    """Training checkpoints (``run_dir/checkpoints/step_N``), run directories or checkpoint roots (all
    their complete checkpoints), or value conversion checkpoints (``convert hf-to-megatron --value``)."""
    records: list[str] = field(default_factory=list)
    """Held-out record files (JSONL / Parquet / datasets dirs, globs allowed): all answers, failed ones
    with `process_scores` (or `process_rewards` for the reward score kinds)."""
    tokenize: Optional[TokenizeConfig] = None
    """The tokenizer and length policy, as given to `dqo-megatron preprocess` for the run's data (the
    same tokenizer, chat template and EOS, or the values are read at the wrong tokens)."""
    out_dir: str = ""
    """Output directory (created): value_analysis.jsonl, value_<label>.png, trend_<run>.png, pairs_<label>.jsonl."""
    run_config: Optional[str] = None
    """The run's resolved config for training checkpoints (default: run_dir/config.yaml beside them)."""
    score: ScoreKind = "auto"
    """Which number a step's value is compared with: auto, prefix_success, prefix_solvable,
    process_reward or return_to_go (see `dqo_megatron.analysis.scores`)."""
    splitter: Optional[str] = None
    """How correct responses without process_scores are cut into steps (auto, lines, paragraphs,
    step_markers, regex); None: the splitter the records' process_scores name, else auto."""
    split_pattern: Optional[str] = None
    """Boundary regex for splitter=regex (as given to process-scores)."""
    max_steps: Optional[int] = None
    """Cap on steps per correct response (as given to process-scores); None: no cap."""
    initial_value: bool = True
    """Token-level values: also correlate V(s0) with each prompt's success rate (always done for DRO)."""
    batch_size: int = 8
    """Sequences per forward pass (with pack_rows: packed rows per forward pass)."""
    pack_rows: Optional[int] = None
    """Pack the sequences into rows of this many tokens (raised to the longest sequence), first-fit
    decreasing with attention stopping at sequence boundaries, as `train.packing` does (docs/packing.md;
    local layer spec only: refused on Transformer Engine's); None: batches of similar length, right-padded."""
    max_records: Optional[int] = None
    """Read at most this many (valid) records, in file order; None: all."""
    skip_invalid: bool = False
    """Skip invalid or too long records and count them by reason, instead of stopping at the first."""
    dtype: str = "auto"
    """Trunk dtype: auto (fp32 on CPU, bf16 on GPU), fp32, bf16 or fp16; float32, bfloat16, float16 mean the
    same and are kept as the short name. The head and the values are fp32."""
    bins: int = 10
    """Quantile bins of the score for the binned statistics when it takes more than 12 distinct values."""
    plot: bool = True
    """Write the PNGs (needs matplotlib)."""
    write_pairs: bool = False
    """Also write pairs_<label>.jsonl (token-level checkpoints): value, score and drop of every step."""
    overwrite: bool = False
    """Replace the results of an earlier analysis in out_dir (value_analysis.jsonl); without it, an error."""

    def __post_init__(self) -> None:
        for name in ("checkpoints", "records"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.checkpoints:
            raise ConfigError("checkpoints is empty: give at least one training or value checkpoint")
        if not self.records:
            raise ConfigError("records is empty: give the held-out record files (with process_scores)")
        if isinstance(self.tokenize, dict):
            self.tokenize = TokenizeConfig(**self.tokenize)
        if self.tokenize is None:
            raise ConfigError("tokenize is missing: give at least tokenize.tokenizer.path (the run's tokenizer)")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: give where to write the results")
        if self.score not in SCORE_KINDS:
            raise ConfigError(f"score={self.score!r}: choose one of {', '.join(SCORE_KINDS)}")
        self.dtype = canonical_dtype(self.dtype, "dtype")
        for name in ("batch_size", "bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
        for name in ("max_records", "max_steps", "pack_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1 (or None for no limit)")


@dataclass
class StepSample:
    """One held-out record, tokenized, with the positions, scores and solvability of its steps."""

    tokens: np.ndarray
    """int64 ``[T]``: prompt ids + response ids + EOS, as preprocessing writes them."""
    prompt_length: int
    """``P``: tokens ``[0, P)`` are the prompt; ``V(s0)`` is read at ``P - 1``."""
    positions: np.ndarray
    """int64 ``[n_steps]``: absolute index of the token ending each step (``P + step token index``); the
    value there is V of the prefix through the step."""
    scores: np.ndarray
    """float64 ``[n_steps]``: each step's score (see `ValueAnalysisConfig.score`)."""
    step_index: np.ndarray
    """int64 ``[n_steps]``: each kept step's index in the record's step list (always 0..n_steps-1: only
    trailing steps that map to EOS are dropped)."""
    prompt_id: str
    success: Optional[float]
    """1.0 correct, 0.0 failed, None unknown (`scores.outcome_of`)."""
    n_solvable: int = 0
    """Leading kept steps that stay solvable (`StepPlan.n_solvable`)."""
    first_unsolvable: Optional[int] = None
    """Index of the first unsolvable step among the kept ones, or None."""
    sampler_miss: bool = False
    file: str = ""
    line: int = 0


@dataclass
class Analysis:
    """The numbers of one checkpoint: JSON blocks and the arrays the plots draw."""

    stats: dict[str, Any]
    """``per_step`` (`correlation_summary` or None), ``value`` / ``score`` (mean, std), ``bins``, ``drop``
    (`drops.drop_summary` or None), ``initial`` (V(s0) vs prompt success, or None)."""
    step_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    step_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    first_drops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    solvable_drops: np.ndarray = field(default_factory=lambda: np.zeros(0))
    prompt_values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """``[n_prompts]`` mean V(s0) per prompt."""
    prompt_success: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """``[n_prompts]`` the prompt's success rate over its held-out responses."""


def prepare_samples(
    records: Iterable[TrajectoryRecord],
    tok: Tokenizer,
    cfg: TokenizeConfig,
    score: str,
    skips: SkipCounter,
    skip_invalid: bool,
    counts: Counter,
    split: Optional[SplitConfig] = None,
) -> list[StepSample]:
    """Tokenize records as preprocessing does and locate their steps' tokens.

    Records a prefix score cannot score (no process_scores, no known outcome) are skipped and counted
    (``counts["unscored"]``). Records without steps (reward kinds) are kept with none: their prompt
    value still counts for V(s0). Steps map to tokens as in preprocessing: a step before any token start
    goes to the first response token; a step that maps to EOS (a response without text tokens) has no
    non-terminal state and is dropped (``counts["terminal_steps"]``).

    Args:
        records: validated records.
        tok, cfg: the tokenizer and length policy (`TokenizeConfig`).
        score: a resolved score kind (`dqo_megatron.analysis.scores`, not auto).
        skips: counts records rejected (too_long, bad_process_scores, ...) when `skip_invalid`.
        skip_invalid: count instead of raising the first `RecordError`.
        counts: filled with ``records``, ``correct``, ``failed``, ``records_with_steps``, ``steps``,
            ``terminal_steps``, ``unscored``.
        split: how correct responses without process_scores are cut (default: auto).
    """
    split = split or SplitConfig()
    samples: list[StepSample] = []
    chunk: list[TrajectoryRecord] = []

    def flush() -> None:
        plans: list = []
        for rec in chunk:
            try:
                plans.append(plan_steps(rec, score, split))
            except RecordError as err:
                plans.append(err)
        kept = [i for i, p in enumerate(plans) if p is not None]
        counts["unscored"] += len(chunk) - len(kept)
        recs, plans = [chunk[i] for i in kept], [plans[i] for i in kept]
        # behavior log-probs play no part here: never reject a record over their length or tokenizer
        results = tokenize_records(tok, [replace(r, behavior_logprobs=None) for r in recs], cfg)
        results = [p if isinstance(p, RecordError) else t for p, t in zip(plans, results)]
        want = [i for i, (p, t) in enumerate(zip(plans, results)) if not isinstance(t, RecordError) and p.ends]
        ids, starts = tok.encode_responses([recs[i].response for i in want], [True] * len(want))
        located = dict(zip(want, zip(ids, starts)))
        for i, (rec, sample) in enumerate(zip(recs, results)):
            try:
                if isinstance(sample, RecordError):
                    raise sample
                samples.append(_locate(rec, sample, plans[i], located.get(i), score, counts))
            except RecordError as err:
                if not skip_invalid:
                    raise
                skips.add(err)
        chunk.clear()

    for rec in records:
        chunk.append(rec)
        if len(chunk) >= _CHUNK:
            flush()
    if chunk:
        flush()
    return samples


def _locate(
    rec: TrajectoryRecord,
    sample,
    plan: StepPlan,
    response: Optional[tuple[list[int], list[int]]],
    score: str,
    counts: Counter,
) -> StepSample:
    """The StepSample of one tokenized record: its steps' token positions, scores and solvability."""
    P = sample.prompt_length
    positions, scores, kept = np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    n_kept = 0
    if plan.ends:
        r_ids, r_starts = response
        if list(sample.tokens[P : P + len(r_ids)]) != list(r_ids):  # cannot happen unless tokenization changed
            raise RuntimeError(
                f"{rec.file}:{rec.line}: the response tokens differ between tokenize_records and encode_responses"
            )
        index = step_token_indices(r_starts, plan.ends)
        all_scores = step_scores(rec, score, plan, index)
        keep = np.array([k < len(r_ids) for k in index], dtype=bool)  # False only for trailing steps
        n_kept = int(keep.sum())
        counts["terminal_steps"] += len(index) - n_kept
        positions = P + np.asarray(index, dtype=np.int64)[keep]
        scores, kept = all_scores[keep], np.flatnonzero(keep)
        if n_kept:
            counts["records_with_steps"] += 1
            counts["steps"] += n_kept
    counts["records"] += 1
    if plan.outcome is not None:
        counts["correct" if plan.outcome == 1.0 else "failed"] += 1
    first = plan.first_unsolvable if plan.first_unsolvable is not None and plan.first_unsolvable < n_kept else None
    return StepSample(
        tokens=sample.tokens,
        prompt_length=P,
        positions=positions,
        scores=scores,
        step_index=kept,
        prompt_id=rec.prompt_id,
        success=plan.outcome,
        n_solvable=min(plan.n_solvable, n_kept),
        first_unsolvable=first,
        sampler_miss=plan.sampler_miss,
        file=rec.file,
        line=rec.line,
    )


def read_held_out(cfg: ValueAnalysisConfig, skips: SkipCounter) -> list[TrajectoryRecord]:
    """The first `cfg.max_records` valid records of `cfg.records` (invalid ones raise or are counted)."""
    out = []
    for rec in read_records(cfg.records, skip_invalid=cfg.skip_invalid, skips=skips, require_reward=False):
        out.append(rec)
        if cfg.max_records is not None and len(out) >= cfg.max_records:
            break
    return out


def _summary_stats(x: np.ndarray) -> dict[str, Optional[float]]:
    return {"mean": float(x.mean()), "std": float(x.std())} if x.size else {"mean": None, "std": None}


def _initial(samples: list[StepSample], values: list[np.ndarray], out: Analysis) -> dict[str, Any]:
    """V(s0) (mean per prompt) against each prompt's success rate, over records with a known outcome."""
    per_prompt: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for s, v in zip(samples, values):
        if s.success is not None:
            per_prompt[s.prompt_id].append((float(v[s.prompt_length - 1]), s.success))
    out.prompt_values = np.array([np.mean([a for a, _ in p]) for p in per_prompt.values()], dtype=np.float64)
    out.prompt_success = np.array([np.mean([b for _, b in p]) for p in per_prompt.values()], dtype=np.float64)
    return {
        **correlation_summary(out.prompt_values, out.prompt_success),
        "prompts": int(out.prompt_values.size),
        "responses": int(sum(len(p) for p in per_prompt.values())),
        "value": _summary_stats(out.prompt_values),
        "success_rate": _summary_stats(out.prompt_success),
    }


def analyze_values(
    samples: list[StepSample],
    values: list[np.ndarray],
    bins: int = 10,
    initial_value: bool = True,
    per_step: bool = True,
    drops: bool = True,
) -> Analysis:
    """Pair per-step values with scores, measure the drops, and summarize.

    Args:
        samples: from `prepare_samples`.
        values: per sample, float ``[>= T_i]``, or at least ``[P_i]`` for samples without steps and when
            `per_step` is off: ``values[i][t] = V(tokens[0..t])``.
        bins: see `binned_means`.
        initial_value: add the V(s0) vs prompt success block.
        per_step: the per-step correlation (token-level values); off: ``per_step`` is None.
        drops: the drop at the first unsolvable step (needs `per_step` and a prefix score kind).
    """
    out = Analysis(stats={"per_step": None, "value": None, "score": None, "bins": None, "drop": None, "initial": None})
    if per_step:
        after = [v[s.positions] for s, v in zip(samples, values)]
        out.step_values = np.concatenate(after or [np.zeros(0)])
        out.step_scores = np.concatenate([s.scores for s in samples] or [np.zeros(0)])
        out.stats.update(
            per_step=correlation_summary(out.step_values, out.step_scores),
            value=_summary_stats(out.step_values),
            score=_summary_stats(out.step_scores),
            bins=binned_means(out.step_scores, out.step_values, bins=bins),
        )
        if drops:
            v0 = [float(v[s.prompt_length - 1]) for s, v in zip(samples, values)]
            out.first_drops, out.solvable_drops = collect_drops(
                v0, after, [s.n_solvable for s in samples], [s.first_unsolvable for s in samples]
            )
            failed = [s for s in samples if s.success == 0.0 and s.positions.size]
            out.stats["drop"] = drop_summary(
                out.first_drops,
                out.solvable_drops,
                failed_without_first_unsolvable=sum(s.first_unsolvable is None for s in failed),
                sampler_misses=sum(s.sampler_miss for s in failed),
            )
    if initial_value:
        out.stats["initial"] = _initial(samples, values, out)
    return out


def _write_pairs(path: Path, samples: list[StepSample], values: list[np.ndarray]) -> None:
    """One line per step: where it is, its value, score, drop and group (solvable / first_unsolvable / after)."""
    rows = []
    for s, v in zip(samples, values):
        d = step_drops(v[s.prompt_length - 1], v[s.positions]) if s.positions.size else []
        for j, pos, score, drop in zip(s.step_index, s.positions, s.scores, d):
            group = (
                "solvable"
                if j < s.n_solvable
                else "first_unsolvable"
                if j == s.first_unsolvable
                else "after_unsolvable"
                if s.first_unsolvable is not None and j > s.first_unsolvable
                else None
            )
            rows.append(
                {
                    "file": s.file,
                    "line": s.line,
                    "prompt_id": s.prompt_id,
                    "step": int(j),
                    "position": int(pos),
                    "value": float(v[pos]),
                    "score": float(score),
                    "drop": float(drop),
                    "group": group,
                    "correct": s.success,
                }
            )
    write_jsonl(rows, path)


def _value_target(ckpt) -> str:
    algorithm = ckpt.run.algorithm if ckpt.run is not None else None
    if algorithm not in VALUE_TARGETS:
        raise ConfigError(
            f"{ckpt.path}: algorithm={algorithm!r} has a value network but no value analysis is "
            f"defined for it (known: {', '.join(a for a in VALUE_TARGETS if a)})"
        )
    return VALUE_TARGETS[algorithm]


def _check_inputs(checkpoints, targets, samples, counts, score, cfg, tok) -> None:
    """Fail before loading any model: nothing to analyse, or token ids the checkpoints cannot embed."""
    if "token" in targets and counts["steps"] == 0:
        source = "process_scores or a known outcome" if score in PREFIX_KINDS else "process_rewards"
        raise ConfigError(
            f"no step to analyse: none of the {counts['records']} usable records of {cfg.records} has "
            f"{source} (score {score}; {counts['unscored']} unscored)"
        )
    if "prompt" in targets and not any(s.success is not None for s in samples):
        raise ConfigError(
            f"no record of {cfg.records} has a known outcome (correct or reward): V(x) of a DRO "
            "checkpoint is compared with each prompt's success rate"
        )
    top = max(int(s.tokens.max()) for s in samples)
    longest = max(len(s.tokens) for s in samples)
    for ckpt in checkpoints:
        if top >= ckpt.model.vocab_size:
            raise ConfigError(
                f"{ckpt.path}: token id {top} from tokenizer {tok.name!r} is outside the model's "
                f"vocabulary ({ckpt.model.vocab_size}): wrong tokenizer for this checkpoint?"
            )
        if longest > ckpt.model.seq_length:
            logger.warning(
                "%s: the longest record has %d tokens, more than model.seq_length %d",
                ckpt.path,
                longest,
                ckpt.model.seq_length,
            )


def _analyse_checkpoint(
    ckpt,
    target: str,
    samples: list[StepSample],
    cfg: ValueAnalysisConfig,
    score: str,
    meta: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Load one checkpoint, read its values, and return its row (plot and pairs written)."""
    from dqo_megatron.analysis.value_model import load_value_model, sequence_values

    start = time.perf_counter()
    token_level = target == "token"
    if token_level and not cfg.initial_value:
        samples = [s for s in samples if s.positions.size]
    # a prompt-level value is read at the prompt only; samples without steps only need their prompt (V(s0))
    sequences = [s.tokens if token_level and s.positions.size else s.tokens[: s.prompt_length] for s in samples]
    model = load_value_model(ckpt, cfg.dtype)
    row_length = None if cfg.pack_rows is None else max(cfg.pack_rows, max(len(s) for s in sequences))
    values = sequence_values(model, sequences, cfg.batch_size, row_length=row_length)
    del model
    analysis = analyze_values(
        samples,
        values,
        cfg.bins,
        initial_value=cfg.initial_value or not token_level,
        per_step=token_level,
        drops=token_level and score in PREFIX_KINDS,
    )
    row = build_row(ckpt, target, analysis.stats, meta, reason=None if token_level else PROMPT_ONLY_REASON)
    if token_level and score not in PREFIX_KINDS:
        row["drop"] = {"reason": f"score {score}: the drop needs solvability (prefix_success or prefix_solvable)"}
    if cfg.plot:
        from dqo_megatron.analysis.plot import plot_checkpoint

        row["plot"] = str(plot_checkpoint(analysis, row, out_dir / f"value_{ckpt.label}.png"))
    if cfg.write_pairs and token_level:
        row["pairs"] = str(out_dir / f"pairs_{ckpt.label}.jsonl")
        _write_pairs(Path(row["pairs"]), samples, values)
    row["seconds"] = round(time.perf_counter() - start, 3)
    return json_safe(row)


def run_value_analysis(cfg: ValueAnalysisConfig) -> list[dict[str, Any]]:
    """Analyse every checkpoint of `cfg` on its held-out records; write the JSONL rows and PNGs.

    Single process (TP=PP=1), CPU or one GPU. Returns the rows as written (one per checkpoint, in
    order). Raises ConfigError / RecordError / CheckpointError naming the file, line or field at fault.
    """
    from dqo_megatron.analysis.value_model import resolve_checkpoints
    from dqo_megatron.conversion.megatron_io import single_process_layout

    out_dir = Path(cfg.out_dir)
    refuse_existing([out_dir / RESULTS_FILE], cfg.overwrite, f"an earlier analysis in {out_dir}")
    checkpoints = resolve_checkpoints(cfg.checkpoints, cfg.run_config)
    check_apart([out_dir], [c.path for c in checkpoints] + list(cfg.records))  # run_dir/analysis is fine
    targets = [_value_target(c) for c in checkpoints]  # before any work
    skips, counts = SkipCounter(), Counter()
    tok = Tokenizer(cfg.tokenize.tokenizer)
    records = read_held_out(cfg, skips)
    score = resolve_score_kind(cfg.score, records)
    split = resolve_split(SplitConfig(split_pattern=cfg.split_pattern, max_steps=cfg.max_steps), cfg.splitter, records)
    samples = prepare_samples(records, tok, cfg.tokenize, score, skips, cfg.skip_invalid, counts, split)
    if not samples:
        raise ConfigError(
            f"no usable record in {cfg.records} ({counts['unscored']} without process_scores or a "
            f"known outcome, {skips.total} invalid)"
        )
    _check_inputs(checkpoints, targets, samples, counts, score, cfg, tok)
    logger.info(
        "value analysis: %d records (%d correct, %d failed, %d with steps), %d steps; %d unscored, %d skipped",
        counts["records"],
        counts["correct"],
        counts["failed"],
        counts["records_with_steps"],
        counts["steps"],
        counts["unscored"],
        skips.total,
    )
    meta = {
        "score": score,
        "splitter": split.splitter if score in PREFIX_KINDS else None,
        "tokenizer": tok.name,
        "records_files": cfg.records,
        "records": counts["records"],
        "correct_records": counts["correct"],
        "failed_records": counts["failed"],
        "records_with_steps": counts["records_with_steps"],
        "unscored_records": counts["unscored"],
        "terminal_steps_dropped": counts["terminal_steps"],
        "skipped": dict(skips.counts),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    with single_process_layout():
        for ckpt, target in zip(checkpoints, targets):
            rows.append(_analyse_checkpoint(ckpt, target, samples, cfg, score, meta, out_dir))
            write_jsonl(rows, out_dir / RESULTS_FILE)  # rewritten after each checkpoint: progress survives
            logger.info("%s (%.1f s)", format_row(rows[-1]), rows[-1]["seconds"])
    if cfg.plot:
        from dqo_megatron.analysis.plot import plot_trend

        groups = trend_groups(rows)
        names = trend_file_names(list(groups))
        for run, group in groups.items():
            path = plot_trend(group, out_dir / names[run])
            for row in group:
                row["trend_plot"] = str(path)
        write_jsonl(rows, out_dir / RESULTS_FILE)
    return rows
