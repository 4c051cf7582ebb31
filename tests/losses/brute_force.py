"""Independent brute-force references for the loss package, and random test batches.

Everything here loops over documents and tokens in Python and follows the definitions in
shared/docs/dqo-math.md literally (explicit n-step returns, explicit sums), never the library's
recursions or scans. Documents are found by grouping the response positions of a row by document id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# ---------------------------------------------------------------------------------------------------
# Random batches. A row is a list of pieces: ("pad", n), ("prompt", n, doc) or ("response", n, doc);
# a response piece may be split by ("gap", n, doc) (unmasked tokens of the same document).


@dataclass
class Batch:
    mask: torch.Tensor  # float64 0/1 [B, T]
    document_ids: Optional[torch.Tensor]  # int64 [B, T] or None
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    behavior_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor

    def tensors(self) -> dict:
        return dict(
            logprobs=self.logprobs,
            ref_logprobs=self.ref_logprobs,
            behavior_logprobs=self.behavior_logprobs,
            values=self.values,
            rewards=self.rewards,
        )


LAYOUTS = {
    # right padding, different lengths, one row with a single response token
    "right": [
        [("prompt", 2, 0), ("response", 5, 0), ("pad", 3)],
        [("prompt", 1, 0), ("response", 9, 0)],
        [("prompt", 3, 0), ("response", 1, 0), ("pad", 6)],
        [("prompt", 4, 0), ("response", 3, 0), ("pad", 3)],
    ],
    # left padding, responses run to the end of the row
    "left": [
        [("pad", 3), ("prompt", 2, 0), ("response", 5, 0)],
        [("prompt", 1, 0), ("response", 9, 0)],
        [("pad", 5), ("prompt", 2, 0), ("response", 3, 0)],
    ],
    # several documents per row; a row of padding only; the first row has no padding between documents
    "packed": [
        [("prompt", 1, 0), ("response", 3, 0), ("prompt", 2, 1), ("response", 4, 1), ("response", 2, 2)],
        [("prompt", 2, 5), ("response", 2, 5), ("prompt", 1, 7), ("response", 1, 7), ("pad", 6)],
        [("pad", 12)],
        [("pad", 2), ("prompt", 2, 3), ("response", 6, 3), ("prompt", 1, 4), ("response", 1, 4)],
    ],
    # unmasked tokens (e.g. tool output) in the middle of a response, packed
    "gaps": [
        [
            ("prompt", 1, 0),
            ("response", 2, 0),
            ("gap", 2, 0),
            ("response", 3, 0),
            ("prompt", 1, 1),
            ("response", 2, 1),
            ("pad", 1),
        ],
        [
            ("prompt", 2, 2),
            ("response", 1, 2),
            ("gap", 1, 2),
            ("response", 1, 2),
            ("gap", 3, 2),
            ("response", 2, 2),
            ("pad", 2),
        ],
    ],
}


def build_mask(rows: list, packed: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    length = sum(piece[1] for piece in rows[0])
    mask = torch.zeros(len(rows), length, dtype=torch.float64)
    docs = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        assert sum(piece[1] for piece in row) == length
        t = 0
        for piece in row:
            kind, n = piece[0], piece[1]
            if kind == "response":
                mask[b, t : t + n] = 1
            if kind != "pad":
                docs[b, t : t + n] = piece[2]
            t += n
    return mask, (docs if packed else None)


def random_batch(layout: str, seed: int, *, process_rewards: bool = True) -> Batch:
    rows = LAYOUTS[layout]
    mask, docs = build_mask(rows, packed=layout in ("packed", "gaps"))
    g = torch.Generator().manual_seed(seed)
    shape = mask.shape
    logprobs = -3.0 * torch.rand(shape, generator=g, dtype=torch.float64)
    ref_logprobs = logprobs + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    behavior_logprobs = logprobs + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    rewards = torch.zeros(shape, dtype=torch.float64)
    if process_rewards:
        rewards = torch.where(torch.rand(shape, generator=g) < 0.2, 0.5, 0.0).to(torch.float64)
    # 0/1 outcome reward on each document's last response token.
    for b, positions in documents(mask, docs):
        rewards[b, positions[-1]] += float(torch.rand((), generator=g) < 0.5)
    return Batch(mask, docs, logprobs, ref_logprobs, behavior_logprobs, values, rewards)


# ---------------------------------------------------------------------------------------------------
# References.


def documents(mask: torch.Tensor, document_ids: Optional[torch.Tensor]) -> list[tuple[int, list[int]]]:
    """(row, response positions) of every document, grouped by document id within each row."""
    found = []
    for b in range(mask.shape[0]):
        groups: dict[int, list[int]] = {}
        for t in range(mask.shape[1]):
            if mask[b, t] == 1:
                doc = 0 if document_ids is None else int(document_ids[b, t])
                groups.setdefault(doc, []).append(t)
        found.extend((b, positions) for positions in groups.values())
    return found


def lambda_returns(rewards, logprobs, ref_logprobs, values, mask, document_ids, beta, lam) -> torch.Tensor:
    """G_h = (1-lam) sum_{n=1}^{H-h} lam^(n-1) G^(n)_h + lam^(H-h) G^(H-h+1)_h with explicit n-step sums."""
    returns = torch.zeros(mask.shape, dtype=torch.float64)
    for b, positions in documents(mask, document_ids):
        horizon = len(positions)
        shaped = [float(rewards[b, p]) - beta * (float(logprobs[b, p]) - float(ref_logprobs[b, p])) for p in positions]
        value = [float(values[b, p]) for p in positions] + [0.0]  # V_(H+1) = 0

        for k in range(horizon):  # k = h - 1

            def n_step(n):
                return sum(shaped[k : k + n]) + value[k + n]

            longest = horizon - k  # the Monte-Carlo n
            total = (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, longest))
            total += lam ** (longest - 1) * n_step(longest)
            returns[b, positions[k]] = total
    return returns


@dataclass
class Weights:
    weights: torch.Tensor
    mean: float
    max: float
    truncated_fraction: float


def importance_weights(
    logprobs, behavior_logprobs, mask, document_ids, level, clip, self_normalize, reduction
) -> Weights:
    weights = torch.zeros(mask.shape, dtype=torch.float64)
    truncated = 0
    docs = documents(mask, document_ids)
    for b, positions in docs:
        log_ratio = [float(logprobs[b, p]) - float(behavior_logprobs[b, p]) for p in positions]
        for k, p in enumerate(positions):
            if level == "off":
                raw = 1.0
            elif level == "trajectory":
                raw = math.exp(sum(log_ratio))
            else:
                raw = math.exp(sum(log_ratio[: k + 1]))
            truncated += raw > clip
            weights[b, p] = min(raw, clip)
    tokens = [w for b, positions in docs for w in weights[b, positions].tolist()]
    n = max(len(tokens), 1)
    stats = dict(mean=sum(tokens) / n, max=max(tokens, default=0.0), truncated_fraction=truncated / n)
    if self_normalize and docs:
        if reduction == "token":
            normalizer = sum(tokens) / len(tokens)
        else:
            normalizer = sum(float(weights[b, positions].mean()) for b, positions in docs) / len(docs)
        weights = weights / normalizer
    return Weights(weights=weights, **stats)


def _reduce(per_document_terms: list[list], reduction: str):
    """token: mean over all terms; sequence: mean over documents of the document's mean."""
    if reduction == "token":
        terms = [t for doc in per_document_terms for t in doc]
        return sum(terms) / max(len(terms), 1)
    means = [sum(doc) / len(doc) for doc in per_document_terms]
    return sum(means) / max(len(means), 1)


