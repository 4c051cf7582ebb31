"""TRL's dataset shapes read as trajectory records (the table "TRL field names -> ours" in docs/data.md).

A row without our `response` field but with TRL's `completion`, `messages` or `chosen`/`rejected` is
mapped here onto the native fields (`prompt`, `response`, `correct`) and then validated like any native
record by `records.parse_record`, so a TRL row and its native equivalent give the same tokens. A
preference pair holds two records: the reader (`records.iter_raw`) splits it into two `PairSide`s that
share the row's prompt (and so its `prompt_id`), the chosen side `correct: true`, the rejected side
`correct: false`.

Problems are `ShapeError`s naming the row's own field (`completion[0].role`); the record reader turns
them into `RecordError`s with file:line. This module imports nothing of ours, so records may import it.
"""

from __future__ import annotations

import json
from typing import Any

TRL_FIELDS = frozenset(("completion", "messages", "chosen", "rejected", "label"))
"""TRL's field names that stand for one of ours; they are not kept as extra fields of the record."""


class ShapeError(ValueError):
    """A TRL-shaped row that cannot be mapped; `reason` and `field` as in `records.RecordError`."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        self.reason, self.message, self.field = reason, message, field
        super().__init__(f"{field}: {message} [{reason}]" if field else f"{message} [{reason}]")


class PairSide(dict):
    """One of the two records of a preference-pair row (`side`: "chosen" or "rejected").

    As a dict it is that side as a native row (empty when the pair is malformed), so that code which
    writes rows back (`label`, `process-scores`) writes a valid record. The side is converted once, here:
    `records.parse_record` takes the result from `converted` (with `row`, to name the row's own fields
    in its errors) rather than converting again.
    """

    def __init__(self, row: dict, side: str):
        self.row, self.side = row, side
        self._error: ShapeError | None = None
        try:
            self._native, self._names = _pair_side(row, side)
        except ShapeError as err:
            self._native, self._names, self._error = {}, {}, err  # parse_record reports it from `row`
        super().__init__(self._native)

    def converted(self) -> tuple[dict, dict[str, str]]:
        """`to_native(row, side)` as computed when the side was made: (native row, names).

        Raises:
            The ShapeError that conversion raised, for a malformed pair.
        """
        if self._error is not None:
            raise self._error
        return self._native, self._names

    def __reduce__(self):  # sides travel to worker processes; rebuilt there from the row (half the bytes)
        return (PairSide, (self.row, self.side))


def is_pair(obj: Any) -> bool:
    """A TRL preference pair: an object with `chosen` and `rejected` (and no native `response`)."""
    return isinstance(obj, dict) and "chosen" in obj and "rejected" in obj and "response" not in obj


def pair_sides(obj: Any) -> list[PairSide] | None:
    """The two records of a pair row (chosen first), or None when `obj` is not a pair."""
    return [PairSide(obj, "chosen"), PairSide(obj, "rejected")] if is_pair(obj) else None


def pair_sides_of_line(text: str) -> list[PairSide] | None:
    """`pair_sides` of one JSONL line; None when it is no pair (or not JSON: the parser reports that).

    Only lines that hold both names are decoded here, so native records cost one substring scan.
    """
    if '"chosen"' not in text or '"rejected"' not in text:
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return pair_sides(obj)


def is_trl_row(obj: dict) -> bool:
    """A row in one of TRL's shapes rather than ours (it has no `response`)."""
    return "response" not in obj and ("completion" in obj or "messages" in obj or "chosen" in obj or "rejected" in obj)


def to_native(obj: dict, side: str | None = None) -> tuple[dict, dict[str, str]]:
    """Map a TRL-shaped row (or one side of a pair row) onto our record fields.

    Args:
        obj: the decoded row.
        side: "chosen" / "rejected" for a side of a pair row, else None.
    Returns:
        (native row, names): the row with `prompt`, `response` and `correct` in our terms and every other
        field unchanged; `names` maps our field names to the row's own, for error messages
        (`rename_field`).
    Raises:
        ShapeError naming the row's field.
    """
    if side is not None:
        return _pair_side(obj, side)
    if "completion" in obj:
        return _prompt_completion(obj)
    if "messages" in obj:
        return _language_modeling(obj)
    other = "rejected" if "chosen" in obj else "chosen"
    raise ShapeError("missing_field", "a preference pair needs both `chosen` and `rejected`", field=other)


def rename_field(field: str | None, names: dict[str, str]) -> str | None:
    """Our field path in an error (`prompt[1].content`) in the row's own terms (`messages[1].content`)."""
    if field is None:
        return None
    for ours, theirs in names.items():
        if field == ours or field.startswith((ours + "[", ours + ".")):
            return theirs + field[len(ours) :]
    return field


