"""The demo's synthetic reasoning task: column addition with carries, written step by step.

    Problem   What is 47+38?
    Solution  7+8+0=15          one line per column, right to left: digit + digit + carry-in = sum
              4+3+1=8           the carry-in is the tens digit of the previous line's sum
              #### 85           the last sum, then the other sums' units digits, left to right

The record format is GSM8K's (`question`, `answer` ending in `#### N`), so rollout, labeling,
process scores and eval treat it exactly like GSM8K. The step that matters is the carry: a line
that writes carry-in 0 after a sum >= 10 dooms the answer, however right the later lines are.

Imperfect demonstrations: the supervised warm-up imitates solutions that *forget the carry* with
probability `carry_drop` each time one is due. With carry_drop > 0.5 the warmed-up policy's most
likely step is the wrong one, so its greedy answers are right only on problems without any carry
(about 55% of 2-digit problems) while its samples are right sometimes when a carry is due: exactly
the situation where learning from its own rewarded samples (DQO, DRO) should help.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class AdditionTask:
    """Column addition of two `digits`-digit numbers."""

    digits: int = 2
    """Digits per operand (2: 10..99 + 10..99)."""
    carry_drop: float = 0.6
    """Probability that a demonstration forgets a due carry (writes carry-in 0)."""

    def __post_init__(self) -> None:
        if not 1 <= self.digits <= 6:
            raise ValueError(f"digits={self.digits}: choose 1..6")
        if not 0.0 <= self.carry_drop <= 1.0:
            raise ValueError(f"carry_drop={self.carry_drop}: must be in [0, 1]")

    def sample(self, rng: random.Random) -> tuple[int, int]:
        """Two operands, each with exactly `digits` digits."""
        lo = 10 ** (self.digits - 1)
        return rng.randrange(lo, 10 * lo), rng.randrange(lo, 10 * lo)

    @staticmethod
    def question(a: int, b: int) -> str:
        """The problem text."""
        return f"What is {a}+{b}?"

    def solution(self, a: int, b: int, rng: random.Random | None = None) -> str:
        """The step-by-step solution; with `rng`, each due carry is forgotten with prob. `carry_drop`.

        The final answer is assembled from the written lines, so a forgotten carry gives a wrong but
        self-consistent answer (as a person making that mistake would write).
        """
        da, db = str(a).zfill(self.digits)[::-1], str(b).zfill(self.digits)[::-1]
        carry, lines, sums = 0, [], []
        for i in range(self.digits):
            total = int(da[i]) + int(db[i]) + carry
            lines.append(f"{da[i]}+{db[i]}+{carry}={total}")
            sums.append(total)
            carry = total // 10
            if carry and rng is not None and rng.random() < self.carry_drop:
                carry = 0
        answer = str(sums[-1]) + "".join(str(s % 10) for s in reversed(sums[:-1]))
        return "\n".join(lines) + f"\n#### {answer}"

    def carries(self, a: int, b: int) -> int:
        """Number of carries the correct solution makes (into columns that exist)."""
        return sum(1 for line in self.solution(a, b).splitlines()[1:-1] if "+1=" in line)


def make_problems(task: AdditionTask, count: int, seed: int, exclude: set[tuple[int, int]] = frozenset()):
    """`count` distinct problems (a, b) drawn with `seed`, none in `exclude`."""
    rng = random.Random(seed)
    space = (9 * 10 ** (task.digits - 1)) ** 2 - len(exclude)
    if count > space:
        raise ValueError(f"asked for {count} distinct {task.digits}-digit problems; only {space} exist")
    seen: set[tuple[int, int]] = set()
    out = []
    while len(out) < count:
        p = task.sample(rng)
        if p not in seen and p not in exclude:
            seen.add(p)
            out.append(p)
    return out


def write_problems(task: AdditionTask, problems, path: str | Path) -> Path:
    """GSM8K-format JSONL (`id`, `question`, `answer` = the correct solution) that `load_problems` reads."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for a, b in problems:
            f.write(
                json.dumps({"id": f"{a}+{b}", "question": task.question(a, b), "answer": task.solution(a, b)}) + "\n"
            )
    return path


def write_demonstrations(task: AdditionTask, problems, path: str | Path, seed: int) -> tuple[Path, float]:
    """Trajectory records of imperfect demonstrations for the SFT warm-up; returns (path, fraction correct).

    Each record: the paper's GSM8K prompt, a solution that forgets due carries with prob.
    `carry_drop`, and its true reward (SFT imitates all of them; the reward is kept for honesty).
    """
    from dqo_megatron.tasks.grading import check_answer
    from dqo_megatron.tasks.prompts import build_prompt

    rng = random.Random(seed)
    path, right = Path(path), 0
    with open(path, "w", encoding="utf-8") as f:
        for a, b in problems:
            response = task.solution(a, b, rng)
            ok = check_answer("gsm8k", response, task.solution(a, b)).correct
            right += ok
            f.write(
                json.dumps(
                    {
                        "prompt": build_prompt("gsm8k", task.question(a, b)),
                        "response": response,
                        "reward": float(ok),
                        "prompt_id": f"{a}+{b}",
                        "task": "gsm8k",
                        "source": "demo-demonstrations",
                    }
                )
                + "\n"
            )
    return path, right / max(len(problems), 1)


def tokenizer_corpus(task: AdditionTask, problems) -> list[str]:
    """Texts the demo's sentencepiece tokenizer is trained on: prompts and correct solutions."""
    from dqo_megatron.tasks.prompts import build_prompt

    texts = []
    for a, b in problems:
        texts += [build_prompt("gsm8k", task.question(a, b)), task.solution(a, b)]
    return texts


def train_tokenizer(texts: list[str], path: str | Path, vocab_size: int = 128) -> Path:
    """Train a BPE sentencepiece model on `texts` and write it to `path` (a `.model` file).

    Digits are split (one token each, so arithmetic is per digit), newlines are kept as a token
    (they end reasoning steps), and the text is not normalized (decode(encode(x)) == x).
    Ids: 0 pad, 1 BOS, 2 EOS, 3 unk.
    """
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        character_coverage=1.0,
        minloglevel=2,
    )
    path = Path(path)
    path.write_bytes(buf.getvalue())
    return path


def sequence_lengths(task: AdditionTask, sp) -> tuple[int, int]:
    """(tokens per training row, longest generated answer) that the task needs under tokenizer `sp`.

    The longest prompt and correct solution are those of the largest operands (every column carries).
    Answers may run longer than the correct solution (a wrong sum can take more tokens), so generation
    allows 1.5x its length; a row holds BOS + prompt + that many tokens + one more position (where a
    length-truncated answer's next-state value is read), rounded up to a multiple of 8.
    """
    from dqo_megatron.tasks.prompts import build_prompt

    largest = 10**task.digits - 1
    prompt = 1 + len(sp.encode(build_prompt("gsm8k", task.question(largest, largest))))
    answer = len(sp.encode(task.solution(largest, largest))) + 1
    max_new = answer + answer // 2 + 2
    return -(-(prompt + max_new + 1) // 8) * 8, max_new
