"""The trajectory record format (JSON Lines, Parquet, or an HF `datasets` directory) and its validation.

One record = one sampled response to one prompt. Field reference and an example: docs/data.md.
TRL's dataset shapes (prompt/completion, messages, chosen/rejected) are read too: `trl_formats` maps
them onto these fields, and `hf_sources` opens `datasets` inputs (a split of a DatasetDict, a cached
hub name).
Every problem is a `RecordError` naming file, line, field and a short reason code; in skip-invalid
mode the caller counts skips by reason with a `SkipCounter` and prints them, so no record is ever
dropped without being counted.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from dqo_megatron.data import hf_sources
from dqo_megatron.data.trl_formats import (
    PairSide,
    ShapeError,
    is_trl_row,
    pair_sides,
    pair_sides_of_line,
    rename_field,
    to_native,
)
from dqo_megatron.outputs import staged_file

CHAT_ROLES = ("system", "user", "assistant", "tool")
"""Roles accepted in chat-message prompts."""

KNOWN_FIELDS = (
    "prompt",
    "response",
    "reward",
    "correct",
    "prompt_id",
    "id",
    "process_rewards",
    "process_segments",
    "behavior_logprobs",
    "behavior_tokenizer",
    "truncated",
    "reference_answer",
    "source",
    "task",
    "metadata",
)
"""Fields the format defines; other fields are kept in `TrajectoryRecord.extra`."""
_KNOWN_FIELDS = frozenset(KNOWN_FIELDS)


class RecordError(ValueError):
    """A record is invalid. `reason` is a short code used to count skips; str() names file:line and field."""

    def __init__(self, reason: str, message: str, file: str = "<input>", line: int = 0, field: str | None = None):
        self.reason, self.message, self.file, self.line, self.field = reason, message, file, line, field
        where = f"{file}:{line}" + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message} [{reason}]")

    def __reduce__(self):  # errors travel back from worker processes
        return (RecordError, (self.reason, self.message, self.file, self.line, self.field))


@dataclass
class TrajectoryRecord:
    """A validated record. Character offsets are Python `str` indices (Unicode code points)."""

    prompt: str | list[dict[str, str]]
    """Prompt text (used as the single user turn) or chat messages [{"role", "content"}, ...]."""
    response: str
    """The sampled response, without EOS (the tokenizer appends it, unless `truncated`)."""
    reward: float | None
    """Outcome reward (from `reward`, else 1.0/0.0 from `correct`); None only when not required."""
    prompt_id: str
    """Groups samples of one prompt: the record's `prompt_id`, else "sha1:" + hash of the prompt."""
    process_rewards: list[tuple[int, float]] = field(default_factory=list)
    """(end character offset in `response`, reward) per step, offsets strictly increasing in 1..len."""
    behavior_logprobs: list[float] | None = None
    """Sampler log-probs per response token (see docs/data.md for the EOS convention)."""
    behavior_tokenizer: str | None = None
    """Name of the tokenizer the behavior log-probs belong to."""
    truncated: bool = False
    """The sample was cut by the sampler's length limit: it never ended, so no EOS is appended and its
    behavior log-probs stop at its last token (absent / null in the record = False)."""
    correct: bool | None = None
    id: str | None = None
    reference_answer: str | None = None
    source: str | None = None
    task: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields outside the format, kept as they were."""
    file: str = "<input>"
    line: int = 0


class SkipCounter:
    """Counts skipped records by reason and keeps the first message of each reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def add(self, err: RecordError | str, message: str | None = None) -> None:
        """Count one skip: a RecordError, or a reason code with an optional message."""
        reason = err.reason if isinstance(err, RecordError) else err
        self.counts[reason] += 1
        self.first.setdefault(reason, str(err) if isinstance(err, RecordError) else (message or reason))

    def merge(self, other: "SkipCounter") -> None:
        """Add another counter's counts (and first messages where this one has none)."""
        self.counts.update(other.counts)
        for k, v in other.first.items():
            self.first.setdefault(k, v)

    @property
    def total(self) -> int:
        """Number of skipped records."""
        return sum(self.counts.values())

    def report(self) -> str:
        """Multi-line text: one line per reason, sorted by reason, with its count and first example."""
        if not self.counts:
            return "skipped: 0"
        lines = [f"skipped: {self.total}"]
        for reason in sorted(self.counts):
            lines.append(f"  {reason}: {self.counts[reason]} (first: {self.first[reason]})")
        return "\n".join(lines)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


