"""Token log-probs on one process: from logits (full vocab, chunked) and fused from hidden states,
against plain `log_softmax` on the full vocabulary; values and gradients."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.logprobs import auto_chunk_size, token_logprobs_from_hidden, token_logprobs_from_logits
from tests.logprobs.reference import random_case, reference_logprobs


def _grad(out: torch.Tensor, inputs, upstream: torch.Tensor):
    return torch.autograd.grad((out * upstream.to(out.dtype)).sum(), inputs)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 100])
def test_from_logits_equals_log_softmax_fp64(chunk_size):
    case = random_case(2, 7, 37)
    logits = case["logits"].clone().requires_grad_()
    before = logits.detach().clone()
    out = token_logprobs_from_logits(logits, case["labels"], chunk_size=chunk_size)
    ref = reference_logprobs(logits, case["labels"])
    assert out.dtype == torch.float64 and out.shape == (2, 7)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    (got,), (want,) = _grad(out, logits, case["grad"]), _grad(ref, logits, case["grad"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(logits.detach(), before), "input logits were modified"
    # Invalid labels: exactly 0 and no gradient into that row.
    assert out[0, 1].item() == 0.0 and out[-1, -1].item() == 0.0
    assert got[0, 1].abs().max().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_logits_low_precision_computes_in_fp32(dtype):
    case = random_case(2, 9, 41, seed=1)
    logits = case["logits"].to(dtype).requires_grad_()
    before = logits.detach().clone()
    out = token_logprobs_from_logits(logits, case["labels"], chunk_size=4)
    assert out.dtype == torch.float32
    # The reference sees exactly the same (rounded) logits, in fp64: any gap is our fp32 arithmetic.
    ref = reference_logprobs(logits.detach().double().requires_grad_(), case["labels"])
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    (got,) = _grad(out, logits, case["grad"])
    assert got.dtype == dtype
    leaf = logits.detach().double().requires_grad_()
    (want,) = _grad(reference_logprobs(leaf, case["labels"]), leaf, case["grad"])
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 gradient: 8 mantissa bits
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert torch.equal(logits.detach(), before)


def test_from_logits_chunked_equals_unchunked_fp32():
    case = random_case(3, 16, 64, seed=2)
    results = []
    for chunk in (None, 5):
        logits = case["logits"].float().requires_grad_()
        out = token_logprobs_from_logits(logits, case["labels"], chunk_size=chunk)
        results.append((out.detach(), _grad(out, logits, case["grad"])[0]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-7)


def test_from_logits_rejects_bad_shapes():
    with pytest.raises(ValueError):
        token_logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError):
        token_logprobs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4, dtype=torch.long), chunk_size=0)


def _fused_reference(hidden_sbh, weight, labels):
    logits = torch.einsum("sbh,vh->bsv", hidden_sbh.double(), weight.double())
    return reference_logprobs(logits, labels)


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("layout", ["sbh", "bsh"])
def test_fused_from_hidden_equals_log_softmax_of_matmul(chunk_size, layout):
    case = random_case(2, 9, 31, hidden=8, seed=3)
    hidden_sbh = case["hidden"]
    given = hidden_sbh if layout == "sbh" else hidden_sbh.transpose(0, 1).contiguous()
    hidden = given.clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    before = (hidden.detach().clone(), weight.detach().clone())
    out = token_logprobs_from_hidden(hidden, weight, case["labels"], chunk_size=chunk_size, layout=layout)
    h_ref = given.clone().requires_grad_()
    w_ref = case["weight"].clone().requires_grad_()
    ref = _fused_reference(h_ref if layout == "sbh" else h_ref.transpose(0, 1), w_ref, case["labels"])
    assert out.shape == (2, 9) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    got, want = _grad(out, (hidden, weight), case["grad"]), _grad(ref, (h_ref, w_ref), case["grad"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    assert torch.equal(hidden.detach(), before[0]) and torch.equal(weight.detach(), before[1])


def test_fused_fp32_and_bf16_weights():
    case = random_case(1, 12, 50, hidden=16, seed=4)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        hidden = case["hidden"].to(dtype).requires_grad_()
        weight = case["weight"].to(dtype).requires_grad_()
        out = token_logprobs_from_hidden(hidden, weight, case["labels"], chunk_size=5)
        assert out.dtype == torch.float32
        # Reference: logits rounded to the weight dtype (as the output layer would produce them).
        h_ref = hidden.detach().double().requires_grad_()
        w_ref = weight.detach().double().requires_grad_()
        logits = torch.einsum("sbh,vh->bsv", h_ref, w_ref)
        ref = reference_logprobs(logits, case["labels"])
        torch.testing.assert_close(out.double(), ref, rtol=0, atol=tol * 4)
        got, want = _grad(out, (hidden, weight), case["grad"]), _grad(ref, (h_ref, w_ref), case["grad"])
        for g, w in zip(got, want):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


def test_fused_accumulates_into_main_grad_like_megatron():
    case = random_case(2, 6, 23, hidden=8, seed=5)
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    w_ref = case["weight"].clone().requires_grad_()
    ref = _fused_reference(hidden.detach(), w_ref, case["labels"])
    (want,) = _grad(ref, w_ref, case["grad"])
    earlier = torch.randn(weight.shape, dtype=torch.float64)
    weight.main_grad = earlier.clone()
    weight.grad_added_to_main_grad = False  # what Megatron DDP sets
    out = token_logprobs_from_hidden(hidden, weight, case["labels"], chunk_size=2, accumulate_into_main_grad=True)
    (out * case["grad"]).sum().backward()
    torch.testing.assert_close(weight.main_grad, earlier + want, rtol=0, atol=1e-12)
    assert weight.grad_added_to_main_grad is True  # DDP's hook will not add weight.grad a second time
    with pytest.raises(ValueError, match="main_grad"):
        token_logprobs_from_hidden(hidden, case["weight"].clone(), case["labels"], accumulate_into_main_grad=True)


def test_fused_weight_frozen_gives_hidden_grad_only():
    case = random_case(1, 5, 19, hidden=4, seed=6)
    hidden = case["hidden"].clone().requires_grad_()
    out = token_logprobs_from_hidden(hidden, case["weight"], case["labels"], chunk_size=2)
    (g,) = _grad(out, hidden, case["grad"])
    h_ref = case["hidden"].clone().requires_grad_()
    (want,) = _grad(_fused_reference(h_ref, case["weight"], case["labels"]), h_ref, case["grad"])
    torch.testing.assert_close(g, want, rtol=0, atol=1e-12)


def test_auto_chunk_size_keeps_chunk_bytes_constant():
    assert auto_chunk_size(1, 32_768) == 1024
    assert auto_chunk_size(1, 152_064) == 220
    assert auto_chunk_size(4, 152_064) == 55
    assert auto_chunk_size(1, 10**9) == 1
