"""MATH answer equivalence through `math_verify`, with a per-comparison timeout that works anywhere.

math_verify times out with `signal.alarm`, which only works in a process's main thread and silently
clobbers any timer the caller armed (pytest-timeout, a trainer's watchdog). We therefore switch its own
timeouts off and wrap each comparison (parse gold, parse prediction, verify) in our own deadline:

* main thread (the usual case, including multiprocessing pool workers): an `ITIMER_REAL` deadline
  that restores the caller's SIGALRM handler and re-arms the caller's remaining timer afterwards;
* any other thread (a DataLoader thread, a thread pool): the comparison runs in a persistent helper
  subprocess (`python -m dqo_megatron.tasks._mv_child`, started with `subprocess`, so it also works
  inside daemonic pool workers), which uses the signal deadline itself; the caller additionally kills
  and restarts it if it does not answer within the timeout plus a start-up margin;
* math_verify not importable, or the helper cannot start: a normalized string comparison, reported
  with its own reason so that it is never mistaken for a real check.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

log = logging.getLogger(__name__)

HELPER_START_MARGIN_S = 30.0
"""Extra seconds the helper subprocess gets over the comparison timeout (it imports sympy on start)."""


@dataclass(frozen=True)
class Equivalence:
    """Outcome of one comparison.

    equal: whether the prediction was judged equal to the gold answer.
    reason: "exact" (identical after whitespace normalization), "math_verify" (judged by math_verify,
      equal or not), "timeout", "error", or "string_fallback" (math_verify unavailable).
    """

    equal: bool
    reason: str


class _Deadline(BaseException):
    """Raised by our SIGALRM handler; a BaseException so that math_verify's `except Exception` lets it pass."""


class _SilenceTimeoutWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


_mv = None  # (parse, verify) once imported; False when not importable


def _math_verify():
    global _mv
    if _mv is None:
        try:
            from math_verify import parse, verify

            for name in ("math_verify.parser", "math_verify.grader"):
                logging.getLogger(name).addFilter(_SilenceTimeoutWarning())
            _mv = (parse, verify)
        except Exception as exc:  # ImportError, or a broken install
            log.warning("math_verify unavailable (%s); MATH answers fall back to string comparison", exc)
            _mv = False
    return _mv


def normalize_latex(s: str) -> str:
    """Whitespace-free, `\\left`/`\\right`/`\\!`/`\\dfrac`/`\\tfrac`-free form of a LaTeX answer (string fallback)."""
    s = re.sub(r"\\(left|right|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    return re.sub(r"\s+", "", s).strip("$").rstrip(".")


def _can_use_signals() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


@contextmanager
def _signal_deadline(seconds: float):
    """Raise _Deadline in the main thread after `seconds`; restore the caller's handler and timer after."""
    state = {"armed": True}

    def handler(signum, frame):
        if state["armed"]:
            state["armed"] = False
            raise _Deadline()

    old_handler = signal.getsignal(signal.SIGALRM)
    old_delay, old_interval = signal.getitimer(signal.ITIMER_REAL)
    start = time.monotonic()
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds if old_delay <= 0 else min(seconds, old_delay))
    try:
        yield
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler if old_handler is not None else signal.SIG_DFL)
        if old_delay > 0:
            # the caller's own timer keeps running: re-arm what is left of it (fire promptly if spent)
            remaining = old_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3), old_interval)


def _wrap(answer: str) -> str:
    # math_verify's LaTeX extractor gives \boxed{} the highest priority, so a boxed bare answer is
    # parsed as one expression rather than split at commas/"and".
    return "\\boxed{" + answer + "}"


def _compare_here(gold: str, pred: str, timeout_s: float) -> Equivalence:
    mv = _math_verify()
    if mv is False:
        return Equivalence(normalize_latex(gold) == normalize_latex(pred), "string_fallback")
    parse, verify = mv
    try:
        with _signal_deadline(timeout_s):
            g = parse(_wrap(gold), parsing_timeout=None)
            p = parse(_wrap(pred), parsing_timeout=None)
            ok = bool(verify(g, p, timeout_seconds=None))
        return Equivalence(ok, "math_verify")
    except _Deadline:
        return Equivalence(False, "timeout")
    except Exception as exc:  # math_verify normally swallows its errors; be as careful if it does not
        log.debug("math_verify failed on %r vs %r: %s", gold, pred, exc)
        return Equivalence(False, "error")


class _Helper:
    """A persistent `python -m dqo_megatron.tasks._mv_child` answering one JSON line per comparison."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ)
        env.setdefault("PYTHONPATH", "")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env["PYTHONPATH"] else "")
        return subprocess.Popen(
            [sys.executable, "-m", "dqo_megatron.tasks._mv_child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            bufsize=1,
            env=env,
        )

    def _kill(self) -> None:
        if self._proc is not None:
            try:
                self._proc.kill()
                self._proc.wait(timeout=5)
            except Exception:
                pass
            self._proc = None

    def compare(self, gold: str, pred: str, timeout_s: float) -> Equivalence:
        with self._lock:
            if self._pid != os.getpid():  # inherited through fork: the pipe belongs to the parent
                self._proc, self._pid = None, os.getpid()
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._proc = self._start()
                assert self._proc.stdin is not None and self._proc.stdout is not None
                self._proc.stdin.write(json.dumps({"gold": gold, "pred": pred, "timeout": timeout_s}) + "\n")
                self._proc.stdin.flush()
                line = _readline_with_timeout(self._proc, timeout_s + HELPER_START_MARGIN_S)
            except OSError as exc:
                log.warning("math_verify helper process failed (%s); using string comparison", exc)
                self._kill()
                return Equivalence(normalize_latex(gold) == normalize_latex(pred), "string_fallback")
            if line is None:
                self._kill()
                return Equivalence(False, "timeout")
            reply = json.loads(line)
            return Equivalence(bool(reply["equal"]), str(reply["reason"]))


def _readline_with_timeout(proc: subprocess.Popen, timeout_s: float) -> str | None:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive() or not box or not box[0]:
        return None
    return box[0]


_helper = _Helper()


def math_answers_equal(gold: str, pred: str, timeout_s: float = 5.0, exact_shortcut: bool = True) -> Equivalence:
    """Is the predicted final answer `pred` mathematically equal to the reference `gold`?

    Args:
        gold: reference answer, LaTeX without the surrounding `\\boxed{}` (MATH's `answer` field).
        pred: extracted final answer of a response (content of its last `\\boxed{}`).
        timeout_s: wall-clock limit for parsing both and comparing (seconds, > 0).
        exact_shortcut: accept identical strings (after whitespace normalization) without math_verify.
    Returns:
        An `Equivalence` (equal, reason); a timeout or error counts as not equal.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if exact_shortcut and re.sub(r"\s+", "", gold) == re.sub(r"\s+", "", pred):
        return Equivalence(True, "exact")
    if _can_use_signals():
        return _compare_here(gold, pred, timeout_s)
    return _helper.compare(gold, pred, timeout_s)
