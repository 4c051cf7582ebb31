"""Value analysis: how well a trained value network's per-step values track synthetic process scores.

The DQO paper (Ji et al. 2024, Figure 2) compares the learned ``V`` with the synthetic process scores of
section 4.4 on held-out responses. Here, for every checkpoint given and every step of every held-out
record that has steps (``process_scores`` or ``process_rewards``, depending on the score):

* the record is tokenized exactly as `dqo-megatron preprocess` does (`tokenize_records`: chat
  template, ``prompt_ids + response_ids + [eos]``) and each step's end offset is mapped to the response
  token holding the step's last character (`step_token_indices`, the token preprocessing puts the
  step's process reward on);
* the **value of a step** is ``V`` read at that token: the value of the state made of the prompt and the
  response up to and including the step's last token, i.e. of the prefix the process score judges;
* the **score of a step** (`ValueAnalysisConfig.score`, defined in `scores.py`): by default, for records
  scored by `dqo-megatron process-scores` (field ``process_scores``), the fraction of the M completions
  sampled from the prefix ending with this step that reached a correct answer (``prefix_success``; or
  ``prefix_solvable``: 1 when any did, the paper's rule); for records that only carry per-step
  ``process_rewards``, the step's reward (``process_reward``) or the reward collected after it
  (``return_to_go``).

Per checkpoint it writes one JSON line (Pearson and Spearman correlation of values and scores over all
steps, counts, binned means) to ``<out_dir>/value_analysis.jsonl`` and one PNG
``<out_dir>/value_<label>.png`` (see `plot.py`); optionally the pairs themselves. With
`initial_value` it also correlates ``V(s0)`` (read at the last prompt token) with each prompt's mean
outcome reward over its held-out responses. Runs in one process at TP=PP=1 (see `value_model.py`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import numpy as np

from dqo_megatron.analysis.correlation import binned_means, correlation_summary
from dqo_megatron.analysis.scores import SCORE_KINDS, ScoreKind, resolve_score_kind, step_ends, step_scores
from dqo_megatron.config import ConfigError
from dqo_megatron.data.records import RecordError, SkipCounter, TrajectoryRecord, read_records, write_jsonl
from dqo_megatron.data.tokenize import TokenizeConfig, Tokenizer, step_token_indices, tokenize_records

logger = logging.getLogger(__name__)

RESULTS_FILE = "value_analysis.jsonl"
"""One JSON line per checkpoint, in `out_dir`."""
_CHUNK = 256
SCORE_LABELS = {"prefix_success": "fraction of correct completions from the prefix",
                "prefix_solvable": "prefix solvable (1/0)", "process_reward": "process reward of the step",
                "return_to_go": "reward after the step (return to go)"}  # fmt: skip


@dataclass
class ValueAnalysisConfig:
    """What to analyse and where to write it."""

    checkpoints: list[str] = field(default_factory=list)
    """Training checkpoints (``run_dir/checkpoints/step_N``), run directories or checkpoint roots (all
    their complete checkpoints), or value conversion checkpoints (``convert hf-to-megatron --value``)."""
    records: list[str] = field(default_factory=list)
    """Held-out record files (JSONL / Parquet / datasets dirs, globs allowed) with `process_rewards`."""
    tokenize: Optional[TokenizeConfig] = None
    """The tokenizer and length policy, as given to `dqo-megatron preprocess` for the run's data (the
    same tokenizer, chat template and EOS, or the values are read at the wrong tokens)."""
    out_dir: str = ""
    """Output directory (created): value_analysis.jsonl, value_<label>.png, pairs_<label>.jsonl."""
    run_config: Optional[str] = None
    """The run's resolved config for training checkpoints (default: run_dir/config.yaml beside them)."""
    score: ScoreKind = "auto"
    """Which number a step's value is compared with: auto, prefix_success, prefix_solvable,
    process_reward or return_to_go (see `dqo_megatron.analysis.scores`)."""
    initial_value: bool = True
    """Also correlate V(s0) at the prompt's end with each prompt's mean outcome reward."""
    batch_size: int = 8
    """Sequences per forward pass."""
    max_records: Optional[int] = None
    """Read at most this many (valid) records, in file order; None: all."""
    skip_invalid: bool = False
    """Skip invalid or too long records and count them by reason, instead of stopping at the first."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Trunk dtype: auto = fp32 on CPU, bf16 on GPU (the head and the values are fp32)."""
    bins: int = 10
    """Quantile bins of the score for the binned statistics when it takes more than 12 distinct values."""
    plot: bool = True
    """Write the PNG per checkpoint (needs matplotlib)."""
    write_pairs: bool = False
    """Also write pairs_<label>.jsonl: file, line, step, token position, value and score of every step."""

    def __post_init__(self) -> None:
        for name in ("checkpoints", "records"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if not self.checkpoints:
            raise ConfigError("checkpoints is empty: give at least one training or value checkpoint")
        if not self.records:
            raise ConfigError("records is empty: give the held-out record files with process_rewards")
        if isinstance(self.tokenize, dict):
            self.tokenize = TokenizeConfig(**self.tokenize)
        if self.tokenize is None:
            raise ConfigError("tokenize is missing: give at least tokenize.tokenizer.path (the run's tokenizer)")
        if not self.out_dir:
            raise ConfigError("out_dir is empty: give where to write the results")
        if self.score not in SCORE_KINDS:
            raise ConfigError(f"score={self.score!r}: choose one of {', '.join(SCORE_KINDS)}")
        if self.dtype not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"dtype={self.dtype!r}: choose auto, fp32, bf16 or fp16")
        for name in ("batch_size", "bins"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: must be an integer >= 1")
        if self.max_records is not None and (not isinstance(self.max_records, int) or self.max_records < 1):
            raise ConfigError(f"max_records={self.max_records!r}: must be an integer >= 1 (or None for all)")


@dataclass
class StepSample:
    """One held-out record, tokenized, with the positions and scores of its steps."""

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
    """int64 ``[n_steps]``: each step's index in the record's `process_rewards` (kept steps only)."""
    prompt_id: str
    outcome: Optional[float]
    """The record's outcome reward (None when the record has none)."""
    file: str = ""
    line: int = 0


def prepare_samples(records: Iterable[TrajectoryRecord], tok: Tokenizer, cfg: TokenizeConfig, score: str,
                    skips: SkipCounter, skip_invalid: bool, counts: Counter) -> list[StepSample]:  # fmt: skip
    """Tokenize records as preprocessing does and locate their steps' tokens.

    Records without steps (for `score`) are kept with none: their prompt value still counts for the
    V(s0) analysis. Steps map to tokens as in preprocessing: a step before any token start (text the
    tokenizer drops) goes to the first response token; a step that maps to EOS (a response without
    text tokens) has no non-terminal state and is dropped (``counts["terminal_steps"]``).

    Args:
        records: validated records.
        tok, cfg: the tokenizer and length policy (`TokenizeConfig`).
        score: a resolved score kind (`dqo_megatron.analysis.scores`, not auto).
        skips: counts records rejected (too_long, bad_process_scores, ...) when `skip_invalid`.
        skip_invalid: count instead of raising the first `RecordError`.
        counts: filled with ``records``, ``records_with_steps``, ``steps``, ``terminal_steps``.
    """
    samples: list[StepSample] = []
    chunk: list[TrajectoryRecord] = []

    def flush() -> None:
        ends: list = []
        for rec in chunk:
            try:
                ends.append(step_ends(rec, score))
            except RecordError as err:
                ends.append(err)
        # behavior log-probs play no part here: never reject a record over their length or tokenizer
        results = tokenize_records(tok, [replace(r, behavior_logprobs=None) for r in chunk], cfg)
        results = [e if isinstance(e, RecordError) else t for e, t in zip(ends, results)]
        want = [i for i, (e, t) in enumerate(zip(ends, results)) if not isinstance(t, RecordError) and e]
        ids, starts = tok.encode_responses([chunk[i].response for i in want], [True] * len(want))
        located = dict(zip(want, zip(ids, starts)))
        for i, (rec, sample) in enumerate(zip(chunk, results)):
            try:
                if isinstance(sample, RecordError):
                    raise sample
                samples.append(_locate(rec, sample, ends[i], located.get(i), score, counts))
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


def _locate(rec: TrajectoryRecord, sample, ends: list[int], response: Optional[tuple[list[int], list[int]]],
            score: str, counts: Counter) -> StepSample:  # fmt: skip
    """The StepSample of one tokenized record: its steps' token positions and scores."""
    P = sample.prompt_length
    positions, scores, kept = np.zeros(0, np.int64), np.zeros(0, np.float64), np.zeros(0, np.int64)
    if ends:
        r_ids, r_starts = response
        if list(sample.tokens[P:-1]) != list(r_ids):  # cannot happen unless tokenization changed
            raise RuntimeError(f"{rec.file}:{rec.line}: the response tokens differ between tokenize_records "
                               "and encode_responses")  # fmt: skip
        index = step_token_indices(r_starts, ends)
        all_scores = step_scores(rec, score, index)
        keep = np.array([k < len(r_ids) for k in index], dtype=bool)
        counts["terminal_steps"] += int((~keep).sum())
        positions = P + np.asarray(index, dtype=np.int64)[keep]
        scores, kept = all_scores[keep], np.flatnonzero(keep)
        if keep.any():
            counts["records_with_steps"] += 1
            counts["steps"] += int(keep.sum())
    counts["records"] += 1
    return StepSample(tokens=sample.tokens, prompt_length=P, positions=positions, scores=scores, step_index=kept,
                      prompt_id=rec.prompt_id, outcome=rec.reward, file=rec.file, line=rec.line)  # fmt: skip


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


def analyze_values(samples: list[StepSample], values: list[np.ndarray], bins: int = 10,
                   initial_value: bool = True) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:  # fmt: skip
    """Pair per-step values with scores and summarize.

    Args:
        samples: from `prepare_samples`.
        values: per sample, float ``[>= T_i]`` or, for samples without steps, at least ``[P_i]``:
            ``values[i][t] = V(tokens[0..t])``.
        bins: see `binned_means`.
        initial_value: add the V(s0) vs mean-outcome-per-prompt block.
    Returns:
        ``(stats, step_values [n], step_scores [n])``; `stats` holds ``steps`` (`correlation_summary` of
        values vs scores), ``value`` / ``score`` (mean, std), ``bins`` and ``initial`` (or None).
    """
    step_values = np.concatenate([v[s.positions] for s, v in zip(samples, values)] or [np.zeros(0)])
    step_scores_ = np.concatenate([s.scores for s in samples] or [np.zeros(0)])
    stats: dict[str, Any] = {
        "steps": correlation_summary(step_values, step_scores_),
        "value": _summary_stats(step_values),
        "score": _summary_stats(step_scores_),
        "bins": binned_means(step_scores_, step_values, bins=bins),
        "initial": None,
    }
    if initial_value:
        per_prompt: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s, v in zip(samples, values):
            if s.outcome is not None:
                per_prompt[s.prompt_id].append((float(v[s.prompt_length - 1]), s.outcome))
        v0 = np.array([np.mean([a for a, _ in pairs]) for pairs in per_prompt.values()], dtype=np.float64)
        success = np.array([np.mean([b for _, b in pairs]) for pairs in per_prompt.values()], dtype=np.float64)
        stats["initial"] = {**correlation_summary(v0, success), "prompts": int(v0.size),
                            "responses": int(sum(len(p) for p in per_prompt.values())),
                            "value": _summary_stats(v0), "mean_outcome": _summary_stats(success)}  # fmt: skip
    return stats, step_values, step_scores_


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def _write_pairs(path: Path, samples: list[StepSample], step_values: np.ndarray) -> None:
    rows, at = [], 0
    for s in samples:
        for j, pos, score in zip(s.step_index, s.positions, s.scores):
            rows.append({"file": s.file, "line": s.line, "prompt_id": s.prompt_id, "step": int(j),
                         "position": int(pos), "value": float(step_values[at]), "score": float(score)})  # fmt: skip
            at += 1
    write_jsonl(rows, path)


def run_value_analysis(cfg: ValueAnalysisConfig) -> list[dict[str, Any]]:
    """Analyse every checkpoint of `cfg` on its held-out records; write the JSONL rows and PNGs.

    Single process (TP=PP=1), CPU or one GPU. Returns the rows as written (one per checkpoint, in
    order). Raises ConfigError / RecordError / CheckpointError naming the file, line or field at fault.
    """
    from dqo_megatron.analysis.value_model import load_value_model, resolve_checkpoints, sequence_values
    from dqo_megatron.conversion.megatron_io import single_process_layout

    out_dir = Path(cfg.out_dir)
    checkpoints = resolve_checkpoints(cfg.checkpoints, cfg.run_config)
    skips, counts = SkipCounter(), Counter()
    tok = Tokenizer(cfg.tokenize.tokenizer)
    records = read_held_out(cfg, skips)
    score = resolve_score_kind(cfg.score, records)
    samples = prepare_samples(records, tok, cfg.tokenize, score, skips, cfg.skip_invalid, counts)
    if counts["steps"] == 0:
        source = "process_scores" if score in ("prefix_success", "prefix_solvable") else "process_rewards"
        raise ConfigError(f"no step to analyse: none of the {counts['records']} usable records of {cfg.records} has "
                          f"{source} (score {score}; write them with `dqo-megatron process-scores`)")  # fmt: skip
    logger.info("value analysis: %d records (%d with steps), %d steps, %d skipped", counts["records"],
                counts["records_with_steps"], counts["steps"], skips.total)  # fmt: skip
    # samples without steps only need their prompt (for V(s0))
    sequences = [s.tokens if s.positions.size else s.tokens[: s.prompt_length] for s in samples]
    if not cfg.initial_value:
        sequences = [seq for seq, s in zip(sequences, samples) if s.positions.size]
        samples = [s for s in samples if s.positions.size]
    top = max(int(seq.max()) for seq in sequences)
    longest = max(len(seq) for seq in sequences)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for ckpt in checkpoints:  # before any work
        if top >= ckpt.model.vocab_size:
            raise ConfigError(f"{ckpt.path}: token id {top} from tokenizer {tok.name!r} is outside the model's "
                              f"vocabulary ({ckpt.model.vocab_size}): wrong tokenizer for this checkpoint?")  # fmt: skip
        if longest > ckpt.model.seq_length:
            logger.warning("%s: the longest record has %d tokens, more than model.seq_length %d",
                           ckpt.path, longest, ckpt.model.seq_length)  # fmt: skip
    with single_process_layout():
        for ckpt in checkpoints:
            start = time.perf_counter()
            model = load_value_model(ckpt, cfg.dtype)
            values = sequence_values(model, sequences, cfg.batch_size)
            del model
            stats, step_values, step_scores_ = analyze_values(samples, values, cfg.bins, cfg.initial_value)
            row: dict[str, Any] = {
                "checkpoint": str(ckpt.path.absolute()), "label": ckpt.label, "kind": ckpt.kind, "step": ckpt.step,
                "value_mode": ckpt.value_mode, "score": score, "tokenizer": tok.name, "records_files": cfg.records,
                "records": counts["records"], "records_with_steps": counts["records_with_steps"],
                "terminal_steps_dropped": counts["terminal_steps"], "skipped": dict(skips.counts),
                "n": stats["steps"]["n"], "pearson": stats["steps"]["pearson"],
                "spearman": stats["steps"]["spearman"], "undefined_reason": stats["steps"]["reason"],
                "value_stats": stats["value"], "score_stats": stats["score"], "bins": stats["bins"],
                "initial": stats["initial"], "plot": None, "pairs": None,
            }  # fmt: skip
            if cfg.plot:
                from dqo_megatron.analysis.plot import plot_values_vs_scores

                score_label = SCORE_LABELS[score]
                row["plot"] = str(plot_values_vs_scores(step_values, step_scores_, stats["bins"],
                                                        out_dir / f"value_{ckpt.label}.png", title=ckpt.label,
                                                        stats=stats["steps"], score_label=score_label))  # fmt: skip
            if cfg.write_pairs:
                row["pairs"] = str(out_dir / f"pairs_{ckpt.label}.jsonl")
                _write_pairs(Path(row["pairs"]), samples, step_values)
            row["seconds"] = round(time.perf_counter() - start, 3)
            rows.append(_json_safe(row))
            write_jsonl(rows, out_dir / RESULTS_FILE)  # rewritten after each checkpoint: progress survives
            logger.info("%s: Pearson %s, Spearman %s over %d steps (%.1f s)", ckpt.label, row["pearson"],
                        row["spearman"], row["n"], row["seconds"])  # fmt: skip
    return rows


def format_row(row: dict[str, Any]) -> str:
    """One line for the console: label, correlations, counts, plot."""

    def f(x: Optional[float]) -> str:
        return "n/a" if x is None else f"{x:+.4f}"

    text = f"{row['label']}: Pearson {f(row['pearson'])}  Spearman {f(row['spearman'])}  steps {row['n']}"
    if row.get("undefined_reason"):
        text += f" ({row['undefined_reason']})"
    if row.get("initial"):
        init = row["initial"]
        text += f"  | V(s0) vs prompt success: Pearson {f(init['pearson'])} over {init['prompts']} prompts"
    return text + (f"  -> {row['plot']}" if row.get("plot") else "")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a value_analysis.jsonl file (for comparing checkpoints)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
