"""Sampling from a Megatron GPTModel in one process (TP=PP=1): greedy or temperature/top-k/top-p.

A plain loop that re-runs the whole prefix each step (no KV cache): meant for tiny models on CPU
(tests, the CPU demo, checking what a trained policy answers) and for the rollout's `megatron`
backend (checkpoints that were never exported), not for rollouts at scale (use the vLLM or
transformers backends). Rows of equal length run as one batch (the samples of one prompt always
do). The token choice and both log-probs come from `dqo_megatron.rollout.sampling`, shared with the
other backends: per token the log-prob of the raw model and of the distribution actually sampled
from (after temperature and top-k/top-p); importance sampling wants the latter.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from dqo_megatron.rollout.sampling import draw_uniforms, row_generators, sample_seed, sample_step


@dataclass
class Generation:
    """One sampled continuation."""

    tokens: list[int]
    """Generated token ids (EOS included when produced)."""
    logprobs: list[float]
    """log p(token) under the raw model (temperature 1, full vocabulary)."""
    sampled_logprobs: list[float]
    """log p(token) under the distribution sampled from (temperature, top-k, top-p applied; 0 when greedy)."""


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | Sequence[int],
    vocab_size: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    seeds: Sequence[int] | None = None,
    stop: Callable[[int, list[int]], bool] | None = None,
    max_batch: int = 64,
) -> list[Generation]:
    """Continue each prompt until EOS, `stop` or `max_new_tokens`.

    Args:
        model: a GPTModel (TP=PP=1) returning logits ``[b, s, V']``; logits beyond `vocab_size`
          (padding rows) are ignored.
        prompts: token ids per row (a prompt sampled n times is given n times, with n seeds).
        eos_id: the id (or ids) that end a row; it is included in `tokens`.
        temperature: 0 = greedy.
        seed: rows without `seeds` use `sample_seed(seed, row index)`.
        seeds: one seed per row: a row's samples depend on its seed only, not on the other rows.
        stop: ``stop(row, generated_tokens) -> bool``, checked after each token (e.g. stop strings).
        max_batch: most rows per forward pass.
    Returns:
        One `Generation` per row, in order.
    """
    from dqo_megatron.models.value_head import unwrap_gpt

    gpt = unwrap_gpt(model)
    was_training = gpt.training
    gpt.eval()
    if seeds is None:
        seeds = [sample_seed(seed, i) for i in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    eos = {int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id}
    gens = row_generators(seeds)
    device = next(gpt.parameters()).device
    rows = [list(p) for p in prompts]
    out = [Generation([], [], []) for _ in prompts]
    active = list(range(len(prompts))) if max_new_tokens > 0 else []
    try:
        while active:
            by_length: dict[int, list[int]] = defaultdict(list)
            for i in active:
                by_length[len(rows[i])].append(i)
            active = []
            for length, group in by_length.items():
                for start in range(0, len(group), max_batch):
                    chunk = group[start : start + max_batch]
                    ids = torch.tensor([rows[i] for i in chunk], device=device)
                    positions = torch.arange(length, device=device).expand(len(chunk), -1)
                    logits = gpt(ids, positions, None)[:, -1, :vocab_size]
                    step = sample_step(logits, draw_uniforms([gens[i] for i in chunk]), temperature, top_k, top_p)
                    tokens, raw, sampled = (t.tolist() for t in (step.tokens, step.logprobs, step.sampled_logprobs))
                    for k, i in enumerate(chunk):
                        res = out[i]
                        res.tokens.append(tokens[k])
                        res.logprobs.append(raw[k])
                        res.sampled_logprobs.append(sampled[k])
                        rows[i].append(tokens[k])
                        done = (
                            tokens[k] in eos
                            or len(res.tokens) >= max_new_tokens
                            or (stop is not None and stop(i, res.tokens))
                        )
                        if not done:
                            active.append(i)
    finally:
        gpt.train(was_training)
    return out