def dqo(
    batch: Batch,
    logprobs,
    values,
    *,
    beta,
    lam,
    is_level,
    is_clip,
    self_normalize,
    reduction,
    behavior_logprobs=None,
    is_apply_to="both",
) -> dict:
    """DQO losses as autograd scalars (from `logprobs` and `values` leaves), plus metrics."""
    mask, docs_ids = batch.mask, batch.document_ids
    ref, rewards = batch.ref_logprobs, batch.rewards
    behavior = ref if behavior_logprobs is None else behavior_logprobs
    G = lambda_returns(rewards, logprobs.detach(), ref, values.detach(), mask, docs_ids, beta, lam)
    iw = importance_weights(logprobs.detach(), behavior, mask, docs_ids, is_level, is_clip, self_normalize, reduction)
    policy_terms, value_terms = [], []
    td_errors, token_values, token_returns, log_ratios, logps = [], [], [], [], []
    lp, vals = logprobs.detach(), values.detach()  # plain numbers for everything without gradient
    for b, positions in documents(mask, docs_ids):
        policy_doc, value_doc = [], []
        for k, p in enumerate(positions):
            last = k + 1 == len(positions)
            next_return = 0.0 if last else float(G[b, positions[k + 1]])
            next_value = 0.0 if last else float(vals[b, positions[k + 1]])
            w = float(iw.weights[b, p])
            w_policy = w if is_apply_to in ("both", "policy") else 1.0
            w_value = w if is_apply_to in ("both", "value") else 1.0
            q = beta * (logprobs[b, p] - ref[b, p]) + float(vals[b, p]) - rewards[b, p] - next_return
            policy_doc.append(w_policy * 0.5 * q**2)
            value_doc.append(w_value * 0.5 * (values[b, p] - float(G[b, p])) ** 2)
            shaped = float(rewards[b, p]) - beta * (float(lp[b, p]) - float(ref[b, p]))
            td_errors.append(abs(shaped + next_value - float(vals[b, p])))
            token_values.append(float(vals[b, p]))
            token_returns.append(float(G[b, p]))
            log_ratios.append(float(lp[b, p]) - float(ref[b, p]))
            logps.append(float(lp[b, p]))
        policy_terms.append(policy_doc)
        value_terms.append(value_doc)
    n = max(len(logps), 1)
    return dict(
        policy_loss=_reduce(policy_terms, reduction),
        value_loss=_reduce(value_terms, reduction),
        returns=G,
        weights=iw.weights,
        metrics=dict(
            value_mean=sum(token_values) / n,
            td_error_abs_mean=sum(td_errors) / n,
            return_mean=sum(token_returns) / n,
            is_weight_mean=iw.mean,
            is_weight_max=iw.max,
            return_sq_mean=sum(g * g for g in token_returns) / n,
            advantage_mean=sum(g - v for g, v in zip(token_returns, token_values)) / n,
            advantage_sq_mean=sum((g - v) ** 2 for g, v in zip(token_returns, token_values)) / n,
            is_truncated_frac=iw.truncated_fraction,
            kl_ref=sum(log_ratios) / n,
            entropy_proxy=-sum(logps) / n,
        ),
    )


