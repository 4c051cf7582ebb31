"""Final-answer extraction (`#### N`, last `\\boxed{}` / `\\fbox{}`) and numeric equivalence for GSM8K."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

_GSM8K_MARK = "####"


def extract_gsm8k_answer(text: str) -> str | None:
    """The text after the last `####` up to the end of that line, stripped; None when absent or empty.

    The paper's format is `#### N` on the last line; models sometimes keep writing after it, so only
    the rest of the marker's own line is taken.
    """
    if not isinstance(text, str):
        return None
    pos = text.rfind(_GSM8K_MARK)
    if pos < 0:
        return None
    tail = text[pos + len(_GSM8K_MARK) :].lstrip("#").strip()
    line = tail.split("\n", 1)[0].strip()
    return line or None


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text` (braces balanced), else None.

    Also accepts the brace-less form `\\boxed 2` (two MATH train solutions use it), taking the token
    up to the next whitespace or `$`. An unclosed last box yields None rather than a guess.
    """
    if not isinstance(text, str):
        return None
    best: tuple[int, str | None] | None = None
    for macro in ("\\boxed", "\\fbox"):
        pos = text.rfind(macro)
        if pos >= 0 and (best is None or pos > best[0]):
            best = (pos, macro)
    if best is None:
        return None
    pos, macro = best
    i = pos + len(macro)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\" and j + 1 < len(text) and text[j + 1] in "{}":
                j += 2  # an escaped brace \{ or \} neither opens nor closes the box
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    content = text[i + 1 : j].strip()
                    return content or None
            j += 1
        return None
    if i > pos + len(macro):  # `\boxed 2`
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


_NUM_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_FRAC_RE = re.compile(r"^([+-]?\d+)\s*/\s*([+-]?\d+)$")
_LATEX_FRAC_RE = re.compile(r"^([+-]?)\\[dt]?frac\{([+-]?\d+)\}\{([+-]?\d+)\}$")


def parse_number(text: str | None) -> Fraction | None:
    """Parse a GSM8K-style number into an exact Fraction, or None if it is not a plain number.

    Accepted: integers and decimals (`5.0 == 5`, `.5`, `1e3`), `a/b`, `\\frac{a}{b}`. Ignored around
    them: thousands commas (`1,000`), `$` and `%` signs, a `\\boxed{}` or `$...$` wrapper, a trailing
    period. Anything else (units, words, expressions) gives None.
    """
    if text is None:
        return None
    s = str(text).strip()
    boxed = extract_boxed(s) if ("\\boxed" in s or "\\fbox" in s) else None
    if boxed is not None:
        s = boxed
    s = s.strip().strip("$").strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\%", "").replace("\\$", "")
    s = s.replace("$", "").replace("%", "").replace(",", "").replace(" ", "")
    s = s.replace("−", "-")  # unicode minus
    s = s.rstrip(".")
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    if not s:
        return None
    if _NUM_RE.match(s):
        try:
            return Fraction(Decimal(s))
        except (InvalidOperation, ValueError):
            return None
    m = _FRAC_RE.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    m = _LATEX_FRAC_RE.match(s)
    if m and int(m.group(3)) != 0:
        value = Fraction(int(m.group(2)), int(m.group(3)))
        return -value if m.group(1) == "-" else value
    return None


def numbers_equal(a: str | None, b: str | None, rel_tol: float = 0.0) -> bool:
    """True when both parse as numbers (see `parse_number`) and are equal (exactly, or within rel_tol)."""
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    if rel_tol <= 0:
        return x == y
    return abs(x - y) <= Fraction(rel_tol) * max(abs(x), abs(y))