def _rest(obj: dict) -> dict:
    """The row's fields that stay as they are (TRL's own are replaced by ours)."""
    return {k: v for k, v in obj.items() if k not in TRL_FIELDS}


def _correct_from_label(obj: dict) -> Any:
    """TRL's `label` is our `correct`; `correct` wins when both are given (`label` writes it beside the
    row's own `label`, which may have said otherwise)."""
    label, correct = obj.get("label"), obj.get("correct")
    if label is not None and not isinstance(label, bool):
        raise ShapeError("wrong_type", f"expected true/false, got {label!r:.40}", field="label")
    return correct if correct is not None else label


def _assistant_turn(value: Any, name: str, index: int = 0) -> tuple[Any, str]:
    """(response text, its field name) of a completion: a string, or a list of one assistant message.

    `index`: where that list starts in the row's field (an implicit-prompt pair's last turn).
    """
    if not isinstance(value, list):
        return value, name  # a string (or a wrong type, which the record check names)
    if len(value) != 1:
        raise ShapeError(
            "wrong_type", f"a conversational completion is one assistant message, got {len(value)}", field=name
        )
    msg, where = value[0], f"{name}[{index}]"
    if not isinstance(msg, dict):
        raise ShapeError("wrong_type", "a message must be an object {role, content}", field=where)
    if msg.get("role") != "assistant":
        raise ShapeError(
            "wrong_type",
            f"the completion must be the assistant's turn, got role {msg.get('role')!r:.40}",
            field=where + ".role",
        )
    return msg.get("content"), where + ".content"


def _prompt_completion(obj: dict) -> tuple[dict, dict[str, str]]:
    """TRL's prompt-completion and unpaired-preference (KTO) rows, standard or conversational."""
    if "messages" in obj:
        raise ShapeError("wrong_type", "give `completion` (with `prompt`) or `messages`, not both", field="messages")
    response, where = _assistant_turn(obj["completion"], "completion")
    native = {**_rest(obj), "response": response}
    correct = _correct_from_label(obj)
    if correct is not None:
        native["correct"] = correct
    return native, {"response": where, "correct": "correct" if "correct" in obj else "label"}


def _language_modeling(obj: dict) -> tuple[dict, dict[str, str]]:
    """TRL's conversational language-modeling rows: the last (assistant) turn is the response."""
    msgs = obj["messages"]
    if "prompt" in obj:
        raise ShapeError("wrong_type", "give `messages` or `prompt`, not both", field="prompt")
    if not isinstance(msgs, list) or not msgs:
        raise ShapeError("wrong_type", "expected a non-empty list of messages", field="messages")
    last = len(msgs) - 1
    if not isinstance(msgs[last], dict) or msgs[last].get("role") != "assistant":
        role = msgs[last].get("role") if isinstance(msgs[last], dict) else None
        raise ShapeError(
            "wrong_type",
            f"the last message must be the assistant's response, got role {role!r:.40}",
            field=f"messages[{last}].role",
        )
    if last == 0:
        raise ShapeError("empty_prompt", "no turn before the assistant's: nothing to prompt with", field="messages")
    native = {**_rest(obj), "prompt": msgs[:last], "response": msgs[last].get("content")}
    correct = _correct_from_label(obj)
    if correct is not None:
        native["correct"] = correct
    names = {"prompt": "messages", "response": f"messages[{last}].content"}
    return native, {**names, "correct": "correct" if "correct" in obj else "label"}


def _implicit_prompt(chosen: Any, rejected: Any) -> int:
    """Number of leading messages chosen and rejected share: TRL's implicit prompt."""
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, list):
            raise ShapeError(
                "missing_field",
                "a pair without `prompt` must hold whole conversations (lists of messages) in chosen and "
                "rejected, to take the prompt from their common turns; give `prompt`",
                field=name if isinstance(chosen, list) else "prompt",
            )
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if k == 0 or len(value) != k + 1:
            raise ShapeError(
                "wrong_type",
                f"chosen and rejected share {k} leading turns; an implicit prompt needs every turn shared "
                "but one last assistant turn on each side",
                field=name,
            )
    return k


def _pair_side(obj: dict, side: str) -> tuple[dict, dict[str, str]]:
    """One side of TRL's preference rows: explicit `prompt`, or the turns chosen and rejected share."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    value = obj[side]
    if "prompt" in obj:
        prompt, names = obj["prompt"], {}
        response, where = _assistant_turn(value, side)
    else:
        k = _implicit_prompt(chosen, rejected)
        prompt, names = value[:k], {"prompt": side}
        response, where = _assistant_turn(value[k:], side, index=k)
    # the side decides the outcome, whatever else the row says
    native = {name: v for name, v in _rest(obj).items() if name not in ("reward", "correct")}
    native.update(prompt=prompt, response=response, correct=side == "chosen")
    return native, {**names, "response": where}
