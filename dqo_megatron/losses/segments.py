"""Where the documents are in a `[batch, seq]` row, and sums along them without Python loops over tokens.

A row may hold padding (left or right), prompt tokens, and the response tokens of one or several packed
documents. Only the response mask and (optionally) per-token document ids matter here:

* the response tokens of a document form a *chain*: each masked position points to the next masked
  position of the same row if that one carries the same document id, otherwise the chain ends there;
* unmasked positions (padding, prompts, tool output in the middle of a response) are skipped over, so
  a document's response tokens need not be adjacent, only not interleaved with another document's.

Every per-document quantity the losses need (lambda-returns, prefix and total log-ratios, lengths)
is a first-order linear recurrence along a chain, `y_t = c_t + a_t * y_(t +- 1)`. Each step is an affine
map, and affine maps compose associatively, so a doubling (Hillis-Steele) scan solves the recurrence
for the whole tensor in ceil(log2(seq)) vectorized steps. Unlike a cumulative sum followed by a
subtraction, this never cancels large partial sums, and it runs without a device synchronization.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def affine_scan(c: Tensor, a: Tensor, *, reverse: bool) -> Tensor:
    """Solve `y_t = c_t + a_t * y_(t+1)` (reverse) or `y_t = c_t + a_t * y_(t-1)` (forward) along the
    last dimension, with `y = 0` beyond the edge.

    Shapes: `c`, `a` `[..., seq]` -> `y` `[..., seq]`. Differentiable in `c` and `a`.
    After the step with span `k`, `(a_t, c_t)` is the composition of the maps `t .. t+-(k-1)`:
    `y_t = c_t + a_t * y_(t+-k)`; doubling `k` until it covers the row leaves `y_t = c_t`.
    """
    seq = c.shape[-1]
    span = 1
    while span < seq:
        # (far) = the composed map that starts `span` positions further along the recurrence.
        pad = (0, span) if reverse else (span, 0)
        keep = slice(span, None) if reverse else slice(None, seq - span)
        c_far = F.pad(c[..., keep], pad)
        a_far = F.pad(a[..., keep], pad)
        c = c + a * c_far
        a = a * a_far
        span *= 2
    return c


class ResponseSegments:
    """The document chains of a batch: built once per batch, shared by every loss term.

    Args:
        response_mask: bool `[batch, seq]`, True on response tokens.
        document_ids: optional integer `[batch, seq]`; neighbouring documents in a row must differ.
            None: each row holds one document.
    """

    def __init__(self, response_mask: Tensor, document_ids: Optional[Tensor] = None):
        mask = response_mask
        batch, seq = mask.shape
        position = torch.arange(seq, device=mask.device).expand(batch, seq)

        # Nearest masked position strictly after / before t (seq / -1 where there is none).
        at_or_after = torch.where(mask, position, seq).flip(-1).cummin(-1).values.flip(-1)
        next_position = F.pad(at_or_after[:, 1:], (0, 1), value=seq)
        at_or_before = torch.where(mask, position, -1).cummax(-1).values
        previous_position = F.pad(at_or_before[:, :-1], (1, 0), value=-1)

        has_next = mask & (next_position < seq)
        has_previous = mask & (previous_position >= 0)
        next_position = next_position.clamp(max=seq - 1)
        previous_position = previous_position.clamp(min=0)
        if document_ids is not None:
            has_next &= document_ids.gather(1, next_position) == document_ids
            has_previous &= document_ids.gather(1, previous_position) == document_ids

        self.mask = mask
        self.next_position = next_position
        self.has_next = has_next
        self.has_previous = has_previous
        self.is_first = mask & ~has_previous
        self.is_last = mask & ~has_next

    def next_value(self, x: Tensor) -> Tensor:
        """`x` at the next response position of the same document, 0 after a document's last token."""
        return torch.where(self.has_next, x.gather(1, self.next_position), torch.zeros_like(x))

    def discounted_suffix_sum(self, c: Tensor, discount: float) -> Tensor:
        """`y_h = c_h + discount * y_(h+1)` along each document, `y` after its last token = 0."""
        zero = torch.zeros_like(c)
        c = torch.where(self.mask, c, zero)
        # Unmasked positions are identity maps (a=1, c=0): they hand the next document token through.
        a = torch.where(self.mask, self.has_next.to(c.dtype) * discount, torch.ones_like(c))
        return torch.where(self.mask, affine_scan(c, a, reverse=True), zero)

    def prefix_sum(self, x: Tensor) -> Tensor:
        """Inclusive sum of `x` over the document's response tokens up to and including h."""
        zero = torch.zeros_like(x)
        c = torch.where(self.mask, x, zero)
        a = torch.where(self.mask, self.has_previous.to(x.dtype), torch.ones_like(x))
        return torch.where(self.mask, affine_scan(c, a, reverse=False), zero)

    def document_total(self, x: Tensor) -> Tensor:
        """Sum of `x` over the whole document, written on every response token of that document."""
        total_at_last = torch.where(self.is_last, self.prefix_sum(x), torch.zeros_like(x))
        # Carry the last token's value back along the chain (a=1 inside a document, 0 at its end).
        return self.discounted_suffix_sum(total_at_last, 1.0)

    def document_length(self, dtype: torch.dtype) -> Tensor:
        """Number of response tokens of the document, on every response token (0 elsewhere)."""
        return self.document_total(self.mask.to(dtype))

    def num_tokens(self) -> Tensor:
        return self.mask.sum()

    def num_documents(self) -> Tensor:
        return self.is_last.sum()

    def per_document(self, x: Tensor) -> Tensor:
        """Compact `[num_documents]` view of a per-document quantity written on every token (e.g. a
        `document_total`), in row-major order of the documents. Synchronizes (data-dependent size)."""
        return x[self.is_last]


def document_ids_from_cu_seqlens(cu_seqlens: Tensor, seq_len: int) -> Tensor:
    """Per-token document ids `[1, seq_len]` for one packed row (Megatron's THD layout).

    `cu_seqlens` `[num_documents + 1]` holds the cumulative document lengths starting at 0 (as in
    `PackedSeqParams`); token t belongs to document i when `cu_seqlens[i] <= t < cu_seqlens[i+1]`.
    Tokens at or after `cu_seqlens[-1]` (tail padding) get id `num_documents`.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D and non-empty, got shape {tuple(cu_seqlens.shape)}")
    position = torch.arange(seq_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(position.dtype), position, right=True).unsqueeze(0)