FLOAT32_LIMIT = 2.0**128 - 2.0**103
"""Numbers at or beyond this magnitude round to +-inf in float32 (halfway between float32's largest
value, 2**128 - 2**104, and 2**128), the dtype rewards and log-probs are stored in."""
_F32_LOW = -FLOAT32_LIMIT


def _float(value: Any, fld: str, where: dict) -> float:
    if not _is_number(value):
        raise RecordError(
            "wrong_type", f"expected a number, got {type(value).__name__} {value!r:.40}", field=fld, **where
        )
    try:
        v = float(value)
    except OverflowError:  # an integer beyond float64 (JSON has no size limit on integers)
        raise RecordError(
            "not_representable",
            f"an integer of {value.bit_length()} bits is beyond float32, the dtype "
            "it is stored in (|x| <= 3.4028235e+38)",
            field=fld,
            **where,
        ) from None
    if not _F32_LOW < v < FLOAT32_LIMIT:  # one comparison per value on the common path (NaN fails it too)
        if not math.isfinite(v):
            raise RecordError("non_finite", f"must be finite, got {v}", field=fld, **where)
        # finite here, inf once stored: refuse it rather than train on inf
        raise RecordError(
            "not_representable",
            f"{v!r} is finite but beyond float32, the dtype it is stored in (|x| <= 3.4028235e+38)",
            field=fld,
            **where,
        )
    return v


# A lone UTF-16 surrogate comes from a `\ud800`-style escape (json.loads accepts it) or from a str a
# caller built; paired escapes decode to one code point and never leave a surrogate behind.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset((int, float, bool, type(None)))


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _find_surrogate(obj: Any, path: str) -> tuple[str, str, int, bool] | None:
    """(field path, the string, index, is a key) of the first string (value or key) holding a lone surrogate."""
    if isinstance(obj, str):
        m = _SURROGATE.search(obj)
        return (path, obj, m.start(), False) if m else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            m = _SURROGATE.search(k) if isinstance(k, str) else None
            if m:
                return (path or "<record>", k, m.start(), True)
            hit = _find_surrogate(v, f"{path}.{k}" if path else str(k))
            if hit:
                return hit
    elif isinstance(obj, (list, tuple)) and not _SCALARS.issuperset(map(type, obj)):  # skip lists of numbers fast
        for i, v in enumerate(obj):
            if isinstance(v, (str, dict, list, tuple)):
                hit = _find_surrogate(v, f"{path}[{i}]")
                if hit:
                    return hit
    return None


def _check_unicode(obj: Any, raw: Any, where: dict) -> None:
    """RecordError `invalid_unicode` naming the field when a string cannot be encoded as UTF-8: it would
    crash the tokenizer or the JSON writer of label / process-scores far from its file:line."""
    if isinstance(raw, str):  # the common case: a C-speed scan or two of the line, no walk
        escaped = "\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
        if not escaped and (raw.isascii() or _encodes(raw)):
            return
    hit = _find_surrogate(obj, "")
    if hit is None:
        return
    path, text, i, is_key = hit
    code = f"\\u{ord(text[i]):04x}"
    raise RecordError(
        "invalid_unicode",
        f"{'a key in it ' if is_key else ''}holds a lone surrogate {code} at "
        f"character {i}: valid JSON, but not encodable as UTF-8 (fix the producer, or skip the record)",
        field=path,
        **where,
    )


def _opt_str(obj: dict, name: str, where: dict, allow_int: bool = False) -> str | None:
    v = obj.get(name)
    if v is None:
        return None
    if allow_int and isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str):
        raise RecordError("wrong_type", f"expected a string, got {type(v).__name__}", field=name, **where)
    return v


