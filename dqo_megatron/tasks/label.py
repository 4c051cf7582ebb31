"""Label rollouts: set `reward` (1.0 / 0.0) and `correct` on records by checking their final answers.

Used by `dqo-megatron label` after sampling. Each input record keeps all its fields; labeling adds or
replaces `reward`, `correct`, `extracted_answer` and `label_reason`. Worker processes check answers
in their main thread, where math_verify's deadline works (see math_equiv).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from dqo_megatron.config.loader import ConfigError
from dqo_megatron.data.hf_sources import local_inputs
from dqo_megatron.data.records import RecordError, SkipCounter, expand_inputs, iter_raw, parse_record
from dqo_megatron.outputs import staged_file
from dqo_megatron.processes import dies_with_this_process
from dqo_megatron.tasks.grading import check_answer
from dqo_megatron.tasks.prompts import TASKS


@dataclass
class LabelConfig:
    """Inputs, output and checking of a labeling run."""

    inputs: list[str] = field(default_factory=list)
    """Record files (.jsonl/.parquet/datasets directory, globs allowed); each needs `reference_answer`."""
    output: str = ""
    """Output JSON Lines file (written beside it, renamed when complete)."""
    task: Literal["auto", "gsm8k", "math"] = "auto"
    """Answer format; auto: each record's `task` field."""
    timeout_s: float = 5.0
    """MATH: seconds per comparison; a timeout counts as wrong (reason `timeout`)."""
    workers: int = 1
    """Checking processes."""
    skip_invalid: bool = False
    """Skip invalid records and count them by reason instead of stopping at the first."""
    overwrite: bool = False
    """Replace an existing output file (only once the new one is complete); without it, an error."""
    progress: bool = True
    """Progress bar on stderr."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if not self.inputs or not self.output:
            raise ConfigError("label needs inputs and an output path")
        if self.task not in ("auto",) + TASKS:
            raise ConfigError(f"task={self.task!r}: choose auto, gsm8k or math")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s={self.timeout_s}: must be > 0")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ConfigError(f"workers={self.workers!r}: must be an integer >= 1")


@dataclass
class LabelSummary:
    """Counts of a labeling run."""

    read: int = 0
    written: int = 0
    verdicts: Counter = field(default_factory=Counter)
    skips: SkipCounter = field(default_factory=SkipCounter)

    def report(self) -> str:
        """Human-readable summary."""
        acc = self.verdicts["correct"] / self.written if self.written else 0.0
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.verdicts.items()))
        return (
            f"records read: {self.read}, labeled: {self.written} (accuracy {acc:.4f}; {parts})\n{self.skips.report()}"
        )


def _label_one(item) -> dict | RecordError:
    file, line, raw, task, timeout_s = item
    try:
        rec = parse_record(raw, file, line, require_reward=False)
        t = task if task != "auto" else rec.task
        if t not in TASKS:
            raise RecordError(
                "missing_field",
                f"task {t!r} unknown: set `task` (gsm8k/math) on the record or pass --task",
                file,
                line,
                "task",
            )
        if rec.reference_answer is None:
            raise RecordError(
                "missing_field", "missing; labeling needs the reference answer", file, line, "reference_answer"
            )
        v = check_answer(t, rec.response, rec.reference_answer, timeout_s=timeout_s)
    except RecordError as err:
        return err
    obj = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
    obj.update(reward=1.0 if v.correct else 0.0, correct=v.correct, extracted_answer=v.extracted, label_reason=v.reason)
    return obj


def label_records(cfg: LabelConfig) -> LabelSummary:
    """Check every record's final answer against its reference and write the labeled records in order.

    Returns:
        A LabelSummary (verdict counts: correct, wrong, no_answer, timeout, error, bad_reference).
    Raises:
        RecordError: the first invalid record, unless cfg.skip_invalid.
    """
    from tqdm import tqdm

    files = expand_inputs(cfg.inputs)
    items = ((f, line, raw, cfg.task, cfg.timeout_s) for f in files for line, raw in iter_raw(f))
    summary = LabelSummary()
    with staged_file(cfg.output, overwrite=cfg.overwrite, inputs=local_inputs(list(cfg.inputs) + files)) as tmp:
        pool = (
            mp.get_context("fork").Pool(cfg.workers, initializer=dies_with_this_process())  # a killed label's too
            if cfg.workers > 1
            else None
        )
        try:
            results = pool.imap(_label_one, items, chunksize=64) if pool else map(_label_one, items)
            with (
                open(tmp, "w", encoding="utf-8") as out,
                tqdm(disable=not cfg.progress, unit="rec", desc="label", file=sys.stderr) as bar,
            ):
                for res in results:
                    summary.read += 1
                    bar.update(1)
                    if isinstance(res, RecordError):
                        if not cfg.skip_invalid:
                            raise res
                        summary.skips.add(res)
                        continue
                    out.write(json.dumps(res, ensure_ascii=False) + "\n")
                    summary.written += 1
                    summary.verdicts[res["label_reason"]] += 1
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return summary
