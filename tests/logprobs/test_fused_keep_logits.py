"""Keeping the single chunk's logits for backward (keep_logits) gives the recomputed path's gradients."""

import torch

from dqo_megatron.logprobs import token_logprobs_from_hidden


def test_keep_logits_equals_recompute():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 3, 16, generator=gen, dtype=torch.float64)
    weight = torch.randn(40, 16, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 40, (3, 12), generator=gen)
    grads = []
    for keep in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = token_logprobs_from_hidden(h, w, labels, chunk_size=64, keep_logits=keep)
        (out * torch.linspace(-1, 1, 36, dtype=torch.float64).view(3, 12)).sum().backward()
        grads.append((out.detach(), h.grad, w.grad))
    for kept, recomputed in zip(*grads):
        torch.testing.assert_close(kept, recomputed, rtol=1e-12, atol=1e-12)
    expected = (
        torch.log_softmax(torch.einsum("sbh,vh->sbv", hidden, weight), -1).gather(-1, labels.t()[..., None])[..., 0].t()
    )
    torch.testing.assert_close(grads[0][0], expected)