def prompt_hash(prompt: str | list) -> str:
    """Stable id of a prompt (text or messages): "sha1:" + first 16 hex digits of its canonical JSON."""
    blob = json.dumps(prompt, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return "sha1:" + hashlib.sha1(blob).hexdigest()[:16]


def _parse_prompt(value: Any, where: dict) -> str | list[dict[str, str]]:
    if value is None:
        raise RecordError("missing_field", "missing (text or chat messages)", field="prompt", **where)
    if isinstance(value, str):
        if not value:
            raise RecordError("empty_prompt", "is empty", field="prompt", **where)
        return value
    if not isinstance(value, list) or not value:
        raise RecordError("wrong_type", "expected a string or a non-empty list of messages", field="prompt", **where)
    out = []
    for i, m in enumerate(value):
        f = f"prompt[{i}]"
        if not isinstance(m, dict):
            raise RecordError("wrong_type", "a message must be an object {role, content}", field=f, **where)
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES:
            raise RecordError(
                "wrong_type", f"role {role!r} is not one of {list(CHAT_ROLES)}", field=f + ".role", **where
            )
        if not isinstance(content, str):
            raise RecordError("wrong_type", "content must be a string", field=f + ".content", **where)
        out.append({"role": role, "content": content})
    return out


def _parse_process(obj: dict, response: str, where: dict) -> list[tuple[int, float]]:
    pr, segs = obj.get("process_rewards"), obj.get("process_segments")
    if pr is not None and segs is not None:
        raise RecordError(
            "bad_process_rewards",
            "give process_rewards or process_segments, not both",
            field="process_rewards",
            **where,
        )
    steps: list[tuple[int, float]] = []
    if segs is not None:
        if not isinstance(segs, list):
            raise RecordError("wrong_type", "expected a list of {text, reward}", field="process_segments", **where)
        end = 0
        for i, s in enumerate(segs):
            f = f"process_segments[{i}]"
            if not isinstance(s, dict) or not isinstance(s.get("text"), str):
                raise RecordError("wrong_type", "expected {text: str, reward: number}", field=f, **where)
            end += len(s["text"])
            if s["text"]:  # an empty segment ends nowhere; its reward would have no token
                steps.append((end, _float(s.get("reward"), f + ".reward", where)))
            elif s.get("reward") not in (None, 0, 0.0):
                raise RecordError("bad_process_rewards", "an empty segment cannot carry a reward", field=f, **where)
        if "".join(s["text"] for s in segs) != response:
            raise RecordError(
                "bad_process_rewards",
                "the segments' texts do not concatenate to the response",
                field="process_segments",
                **where,
            )
        return steps
    if pr is None:
        return steps
    if not isinstance(pr, list):
        raise RecordError("wrong_type", "expected a list of [end_offset, reward]", field="process_rewards", **where)
    prev = 0
    for i, item in enumerate(pr):
        f = f"process_rewards[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise RecordError("wrong_type", "expected [end_offset, reward]", field=f, **where)
        off, rew = item
        if not isinstance(off, int) or isinstance(off, bool):
            raise RecordError("wrong_type", f"end offset must be an integer, got {off!r}", field=f, **where)
        if not prev < off <= len(response):
            raise RecordError(
                "bad_process_rewards",
                f"end offset {off} must be > {prev} (previous) and <= {len(response)} (response length)",
                field=f,
                **where,
            )
        steps.append((off, _float(rew, f + "[1]", where)))
        prev = off
    return steps


def parse_record(
    raw: str | dict | PairSide, file: str = "<input>", line: int = 0, require_reward: bool = True
) -> TrajectoryRecord:
    """Validate one record (a JSON line or an already-decoded row) into a `TrajectoryRecord`.

    Args:
        raw: the JSON text of one line, a dict (Parquet / HF datasets row), or one side of a TRL
            preference pair (`iter_raw` splits pair rows). Rows in TRL's shapes are mapped onto ours
            first (`trl_formats.to_native`); errors then name the row's own fields.
        file, line: where it came from, for error messages (line is 1-based; for tables the row + 1).
        require_reward: demand `reward` or `correct` (TRL: `label`) (False for unlabeled rollouts, see `label`).
    Raises:
        RecordError naming file, line, field and the reason code.
    """
    where = {"file": file, "line": line}
    pair = raw if isinstance(raw, PairSide) else None
    side = None
    if pair is not None:
        side, raw = pair.side, pair.row
    if isinstance(raw, (str, bytes)):
        try:
            obj = json.loads(raw)
        # ValueError also covers integers beyond Python's digit limit; RecursionError, absurd nesting
        except (ValueError, RecursionError) as exc:
            raise RecordError("malformed_json", f"not valid JSON: {str(exc)[:200]}", **where) from None
    else:
        obj = raw
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"a record must be a JSON object, got {type(obj).__name__}", **where)
    _check_unicode(obj, raw, where)
    if side is None and not is_trl_row(obj):
        return _parse_fields(obj, where, require_reward)
    if side is None and pair_sides(obj):
        raise RecordError(
            "wrong_type", "a chosen/rejected pair holds two records: read it with iter_raw / read_records", **where
        )
    names: dict[str, str] = {}
    try:
        # a pair side was converted when the reader made it; convert other TRL rows here
        native, names = pair.converted() if pair is not None else to_native(obj)
        return _parse_fields(native, where, require_reward)
    except ShapeError as err:
        raise RecordError(err.reason, err.message, field=err.field, **where) from None
    except RecordError as err:
        raise RecordError(err.reason, err.message, file, line, rename_field(err.field, names)) from None


