"""Independent references for the log-prob tests: plain `log_softmax` over the full vocabulary."""

from __future__ import annotations

import torch


def reference_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[label]`` in fp64 over the full vocabulary ``[b, s, V]``; 0 where the label is
    outside ``[0, V)``. Differentiable."""
    vocab = logits.shape[-1]
    valid = (labels >= 0) & (labels < vocab)
    logp = torch.log_softmax(logits.double(), dim=-1)
    picked = logp.gather(-1, labels.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, 0.0)


def random_case(
    b: int, s: int, vocab: int, hidden: int = 0, *, seed: int = 0, dtype=torch.float64, invalid: bool = True
) -> dict:
    """Same tensors on every rank (seeded): logits ``[b, s, V]`` with a wide spread, labels with a few
    -100 holes, an upstream gradient ``[b, s]``, and (with `hidden`) hidden ``[s, b, h]`` and weight
    ``[V, h]``."""
    gen = torch.Generator().manual_seed(seed)
    case = {
        "logits": (torch.randn(b, s, vocab, generator=gen, dtype=torch.float64) * 4).to(dtype),
        "labels": torch.randint(0, vocab, (b, s), generator=gen),
        "grad": torch.randn(b, s, generator=gen, dtype=torch.float64),
    }
    if invalid:
        case["labels"][0, 1] = -100
        case["labels"][-1, -1] = vocab + 3
    if hidden:
        case["hidden"] = torch.randn(s, b, hidden, generator=gen, dtype=torch.float64).to(dtype)
        case["weight"] = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(dtype)
    return case
