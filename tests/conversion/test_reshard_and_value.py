"""A converted checkpoint saved under one layout loads under another with identical logits; value
checkpoints (trunk copied, scalar head zero or taken from another value checkpoint)."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.config import ParallelConfig
from tests.conversion.ranks import (
    convert_rank,
    hf_reference_logits,
    last_stage_logits,
    layout_logits,
    tiny_hf_model,
    value_rank,
    write_value_ckpt_with_head,
)
from tests.helpers.distributed import run_distributed


def _convert(variant: str, tmp_path_factory):
    root = tmp_path_factory.mktemp(variant)
    model = tiny_hf_model(variant)
    model.save_pretrained(root / "hf")
    run_distributed(convert_rank, 1, str(root / "hf"), str(root / "meg"))
    return model, root


@pytest.fixture(scope="module", params=["llama_gqa_untied", "qwen2_gqa_bias_tied"])
def policy(request, tmp_path_factory):
    """(HF model, converted Megatron checkpoint dir) for an untied and a tied model (under PP=2 the tied
    output layer is a copy of the embedding on the last stage)."""
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen2_policy(tmp_path_factory):
    """A converted Qwen2 (QKV bias, tied) for the value-checkpoint tests."""
    return _convert("qwen2_gqa_bias_tied", tmp_path_factory)


def test_saved_at_tp2_loads_at_tp1_pp2_and_tp1_with_identical_logits(policy, tmp_path):
    model, root = policy
    resaved = tmp_path / "tp2_weights"
    tp2 = run_distributed(
        layout_logits, 2, str(root / "meg"), ParallelConfig(tensor_model_parallel_size=2), save_to=str(resaved)
    )
    # the re-saved checkpoint directory: same metadata, the TP=2 weights
    ckpt = tmp_path / "tp2_ckpt"
    ckpt.mkdir()
    for name in ("checkpoint.json", "model_config.yaml"):
        (ckpt / name).write_bytes((root / "meg" / name).read_bytes())
    resaved.rename(ckpt / "weights")

    pp2 = run_distributed(layout_logits, 2, str(ckpt), ParallelConfig(pipeline_model_parallel_size=2))
    (tp1,) = run_distributed(layout_logits, 1, str(ckpt), ParallelConfig())
    (original,) = run_distributed(layout_logits, 1, str(root / "meg"), ParallelConfig())
    assert {r["pp_rank"] for r in pp2} == {0, 1}
    # weights survive TP=1 -> TP=2 -> TP=1 bit for bit (the vocabulary of 101 is padded to 102 under TP=2)
    assert tp1["params"].keys() == original["params"].keys()
    for name, tensor in original["params"].items():
        assert torch.equal(tp1["params"][name], tensor), name
    # each pipeline stage holds its own layers, equal to the TP=1 ones
    assert not pp2[0]["params"].keys() & {k for k in pp2[1]["params"] if k.startswith("decoder.layers")}
    for stage in pp2:
        for name, tensor in stage["params"].items():
            assert torch.equal(tensor, original["params"][name]), name
    for a, b, c, d, want in zip(
        last_stage_logits(pp2), tp1["logits"], original["logits"], last_stage_logits(tp2), hf_reference_logits(model)
    ):
        assert torch.equal(a, b) and torch.equal(b, c)  # same weights, same math
        torch.testing.assert_close(d, c, atol=1e-5, rtol=0)  # TP=2 sums in another order
        torch.testing.assert_close(c, want, atol=1e-4, rtol=0)


def test_value_checkpoint_from_hf_has_the_policy_trunk_and_a_zero_head(qwen2_policy, tmp_path):
    _model, root = qwen2_policy
    run_distributed(convert_rank, 1, str(root / "hf"), str(tmp_path / "value"), value=True)
    (policy_state,) = run_distributed(layout_logits, 1, str(root / "meg"), ParallelConfig())
    results = run_distributed(value_rank, 2, str(tmp_path / "value"), 2)
    for rank in results:
        assert rank["kind"] == "value"
        assert torch.equal(rank["weight"], torch.zeros(1, 64)) and torch.equal(rank["bias"], torch.zeros(1))
        assert torch.equal(rank["values"], torch.zeros(1, 11))
    (tp1,) = run_distributed(value_rank, 1, str(tmp_path / "value"), 1)
    assert tp1["trunk"].keys() == policy_state["params"].keys()
    for name, tensor in policy_state["params"].items():
        assert torch.equal(tp1["trunk"][name], tensor), name


def test_value_head_taken_from_another_value_checkpoint(qwen2_policy, tmp_path):
    _model, root = qwen2_policy
    run_distributed(write_value_ckpt_with_head, 1, str(root / "meg"), str(tmp_path / "donor"), 0.5)
    run_distributed(
        convert_rank, 1, str(root / "hf"), str(tmp_path / "value"), value=True, value_head=str(tmp_path / "donor")
    )
    (got,) = run_distributed(value_rank, 1, str(tmp_path / "value"), 1)
    assert torch.equal(got["weight"], torch.full((1, 64), 0.5)) and torch.equal(got["bias"], torch.tensor([-0.5]))
    assert got["values"].abs().max() > 0
