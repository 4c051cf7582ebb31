"""Math tasks of the paper: prompts, final-answer extraction and answer checking (GSM8K, MATH).

prompts     the paper's instructions; `build_prompt`, `build_messages`
answers     `extract_gsm8k_answer` (`#### N`), `extract_boxed` (last `\\boxed{}`/`\\fbox{}`), numbers
math_equiv  math_verify with a per-comparison timeout that works in threads and worker processes
grading     `check_answer(task, response, reference) -> Verdict`
label       add rewards to a record file (`dqo-megatron label`)
"""

from dqo_megatron.tasks.answers import extract_boxed, extract_gsm8k_answer, numbers_equal, parse_number
from dqo_megatron.tasks.grading import Verdict, check_answer, reference_answer
from dqo_megatron.tasks.math_equiv import Equivalence, math_answers_equal
from dqo_megatron.tasks.prompts import GSM8K_INSTRUCTION, MATH_INSTRUCTION, TASKS, build_messages, build_prompt

__all__ = [
    "GSM8K_INSTRUCTION",
    "MATH_INSTRUCTION",
    "TASKS",
    "build_messages",
    "build_prompt",
    "extract_boxed",
    "extract_gsm8k_answer",
    "numbers_equal",
    "parse_number",
    "Equivalence",
    "math_answers_equal",
    "Verdict",
    "check_answer",
    "reference_answer",
]
