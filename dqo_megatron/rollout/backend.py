"""One interface for every generation backend (vLLM, transformers, the Megatron model itself).

Rollouts, synthetic process scores and evaluation all call `GenerationBackend.generate`: a batch of
prompts (text or chat messages, framed exactly as `dqo_megatron.data.tokenize.Tokenizer` frames them,
so that recorded token log-probs line up with what preprocessing tokenizes), an optional response
prefix per prompt (process scores continue a response from a step boundary), `SamplingParams`, and one
seed per prompt (so a prompt's samples do not depend on what else is in the batch: a resumed rollout
reproduces exactly the samples it lost).

Per generated token a backend reports two log-probs:

    logprobs          log p_theta(token | context)           the raw model (temperature 1, full vocab)
    sampled_logprobs  log q(token | context)                 the distribution actually sampled from:
                                                             softmax(logits / T) restricted to top-k,
                                                             then to top-p, renormalized (0.0 for greedy)

The rollout writes `logprobs` (raw) as the records' `behavior_logprobs` by default: DQO's behavior
policy is the reference model that sampled, and with raw log-probs the importance weight is exactly 1
at training step 0 when the policy starts from that model; `sampled_logprobs` would make it shrink
with response length. See docs/rollout.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

Prompt = "str | list[dict[str, str]]"


@dataclass(frozen=True)
class SamplingParams:
    """How to decode. temperature 0 means greedy (then top_k/top_p are ignored and n must be 1)."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1.0 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off). Applied before top_p."""
    max_new_tokens: int = 512
    """Longest response in tokens (EOS included)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends after the token that completes one (the string is kept)."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n={self.n}: must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

    @property
    def greedy(self) -> bool:
        """True when decoding is greedy (temperature 0)."""
        return self.temperature == 0


@dataclass
class Completion:
    """One generated continuation of one prompt (after its optional response prefix)."""

    text: str
    """Decoded continuation, without EOS (and without the prefix)."""
    token_ids: list[int] = field(default_factory=list)
    """Generated token ids, EOS included when it was produced."""
    logprobs: list[float] = field(default_factory=list)
    """Raw model log-prob of each generated token."""
    sampled_logprobs: list[float] = field(default_factory=list)
    """Log-prob of each generated token under the distribution sampled from (0.0 when greedy)."""
    finish_reason: str = "eos"
    """"eos", "length" (max_new_tokens reached) or "stop" (a stop string)."""


@runtime_checkable
class GenerationBackend(Protocol):
    """What rollout, process-scores and eval need from a generator."""

    name: str
    """Backend name for logs and records ("transformers", "vllm", "megatron", "stub", ...)."""
    tokenizer_name: str
    """Recorded as `behavior_tokenizer` (what preprocessing compares with its tokenizer's name)."""

    def generate(
        self, prompts: Sequence, params: SamplingParams, *, seeds: Sequence[int], prefixes: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """`params.n` completions per prompt: result[i][j] is sample j of prompts[i].

        prompts: text or chat messages, len B. seeds: one int per prompt, len B; the same (prompt,
        prefix, seed, params) gives the same completions whatever the batch. prefixes: optional
        response text per prompt that the completions continue (not repeated in `text`).
        """
        ...

    def close(self) -> None:
        """Free the model (GPU memory, worker processes)."""
        ...