def dro(batch: Batch, logprobs, values, *, beta) -> dict:
    policy, value = [], []
    for b, positions in documents(batch.mask, batch.document_ids):
        reward = sum(float(batch.rewards[b, p]) for p in positions)
        log_ratio = sum(logprobs[b, p] - batch.ref_logprobs[b, p] for p in positions)
        prompt_value = values[b, positions[0]]
        policy.append(0.5 * (reward - float(prompt_value.detach()) - beta * log_ratio) ** 2)
        value.append(0.5 * (reward - prompt_value - beta * float(log_ratio.detach())) ** 2)
    return dict(policy_loss=sum(policy) / len(policy), value_loss=sum(value) / len(value))


def sequence_sums(x, mask, document_ids) -> list:
    return [sum(x[b, p] for p in positions) for b, positions in documents(mask, document_ids)]


def dpo(chosen, ref_chosen, rejected, ref_rejected, beta):
    terms = [
        -torch.log(torch.sigmoid(beta * ((cw - rw) - (cl - rl))))
        for cw, rw, cl, rl in zip(chosen, ref_chosen, rejected, ref_rejected)
    ]
    return sum(terms) / len(terms)


def kto(policy, ref, desirable, policy_kl, ref_kl, beta, desirable_weight, undesirable_weight):
    z0 = max(0.0, sum(float(p.detach()) - float(r) for p, r in zip(policy_kl, ref_kl)) / len(policy_kl))
    terms = []
    for p, r, good in zip(policy, ref, desirable):
        reward = p - r
        if good:
            terms.append(desirable_weight - desirable_weight * torch.sigmoid(beta * (reward - z0)))
        else:
            terms.append(undesirable_weight - undesirable_weight * torch.sigmoid(beta * (z0 - reward)))
    return sum(terms) / len(terms), z0


def nll(logprobs, mask, document_ids, reduction, keep=lambda b, positions: True):
    terms = [
        [-logprobs[b, p] for p in positions] for b, positions in documents(mask, document_ids) if keep(b, positions)
    ]
    return _reduce(terms, reduction)