def _parse_fields(obj: dict, where: dict, require_reward: bool) -> TrajectoryRecord:
    """`parse_record` of a decoded row in our own fields."""
    file, line = where["file"], where["line"]
    prompt = _parse_prompt(obj.get("prompt"), where)
    response = obj.get("response")
    if response is None:
        raise RecordError("missing_field", "missing", field="response", **where)
    if not isinstance(response, str):
        raise RecordError("wrong_type", f"expected a string, got {type(response).__name__}", field="response", **where)
    if response == "":
        raise RecordError(
            "empty_response",
            "is empty (a response is at least one character; EOS is added later)",
            field="response",
            **where,
        )
    correct = obj.get("correct")
    if correct is not None and not isinstance(correct, bool):
        raise RecordError("wrong_type", f"expected true/false, got {correct!r:.40}", field="correct", **where)
    reward = None
    if obj.get("reward") is not None:
        reward = _float(obj["reward"], "reward", where)
    elif correct is not None:
        reward = 1.0 if correct else 0.0
    elif require_reward:
        raise RecordError(
            "missing_field",
            "missing (give `reward` (number) or `correct` (bool); TRL's name for `correct` is `label`)",
            field="reward",
            **where,
        )
    steps = _parse_process(obj, response, where)
    blp = obj.get("behavior_logprobs")
    if blp is not None:
        if not isinstance(blp, list):
            raise RecordError("wrong_type", "expected a list of numbers", field="behavior_logprobs", **where)
        blp = [_float(v, f"behavior_logprobs[{i}]", where) for i, v in enumerate(blp)]
        for i, v in enumerate(blp):
            if v > 1e-4:
                raise RecordError(
                    "bad_behavior_logprobs",
                    f"a log-probability must be <= 0, got {v}",
                    field=f"behavior_logprobs[{i}]",
                    **where,
                )
    truncated = obj.get("truncated")  # null (a Parquet / datasets column other rows fill) = not truncated
    if truncated is not None and not isinstance(truncated, bool):
        raise RecordError("wrong_type", f"expected true/false, got {truncated!r:.40}", field="truncated", **where)
    meta = obj.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise RecordError("wrong_type", "expected an object", field="metadata", **where)
    prompt_id = _opt_str(obj, "prompt_id", where, allow_int=True)
    return TrajectoryRecord(
        prompt=prompt,
        response=response,
        reward=reward,
        prompt_id=prompt_id or prompt_hash(prompt),
        process_rewards=steps,
        behavior_logprobs=blp,
        behavior_tokenizer=_opt_str(obj, "behavior_tokenizer", where),
        truncated=bool(truncated),
        correct=correct,
        id=_opt_str(obj, "id", where, allow_int=True),
        reference_answer=_opt_str(obj, "reference_answer", where),
        source=_opt_str(obj, "source", where),
        task=_opt_str(obj, "task", where),
        metadata=meta or {},
        extra={k: v for k, v in obj.items() if k not in _KNOWN_FIELDS},
        file=file,
        line=line,
    )


