"""Log-probs over a padded output layer (Megatron's make_vocab_size_divisible_by): given the real
`vocab_size`, the rows past it carry no probability mass and no gradient, so log pi equals the unpadded
model's. Checked against `log_softmax` over the real vocabulary only, in one process and under TP=2
(including a rank whose whole shard is padding), for both the from-logits and the fused path."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron import parallel
from dqo_megatron.config import ParallelConfig
from dqo_megatron.logprobs import token_logprobs_from_hidden, token_logprobs_from_logits
from tests.helpers.distributed import run_distributed
from tests.logprobs.reference import random_case, reference_logprobs

B, S, H = 2, 8, 12


def _padded(case: dict, vocab: int, padded: int) -> dict:
    """The case's logits and weight padded from `vocab` to `padded` columns / rows with values that would
    matter if they were counted (a padding row of a converted checkpoint is zero; trained, anything)."""
    extra = padded - vocab
    gen = torch.Generator().manual_seed(5)
    logits = torch.cat([case["logits"], torch.randn(B, S, extra, generator=gen, dtype=torch.float64) * 4], dim=-1)
    weight = torch.cat([case["weight"], torch.randn(extra, H, generator=gen, dtype=torch.float64)], dim=0)
    return {"logits": logits, "weight": weight}


def _deviations(vocab: int, padded: int, shard: slice, group=None) -> dict:
    case = random_case(B, S, vocab, hidden=H, seed=13)
    labels, upstream = case["labels"], case["grad"]
    pad = _padded(case, vocab, padded)
    logits = case["logits"].clone().requires_grad_()
    want = reference_logprobs(logits, labels)
    (want_grad,) = torch.autograd.grad((want * upstream).sum(), logits)
    dev = {}
    for chunk in (None, 3):
        local = pad["logits"][..., shard].clone().requires_grad_()
        out = token_logprobs_from_logits(local, labels, tp_group=group, chunk_size=chunk, vocab_size=vocab)
        (grad,) = torch.autograd.grad((out * upstream).sum(), local)
        full_grad = torch.cat([want_grad, torch.zeros(B, S, padded - vocab, dtype=torch.float64)], dim=-1)
        dev[f"logits_chunk{chunk}"] = (out - want).abs().max().item()
        dev[f"logits_chunk{chunk}_grad"] = (grad - full_grad[..., shard]).abs().max().item()
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    want_h = reference_logprobs(torch.einsum("sbh,vh->bsv", hidden, weight), labels)
    want_gh, want_gw = torch.autograd.grad((want_h * upstream).sum(), (hidden, weight))
    for chunk in (None, 3):
        h = case["hidden"].clone().requires_grad_()
        w = pad["weight"][shard].clone().requires_grad_()
        out = token_logprobs_from_hidden(h, w, labels, tp_group=group, chunk_size=chunk, vocab_size=vocab)
        grad_h, grad_w = torch.autograd.grad((out * upstream).sum(), (h, w))
        full_gw = torch.cat([want_gw, torch.zeros(padded - vocab, H, dtype=torch.float64)], dim=0)
        dev[f"fused_chunk{chunk}"] = (out - want_h).abs().max().item()
        dev[f"fused_chunk{chunk}_grad_hidden"] = (grad_h - want_gh).abs().max().item()
        dev[f"fused_chunk{chunk}_grad_weight"] = (grad_w - full_gw[shard]).abs().max().item()
    return dev


def test_padding_rows_carry_no_mass_in_one_process():
    dev = _deviations(vocab=46, padded=64, shard=slice(None))
    assert max(dev.values()) < 1e-12, dev


def test_without_vocab_size_the_padding_counts():
    """The reason for the argument: the same padded logits without it give other log-probs."""
    case = random_case(B, S, 46, hidden=H, seed=13)
    pad = _padded(case, 46, 64)
    out = token_logprobs_from_logits(pad["logits"], case["labels"])
    assert (out - reference_logprobs(case["logits"], case["labels"])).abs().max().item() > 1e-3


def _tp2_body(vocab: int, padded: int) -> dict:
    from megatron.core import parallel_state as ps

    parallel.initialize(ParallelConfig(tensor_model_parallel_size=2))
    rank = ps.get_tensor_model_parallel_rank()
    shard = slice(rank * padded // 2, (rank + 1) * padded // 2)
    return _deviations(vocab, padded, shard, ps.get_tensor_model_parallel_group())


@pytest.mark.parametrize("vocab, padded", [(46, 64), (30, 64)], ids=["padding-in-rank1", "rank1-all-padding"])
def test_padding_rows_carry_no_mass_under_tp2(vocab, padded):
    for rank, dev in enumerate(run_distributed(_tp2_body, 2, vocab, padded, timeout=120)):
        assert max(dev.values()) < 1e-12, (rank, dev)


def _policy_value_body() -> dict:
    from dqo_megatron.config import ModelConfig
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.training.policy_value import PolicyValueModel

    parallel.initialize(ParallelConfig(), seed=3)
    cfg = ModelConfig(
        family="llama", num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, vocab_size=50
    )
    cfg.make_vocab_size_divisible_by = 64  # 14 padding rows
    (policy,) = build_model_chunks(cfg, ParallelConfig())
    with torch.no_grad():  # padding rows as a trained model may have them: they must still not count
        policy.output_layer.weight[50:].normal_(0, 1.0)
    model = PolicyValueModel(policy, value_head=False, vocab_size=50)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(12).expand(2, 12)
    labels = torch.roll(tokens, -1, dims=1)
    with torch.no_grad():
        got = model(tokens, positions, labels)[..., 0]
        logits = policy(tokens, positions, None)  # [b, s, 64]
    assert logits.shape[-1] == 64
    want = reference_logprobs(logits[..., :50].double(), labels)
    unmasked = reference_logprobs(logits.double(), labels)
    return {
        "masked": (got.double() - want).abs().max().item(),
        "unmasked": (got.double() - unmasked).abs().max().item(),
    }


def test_policy_value_model_scores_a_padded_gpt_like_its_unpadded_logits():
    (dev,) = run_distributed(_policy_value_body, 1, timeout=120)
    assert dev["masked"] < 1e-5 and dev["unmasked"] > 1e-3, dev
