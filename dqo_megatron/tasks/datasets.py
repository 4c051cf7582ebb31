"""Problem sets for rollouts and evaluation: GSM8K, MATH (original 5K test / MATH500), or any JSONL.

Every loader returns `Problem`s: the question, its reference solution or answer, the paper's prompt
(`build_prompt`), and metadata (MATH subject and level) that eval breaks accuracy down by. Files are
read from local paths only; a user elsewhere may name an HF `datasets` directory saved with
`save_to_disk` (a Dataset, or one split of a DatasetDict), a hub name already in the local HF cache
(`openai/gsm8k:main`; nothing is downloaded, see `data.hf_sources`), or any JSONL with a question field
and an answer field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dqo_megatron.data.hf_sources import is_hub_name, open_dataset, split_suffix
from dqo_megatron.tasks.prompts import build_prompt, check_task

QUESTION_FIELDS = ("question", "problem", "prompt")
"""Fields tried, in order, for the question text of a generic JSONL row."""
ANSWER_FIELDS = ("answer", "solution", "reference_answer")
"""Fields tried, in order, for the reference of a generic JSONL row (gsm8k: `answer` holds `#### N`)."""


@dataclass
class Problem:
    """One question with its reference."""

    id: str
    """Stable id: the row's `id`/`unique_id` when present, else "<file stem>:<line>"."""
    task: str
    """"gsm8k" or "math" (answer format and prompt instruction)."""
    question: str
    """The problem text as in the file."""
    reference: str
    """Reference solution or bare answer (what `tasks.grading.check_answer` compares against)."""
    prompt: str
    """The user turn: question + the paper's instruction for `task`."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Extra fields kept for breakdowns (MATH: subject, level, unique_id)."""


def _pick(row: dict, names: tuple[str, ...], where: str) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str) and value.strip():
            return value
    raise ValueError(f"{where}: none of the fields {list(names)} holds a non-empty string (found {sorted(row)})")


def _rows(path: Path, split: str | None = None):
    if path.is_dir() or not path.exists():  # a saved dataset, or a hub name from the local cache
        # no default split: problems of the wrong split (train for an eval) would pass silently
        for i, row in enumerate(open_dataset(str(path), split, default_split=None)):
            yield i + 1, dict(row)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno}: not UTF-8 text (byte {exc.start}); is this a problems file?"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({getattr(exc, 'msg', exc)})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"{path}:{lineno}: a string holds a lone surrogate escape (\\ud800-\\udfff), which is "
                    "not valid Unicode"
                ) from None
            yield lineno, row


def guess_task(path: str | Path) -> str:
    """ "math" when the path mentions math (or MATH500), else "gsm8k"."""
    return "math" if "math" in str(path).lower() else "gsm8k"


def load_problems(
    path: str | Path, task: str | None = None, limit: int | None = None, offset: int = 0, split: str | None = None
) -> list[Problem]:
    """Read problems from a JSONL file, a saved HF dataset directory or a hub name in the local HF cache.

    Args:
        path: e.g. ``../shared/data/gsm8k/test.jsonl``, ``../shared/data/math/prm800k_split/test.jsonl``,
            a `save_to_disk` directory, ``openai/gsm8k:main`` (cached only).
        task: "gsm8k" or "math"; None guesses from the path (see `guess_task`).
        limit: keep at most this many problems (after `offset`); None keeps all.
        offset: skip this many problems first.
        split: the split of a DatasetDict directory or hub name (or ``path@split``); None takes a lone
            split and refuses several (listing them).
    Returns:
        Problems in file order. Raises FileNotFoundError / ValueError naming file and line.
    """
    path = Path(path)
    base = split_suffix(str(path), None)[0]  # "DIR@test" / "owner/name@test": a split named in the path
    if not path.exists() and not is_hub_name(base) and not (base != str(path) and Path(base).is_dir()):
        raise FileNotFoundError(f"problem file {path} does not exist")
    task = check_task(task or guess_task(path))
    out: list[Problem] = []
    for lineno, row in _rows(path, split):
        where = f"{path}:{lineno}"
        question = _pick(row, QUESTION_FIELDS, where)
        if task == "math" and isinstance(row.get("solution"), str):
            reference = row["solution"]  # its last \boxed{} is the answer; survives a null `answer`
        else:
            reference = _pick(row, ANSWER_FIELDS, where)
        pid = row.get("id") or row.get("unique_id") or f"{path.stem}:{lineno}"
        meta = {k: row[k] for k in ("subject", "level", "unique_id", "type") if k in row}
        out.append(Problem(str(pid), task, question, reference, build_prompt(task, question), meta))
    if offset:
        out = out[offset:]
    if limit is not None:
        out = out[:limit]
    if not out:
        raise ValueError(f"{path}: no problems (offset={offset}, limit={limit})")
    return out
