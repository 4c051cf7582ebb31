"""A stub generation backend whose completions are a known function of (prompt, prefix, seed, sample)."""

from __future__ import annotations

from typing import Callable, Sequence

from dqo_megatron.rollout.backend import Completion, SamplingParams

CompletionFn = Callable[[object, str, int, int, SamplingParams], str]
"""(prompt, prefix, seed, sample index, params) -> completion text."""


class StubBackend:
    """Implements `GenerationBackend` with a pure function; records every call for assertions."""

    name = "stub"
    tokenizer_name = "stub-tokenizer"

    def __init__(self, fn: CompletionFn, finish_reason: str = "eos") -> None:
        self.fn = fn
        self.finish_reason = finish_reason
        self.calls: list[dict] = []
        self.closed = False

    def generate(
        self, prompts: Sequence, params: SamplingParams, *, seeds: Sequence[int], prefixes: Sequence[str] | None = None
    ) -> list[list[Completion]]:
        """params.n completions per prompt from `fn`; greedy calls must ask for n = 1."""
        assert len(seeds) == len(prompts)
        assert prefixes is None or len(prefixes) == len(prompts)
        assert not params.greedy or params.n == 1
        self.calls.append(
            {
                "prompts": list(prompts),
                "prefixes": None if prefixes is None else list(prefixes),
                "seeds": list(seeds),
                "params": params,
            }
        )
        out = []
        for i, prompt in enumerate(prompts):
            prefix = "" if prefixes is None else prefixes[i]
            out.append(
                [
                    Completion(
                        text=self.fn(prompt, prefix, seeds[i], j, params),
                        token_ids=[1],
                        logprobs=[-0.5],
                        sampled_logprobs=[-0.4],
                        finish_reason=self.finish_reason,
                    )
                    for j in range(params.n)
                ]
            )
        return out

    @property
    def generated(self) -> int:
        """Completions produced so far."""
        return sum(len(c["prompts"]) * c["params"].n for c in self.calls)

    def close(self) -> None:
        """Mark closed (eval closes backends it built)."""
        self.closed = True