def expand_inputs(paths: str | Path | Iterable[str | Path]) -> list[str]:
    """Input paths with globs expanded, in the given order (each glob sorted); raise if one matches nothing.

    A `datasets` hub name (`openai/gsm8k`) that is no path here is kept as it is: `iter_raw` opens it
    from the local cache or says how to provide it.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[str] = []
    for p in paths:
        p = str(p)
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if os.path.exists(p) else [])
        base = hf_sources.split_suffix(p, None)[0]  # "DIR@test": a split of a DatasetDict or hub dataset
        if not hits and (hf_sources.is_hub_name(base) or (base != p and os.path.isdir(base))):
            hits = [p]
        if not hits:
            raise FileNotFoundError(f"input {p!r} does not exist (or the pattern matches no file)")
        out.extend(hits)
    return out


def input_format(path: str) -> str:
    """ "jsonl", "parquet", "hf_disk" (a `save_to_disk` directory of a Dataset or a DatasetDict) or
    "hf_hub" (a hub name, read from the local cache only), from the path (an ``@split`` suffix aside)."""
    path = hf_sources.split_suffix(path, None)[0]
    if os.path.isdir(path):
        if hf_sources.saved_kind(path):
            return "hf_disk"
        raise ValueError(hf_sources.not_a_dataset_dir(path))
    if hf_sources.is_hub_name(path):
        return "hf_hub"
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise ValueError(f"{path}: unknown input format; use .jsonl/.json, .parquet, or a datasets directory")


def iter_raw(
    path: str, chunk_rows: int = 1024, split: str | None = None
) -> Iterator[tuple[int, str | dict | PairSide]]:
    """(line, raw) pairs of one input: raw JSON text per non-blank line, or a dict per table row.

    Blank lines of a JSONL file are not records and are passed over (the line numbers stay true). A
    TRL preference pair (`chosen`/`rejected`) gives two items with the same line, chosen first.
    `split`: the split of a DatasetDict directory or hub name (default "train", see `hf_sources`).
    """
    fmt = input_format(path)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            for i, b in enumerate(f, 1):
                if b.strip():
                    try:
                        text = b.decode("utf-8")
                    except UnicodeDecodeError:
                        yield i, b  # parse_record reports it as malformed_json with the line number
                        continue
                    for raw in pair_sides_of_line(text) or (text,):
                        yield i, raw
        return
    if fmt == "parquet":
        import pyarrow.parquet as pq

        rows = (rec for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows) for rec in batch.to_pylist())
    else:
        rows = iter(hf_sources.open_dataset(path, split))
    for row, rec in enumerate(rows, 1):
        for raw in pair_sides(rec) or (rec,):
            yield row, raw


def read_records(
    paths,
    skip_invalid: bool = False,
    skips: SkipCounter | None = None,
    require_reward: bool = True,
    split: str | None = None,
) -> Iterator[TrajectoryRecord]:
    """Validated records of all inputs, in order.

    Args:
        paths: a path, a glob, or a list of them.
        skip_invalid: count invalid records in `skips` and go on, instead of raising the first RecordError.
        skips: the counter to fill (required to see the counts when skip_invalid is set).
        require_reward: see `parse_record`.
        split: see `iter_raw`.
    """
    if skip_invalid and skips is None:
        raise ValueError("skip_invalid needs a SkipCounter to count what it skips")
    for path in expand_inputs(paths):
        for line, raw in iter_raw(path, split=split):
            try:
                yield parse_record(raw, path, line, require_reward=require_reward)
            except RecordError as err:
                if not skip_invalid:
                    raise
                skips.add(err)


def record_to_dict(rec: TrajectoryRecord) -> dict[str, Any]:
    """The record as a JSON-ready dict in the documented format (offset form of process rewards)."""
    out: dict[str, Any] = {"prompt": rec.prompt, "response": rec.response, "prompt_id": rec.prompt_id}
    if rec.reward is not None:
        out["reward"] = rec.reward
    for name in ("correct", "id", "reference_answer", "source", "task", "behavior_tokenizer"):
        if getattr(rec, name) is not None:
            out[name] = getattr(rec, name)
    if rec.process_rewards:
        out["process_rewards"] = [[o, r] for o, r in rec.process_rewards]
    if rec.behavior_logprobs is not None:
        out["behavior_logprobs"] = rec.behavior_logprobs
    if rec.truncated:  # written only when set: records of complete samples look as they always did
        out["truncated"] = True
    if rec.metadata:
        out["metadata"] = rec.metadata
    out.update(rec.extra)
    return out


def write_jsonl(rows: Iterable[dict], path: str | Path) -> int:
    """Write dicts as UTF-8 JSON Lines (atomically: to a temp file, then renamed); return the count."""
    n = 0
    with staged_file(path, overwrite=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
            n += 1
    return n
