"""Sampling from a Megatron GPTModel in one process (TP=PP=1): greedy or temperature/top-k/top-p.

A plain loop that re-runs the whole prefix each step (no KV cache): meant for tiny models on CPU
(tests, the CPU demo, checking what a trained policy answers), not for rollouts at scale (the
rollout issue brings vLLM / transformers backends). Returns the sampled tokens and, per token, the
log-prob of the raw model and of the distribution actually sampled from (after temperature and
top-k/top-p): importance sampling wants the latter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """One sampled continuation."""

    tokens: list[int]
    """Generated token ids (EOS included when produced)."""
    logprobs: list[float]
    """log p(token) under the raw model (temperature 1, full vocabulary)."""
    sampled_logprobs: list[float]
    """log p(token) under the distribution sampled from (temperature, top-k, top-p applied)."""


def _filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def generate(model, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, vocab_size: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[Generation]:  # fmt: skip
    """Continue each prompt until EOS or `max_new_tokens`.

    model: a GPTModel (TP=PP=1) returning logits ``[b, s, V']``; logits beyond `vocab_size` (padding
    rows) are ignored. temperature 0 = greedy. Prompts of different lengths are run one by one.
    """
    from dqo_megatron.models.value_head import unwrap_gpt

    gpt = unwrap_gpt(model)
    was_training = gpt.training
    gpt.eval()
    gen = torch.Generator().manual_seed(seed)
    device = next(gpt.parameters()).device
    out = []
    for prompt in prompts:
        tokens = list(prompt)
        result = Generation([], [], [])
        for _ in range(max_new_tokens):
            ids = torch.tensor([tokens], device=device)
            positions = torch.arange(len(tokens), device=device)[None]
            logits = gpt(ids, positions, None)[0, -1, :vocab_size].float().cpu()
            raw = torch.log_softmax(logits, -1)
            if temperature <= 0:
                token = int(torch.argmax(logits))
                sampled = 0.0
            else:
                dist = torch.log_softmax(_filter(logits / temperature, top_k, top_p), -1)
                token = int(torch.multinomial(dist.exp(), 1, generator=gen))
                sampled = float(dist[token])
            result.tokens.append(token)
            result.logprobs.append(float(raw[token]))
            result.sampled_logprobs.append(sampled)
            tokens.append(token)
            if token == eos_id:
                break
        out.append(result)
    gpt.train(was_training)
    return out
