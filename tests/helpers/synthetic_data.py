"""A small trajectory dataset written straight into the indexed format (no tokenizer needed)."""

from __future__ import annotations

import numpy as np

from dqo_megatron.data.indexed import TrajectoryWriter
from dqo_megatron.data.tokenize import TokenizedSample


def write_synthetic_dataset(
    prefix: str, *, docs: int = 16, vocab: int = 256, max_len: int = 33, seed: int = 0, behavior: bool = True
) -> str:
    """`docs` documents (4 per prompt) of random tokens, 0/1 outcome rewards, some process rewards."""
    rng = np.random.default_rng(seed)
    writer = TrajectoryWriter(prefix, vocab)
    for d in range(docs):
        length = int(rng.integers(max_len // 2, max_len + 1))
        prompt = int(rng.integers(3, length // 2))
        tokens = rng.integers(3, vocab, size=length).astype(np.int64)
        rewards = np.zeros(length, np.float32)
        outcome = float(rng.integers(0, 2))
        rewards[-1] = outcome
        if d % 3 == 0:
            rewards[(prompt + length) // 2] = 0.5
        blp = None
        if behavior and d % 4 != 3:  # some documents without sampler log-probs
            blp = np.zeros(length, np.float32)
            blp[prompt:] = -rng.uniform(4.5, 6.5, size=length - prompt)
        sample = TokenizedSample(
            tokens=tokens,
            prompt_length=prompt,
            rewards=rewards,
            behavior_logprobs=blp,
            prompt_id=f"p{d // 4}",
            outcome_reward=outcome,
            correct=int(outcome),
        )
        writer.add(sample, 0)
    writer.finalize({"tokenizer": "synthetic"})
    return prefix
