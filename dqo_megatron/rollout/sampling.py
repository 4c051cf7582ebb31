"""Temperature / top-k / top-p sampling, once for every backend, with raw and processed log-probs.

The distribution sampled from (what the rollout's `--behavior-logprobs sampled` records; the default
records the raw log-probs, see docs/rollout.md) is

    q(. | context) = softmax(logits / T) restricted to the top-k tokens, then to the top-p nucleus,
                     renormalized

in that order (vLLM's and Hugging Face's order). Per generated token the backends report two
log-probs: ``raw = log_softmax(logits)[token]`` (the model itself, temperature 1, full vocabulary)
and ``sampled = log q(token)`` (0.0 under greedy decoding, which is deterministic).

Randomness is per row: each row (one sample of one prompt) owns a CPU `torch.Generator` seeded from
(the prompt's seed, the sample's index), and a token is drawn by inverting the CDF of q with one
uniform number from that generator. So a row's tokens depend on its own seed and logits only, never
on which other rows share the batch, the device, or the order rows finish in.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

_SEED_MASK = (1 << 63) - 1


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (ints, strings): sha256 of their repr, so it is stable across runs,
    processes and Python versions (unlike `hash`)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _SEED_MASK


def sample_seed(prompt_seed: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of a prompt whose seed is `prompt_seed` (sample j does not depend on n)."""
    return derive_seed("sample", int(prompt_seed), int(sample_index))


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per row, seeded with `seeds[i]`."""
    return [torch.Generator().manual_seed(int(s) & _SEED_MASK) for s in seeds]


def draw_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One uniform number in [0, 1) per generator: float64 ``[N]`` on the CPU.

    Every row draws exactly one number per generated token, whether greedy or not, so a row's stream
    only depends on how many tokens it generated.
    """
    return (
        torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        if generators
        else torch.empty(0, dtype=torch.float64)
    )


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits of the distribution sampled from: ``logits / T``, then -inf outside the top-k, then outside
    the top-p nucleus.

    Args:
        logits: ``[..., V]`` raw logits (any float dtype; computed in float32).
        temperature: > 0 (greedy has no processed distribution).
        top_k: keep the k largest (0 = off; ties with the k-th are kept too).
        top_p: keep the smallest set of most likely tokens whose mass (after top-k) reaches top_p
          (1.0 = off): a token is kept when the mass of the tokens ranked before it is < top_p.
    Returns:
        ``[..., V]`` in float32 (float64 stays float64); ``log_softmax`` of it is log q.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: processed logits need temperature > 0 (greedy is argmax)")
    out = _at_least_fp32(logits) / temperature
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked strictly before each one
        drop = before >= top_p
        drop[..., 0] = False  # the most likely token is always kept
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        out = torch.full_like(out, float("-inf")).scatter(-1, order, sorted_logits)
    return out


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 logits are processed in float32; float64 (exactness tests) is kept
    return x if x.dtype == torch.float64 else x.float()


@dataclass
class Step:
    """One generated token per row."""

    tokens: torch.Tensor
    """int64 ``[N]`` sampled (or argmax) token ids."""
    logprobs: torch.Tensor
    """``[N]`` raw log-probs ``log_softmax(logits)[token]`` (float32, or float64 for float64 logits)."""
    sampled_logprobs: torch.Tensor
    """``[N]`` log q(token); 0.0 when greedy."""


class NonFiniteLogitsError(ValueError):
    """The model produced NaN/inf logits: its weights (or its dtype's range) are broken, and whatever it
    would generate from them is noise, so generation stops instead of scoring it."""


def check_finite_logits(logits: torch.Tensor) -> None:
    """Raise `NonFiniteLogitsError` (naming how many rows) when `logits` ``[N, V]`` hold NaN or inf."""
    bad = ~torch.isfinite(logits)
    if bool(bad.any()):
        rows = int(bad.any(dim=-1).sum())
        raise NonFiniteLogitsError(
            f"the model produced non-finite logits (NaN/inf) for {rows} of {logits.shape[0]} "
            "rows: its weights are damaged or overflow their dtype; check the checkpoint "
            "(convert/export --verify checks it)"
        )


def check_finite_logprobs(rows: Sequence[Sequence[float]], source: str) -> None:
    """Raise `NonFiniteLogitsError` when a per-token log-prob of `rows` is NaN or +-inf (a sampled token
    always has a finite log-prob, so such values mean non-finite logits inside an engine, e.g. vLLM)."""
    bad = sum(1 for row in rows if not all(math.isfinite(v) for v in row))
    if bad:
        raise NonFiniteLogitsError(
            f"{source} returned non-finite log-probs (NaN/inf) for {bad} of {len(rows)} "
            "samples: the model's weights are damaged or overflow their dtype; check the "
            "checkpoint (convert/export --verify checks it)"
        )


def sample_step(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> Step:
    """Pick the next token of each row and report its raw and processed log-probs.

    Args:
        logits: ``[N, V]`` next-token logits (padding vocabulary rows already cut off).
        uniforms: float64 ``[N]`` in [0, 1), one per row (`draw_uniforms`); unused when greedy.
        temperature: 0 = greedy (argmax of the raw logits, first index on ties).
    Returns:
        A `Step` on the logits' device. Raises `NonFiniteLogitsError` on NaN/inf logits (a broken
        model's argmax is index 0 and its samples noise: an eval would score them as wrong answers).
    """
    check_finite_logits(logits)
    logits = _at_least_fp32(logits)
    raw = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        tokens = torch.argmax(logits, dim=-1)
        sampled = torch.zeros(tokens.shape, dtype=raw.dtype, device=logits.device)
    else:
        logq = torch.log_softmax(process_logits(logits, temperature, top_k, top_p), dim=-1)
        # inverse CDF in float64: token i is chosen when cdf[i-1] <= u * total < cdf[i]; a token of
        # probability 0 has cdf[i] == cdf[i-1] and is never chosen
        cdf = logq.double().exp().cumsum(-1)
        target = uniforms.to(cdf.device, torch.float64) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, target[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
        sampled = logq.gather(-1, tokens[:, None])[:, 0]
    return Step(tokens, raw.gather(-1, tokens[:, None])[:, 0], sampled)


def sequence_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw and processed log-probs of given tokens from logits computed in one forward pass.

    Args:
        logits: ``[..., V]`` the logits that predict each token (position t predicts tokens[t]).
        tokens: int ``[...]`` the tokens.
    Returns:
        ``(raw, processed)``, ``[...]`` each (float32, or float64 for float64 logits); processed is 0.0
        when greedy.
    """
    logits = _at_least_fp32(logits)
    idx = tokens.long().unsqueeze(-1)
    raw = torch.log_softmax(logits, dim=-1).gather(-1, idx).squeeze(-1)
    if temperature <= 0:
        return raw, torch.zeros_like(raw)
    processed = torch.log_softmax(process_logits(logits, temperature, top_k, top_p), dim=-1).gather(-1, idx).squeeze(-1)
    return raw, processed
