"""The paper's prompts for GSM8K and MATH (Ji et al. 2024, see docs/dqo-math.md in the shared docs).

The instruction is appended to the problem on a new line; the result is the single user turn that the
model's chat template wraps (templating is the tokenizer's job, see `dqo_megatron.data.tokenize`).
"""

from __future__ import annotations

TASKS = ("gsm8k", "math")
"""Task names understood by the prompt builders and the answer checkers."""

GSM8K_INSTRUCTION = "Please reason step by step, and produce a final answer following 4 '#', like '#### 0'."
"""Instruction appended to a GSM8K question (verbatim from the paper)."""

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Instruction appended to a MATH problem (verbatim from the paper)."""

_INSTRUCTIONS = {"gsm8k": GSM8K_INSTRUCTION, "math": MATH_INSTRUCTION}


def check_task(task: str) -> str:
    """Return `task` lower-cased if it is a known task name; raise ValueError naming the choices."""
    name = str(task).lower()
    if name not in _INSTRUCTIONS:
        raise ValueError(f"unknown task {task!r}: choose one of {list(TASKS)}")
    return name


def build_prompt(task: str, problem: str) -> str:
    """The user message for one problem: `"{problem}\\n{instruction}"`.

    Args:
        task: "gsm8k" or "math".
        problem: the question text (GSM8K `question`, MATH `problem`).
    Returns:
        The prompt text, before any chat template.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError("problem must be a non-empty string")
    return f"{problem}\n{_INSTRUCTIONS[check_task(task)]}"


def build_messages(task: str, problem: str, system: str | None = None) -> list[dict[str, str]]:
    """The prompt as chat messages (`[{"role": "user", "content": ...}]`, optionally after a system turn).

    The paper uses no system prompt; `system` exists for models whose template requires one.
    """
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": build_prompt(task, problem)})
    return messages
