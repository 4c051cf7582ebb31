"""An independent, deliberately plain implementation of the sampled distribution (for checks only).

q = softmax(logits / T) restricted to the top-k tokens (ties with the k-th kept), then to the smallest
prefix (by decreasing probability) whose mass reaches top_p, renormalized. Float64, Python loops,
no code shared with dqo_megatron.rollout.sampling.
"""

from __future__ import annotations

import math

import torch


def reference_logq(logits, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """{token: log q(token)} over the support of q, for one row of logits (any sequence of floats)."""
    z = [float(v) / temperature for v in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    if 0 < top_k < len(z):
        kth = z[order[top_k - 1]]
        order = [i for i in order if z[i] >= kth]
    m = max(z[i] for i in order)
    total = sum(math.exp(z[i] - m) for i in order)
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= top_p:
            break
        kept.append(i)
        mass += math.exp(z[i] - m) / total
    lse = m + math.log(sum(math.exp(z[i] - m) for i in kept))
    return {i: z[i] - lse for i in kept}


def reference_token_logprobs(logits: torch.Tensor, tokens, temperature: float, top_k: int, top_p: float):
    """Raw and processed log-probs of `tokens` given `logits` ``[n, V]`` (position t predicts tokens[t]).

    Returns two lists of floats; processed is 0.0 under greedy and -inf outside the support.
    """
    lg = logits.double()
    raw = torch.log_softmax(lg, -1)
    raws, procs = [], []
    for t, tok in enumerate(tokens):
        raws.append(float(raw[t, tok]))
        if temperature == 0:
            procs.append(0.0)
        else:
            procs.append(reference_logq(lg[t].tolist(), temperature, top_k, top_p).get(int(tok), float("-inf")))
    return raws, procs
