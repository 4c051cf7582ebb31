"""Split a response into reasoning steps, as character offsets (for synthetic process scores).

A split is the list of step *end* offsets (exclusive, Python characters), strictly increasing, the last
one equal to `len(response)`: exactly the offsets that `process_rewards` holds (docs/data.md). Step k
(1-based) is `response[ends[k-2]:ends[k-1]]` (from 0 for k = 1); the prefix up to the end of step k is
`response[:ends[k-1]]`.

Splitters (`splitter=`):

  lines         a step ends after each line break (blank lines stay with the step before them)
  paragraphs    a step ends after each blank line (models that break one step over several lines)
  step_markers  a step starts at each line beginning with "Step <n>" (also "**Step 2:**", "### Step 3.")
  auto          step_markers when the response has at least two markers, else lines (the default)
  regex         `pattern` marks boundaries: a step ends where a match ends, so a separator belongs to
                the step before it; a zero-width match (a lookahead such as `(?=Step \\d)`) starts a step

Whitespace-only steps are merged into the step before them (the first into the one after it), so every
step holds text. `max_steps` caps the number of steps by merging neighbours into groups of (nearly)
equal size, which caps the cost of process scores on very long responses.
"""

from __future__ import annotations

import re
from typing import Sequence

SPLITTERS = ("auto", "lines", "paragraphs", "step_markers", "regex")
"""Names accepted by `split_steps`."""

_LINES = re.compile(r"\n(?:[ \t]*\n)*")
_PARAGRAPHS = re.compile(r"\n(?:[ \t]*\n)+")
# A marker at a line start (after optional markdown: "**", "#", ">", "-"); zero-width, so the boundary
# is where the marker begins and the marker belongs to the step it announces.
_STEP_MARKERS = re.compile(r"(?im)^(?=[ \t]*(?:[#*>\-]+[ \t]*)?step[ \t]+\d+\b)")


def _boundaries(response: str, regex: re.Pattern) -> list[int]:
    return [m.end() for m in regex.finditer(response)]


def _merge_blank(response: str, ends: list[int]) -> list[int]:
    """Drop boundaries that would leave a whitespace-only step."""
    out: list[int] = []
    start = 0
    for end in ends:
        if response[start:end].strip():
            out.append(end)
            start = end
        # else: the blank piece joins the next step (or, at the very end, the previous one below)
    if not out or out[-1] != len(response):
        if out and not response[out[-1] :].strip():
            out[-1] = len(response)  # trailing blank text joins the last real step
        else:
            out.append(len(response))
    return out


def cap_steps(ends: Sequence[int], max_steps: int) -> list[int]:
    """Merge consecutive steps into `max_steps` groups of nearly equal step count (keeps the last end)."""
    n = len(ends)
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps}: must be >= 1")
    if n <= max_steps:
        return list(ends)
    # group g ends at step ceil((g+1) * n / max_steps); integer arithmetic keeps the groups balanced
    return [ends[-(-(g + 1) * n // max_steps) - 1] for g in range(max_steps)]


def compile_pattern(pattern: str) -> re.Pattern:
    """Compile a user boundary pattern, with an error that names the pattern."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"split pattern {pattern!r} is not a valid regular expression: {exc}") from None


def split_steps(
    response: str, splitter: str = "auto", pattern: str | re.Pattern | None = None, max_steps: int | None = None
) -> list[int]:
    """End offsets (exclusive) of the reasoning steps of `response`; see the module docstring.

    Args:
        response: the response text (non-empty).
        splitter: one of `SPLITTERS`.
        pattern: the boundary regex for splitter="regex" (string or compiled).
        max_steps: merge steps so that there are at most this many (None: no cap).
    Returns:
        Strictly increasing offsets in 1..len(response), the last equal to len(response). A response
        without any boundary is one step.
    """
    if not response:
        raise ValueError("cannot split an empty response")
    if splitter == "regex":
        if pattern is None:
            raise ValueError("splitter='regex' needs a pattern")
        regex = compile_pattern(pattern) if isinstance(pattern, str) else pattern
        cuts = _boundaries(response, regex)
    elif splitter == "lines":
        cuts = _boundaries(response, _LINES)
    elif splitter == "paragraphs":
        cuts = _boundaries(response, _PARAGRAPHS)
    elif splitter == "step_markers":
        cuts = _boundaries(response, _STEP_MARKERS)
    elif splitter == "auto":
        markers = _boundaries(response, _STEP_MARKERS)
        cuts = markers if len(markers) >= 2 else _boundaries(response, _LINES)
    else:
        raise ValueError(f"unknown splitter {splitter!r}: choose one of {list(SPLITTERS)}")
    ends = sorted({c for c in cuts if 0 < c < len(response)}) + [len(response)]
    ends = _merge_blank(response, ends)
    if max_steps is not None:
        ends = cap_steps(ends, max_steps)
    return ends


def step_texts(response: str, ends: Sequence[int]) -> list[str]:
    """The steps' texts for a split (they concatenate to `response`)."""
    starts = [0, *ends[:-1]]
    return [response[s:e] for s, e in zip(starts, ends)]
