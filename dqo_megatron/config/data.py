"""What a run reads: the training data, the initial weights, and the held-out problems it evaluates on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dqo_megatron.config.loader import raise_problems


@dataclass
class DataConfig:
    """Training data: a preprocessed trajectory dataset (`dqo-megatron preprocess`)."""

    train_prefix: Optional[str] = None
    """Output prefix given to preprocess (<prefix>.json and <prefix>_*.bin/.idx)."""
    shuffle: bool = True
    """Shuffle documents each epoch (seeded by train.seed)."""
    reference: Literal["auto", "data", "model"] = "auto"
    """Where reference log-probs come from: data (filled by `dqo-megatron annotate`), model (a frozen
    reference held in the run, forward only), auto (data when the dataset has them, else model)."""
    pad_id: int = 0
    """Token id written into padding (masked out of every loss)."""
    reference_offload: bool = False
    """Keep a reference model held in the run on the CPU between its forward passes (saves accelerator
    memory at the cost of a copy per micro-batch; no effect on CPU)."""
    allow_tokenizer_mismatch: bool = False
    """Train or annotate although the dataset was tokenized by another tokenizer than the model's (its
    manifest's tokenizer hash differs from that of an init checkpoint's hf/ or of eval.tokenizer) or
    with a larger vocabulary than model.vocab_size: only for data whose ids you know mean the same to
    the model. Token ids outside the model's vocabulary are refused regardless (docs/data.md)."""


@dataclass
class InitConfig:
    """Where the models' initial weights come from (directories written by `dqo-megatron convert`)."""

    policy: Optional[str] = None
    """Megatron checkpoint of the policy (None: random init from train.seed, for tests and demos)."""
    reference: Optional[str] = None
    """Checkpoint of the frozen reference (None: the policy's initial weights, the paper's setting)."""
    value: Optional[str] = None
    """Checkpoint of the value network's trunk (None: a copy of the policy's initial weights); its scalar
    head starts at zero (value.head_init_std)."""


@dataclass
class TrainEvalConfig:
    """Held-out accuracy measured during training, and the checkpoint it picks (docs/training.md)."""

    problems: Optional[str] = None
    """Problems file (GSM8K/MATH-style JSONL or a saved HF dataset; see `tasks.datasets.load_problems`).
    Use a validation split disjoint from the test set you report: the best checkpoint is picked on it."""
    interval: int = 0
    """Evaluate (greedy) every this many steps from the step the policy starts moving (0, or after
    value.warmup_steps) to the last step, and save a checkpoint at each evaluated step (0: off). Needs
    TP = PP = CP = 1 (the problems are split over data-parallel ranks); larger layouts evaluate saved
    checkpoints with `dqo-megatron eval`."""
    limit: int = 0
    """Evaluate this many problems, evenly spread over the file (0: all)."""
    task: Optional[Literal["gsm8k", "math"]] = None
    """Answer format of the problems (None: guessed from the path)."""
    max_new_tokens: int = 256
    """Longest greedy answer, EOS included."""
    tokenizer: Optional[str] = None
    """Tokenizer (HF directory or sentencepiece .model) to frame prompts and decode answers with.
    None: the `hf/` directory of init.policy (a `convert hf-to-megatron` checkpoint)."""
    batch_size: int = 64
    """Rows per forward pass of the (cache-less) greedy decoder."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("interval", "limit"):
            if getattr(self, name) < 0:
                problems.append(f"eval.{name}={getattr(self, name)} must be >= 0")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"eval.{name}={getattr(self, name)} must be >= 1")
        if self.interval and not self.problems:
            problems.append("eval.interval is set but eval.problems is not: name a held-out problems file")
        raise_problems(problems)
