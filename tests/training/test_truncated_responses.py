"""Length-truncated responses: bootstrapped from V(s_(H+1)), excluded, or (on request) terminal; the
policy/value metrics of the RL loss function."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.config import LossConfig, ModelConfig, RunConfig, TrainConfig
from dqo_megatron.training.algorithms import derived_metrics, rl_loss_func

BETA = 0.3
MODEL = ModelConfig(
    family="llama",
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    vocab_size=64,
    seq_length=16,
)


@pytest.fixture(autouse=True)
def _no_context_parallel(monkeypatch):
    # the loss function alone, in this process: the CP gather (tested with the layouts) is the identity
    monkeypatch.setattr("dqo_megatron.training.algorithms.gather_from_context_parallel", lambda x, dim: x)


def _batch():
    """3 rows of 8 positions: responses at [2, 5], [1, 7] (no room after: the row is full) and [3, 5]."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, 8)
    mask[0, 2:6] = 1
    mask[1, 1:8] = 1
    mask[2, 3:6] = 1
    rewards = torch.zeros(3, 8)
    rewards[0, 5], rewards[2, 5] = 1.0, 0.0
    logp = -torch.rand(3, 8, generator=gen, dtype=torch.float64) - 0.5
    ref = -torch.rand(3, 8, generator=gen, dtype=torch.float64) - 0.5
    values = torch.rand(3, 8, generator=gen, dtype=torch.float64)
    batch = {
        "response_mask": mask,
        "rewards": rewards.double(),
        "ref_logprobs": ref,
        "truncated": torch.tensor([True, True, False]),
    }
    output = torch.stack([logp, values, torch.full_like(logp, float("nan"))], dim=-1)
    return batch, output


def _metrics(truncated: str, lam: float):
    run = RunConfig(
        model=MODEL,
        train=TrainConfig(seq_length=8),
        algorithm="dqo",
        loss=LossConfig(beta=BETA, lam=lam, is_level="off", truncated=truncated),
    )
    batch, output = _batch()
    return rl_loss_func(run, batch, output)


def _brute_returns(batch, output, row: int, bootstrap: bool, lam: float) -> list[float]:
    """G_h for one row by the recursion, with G_(H+1) = V_(H+1) = V(s_(H+1)) when bootstrapping."""
    logp, values, ref = output[row, :, 0], output[row, :, 1], batch["ref_logprobs"][row]
    positions = [h for h in range(8) if batch["response_mask"][row, h]]
    tail = float(values[positions[-1] + 1]) if bootstrap else 0.0
    g_next, v_next, out = tail, tail, []
    for h in reversed(positions):
        shaped = float(batch["rewards"][row, h]) - BETA * float(logp[h] - ref[h])
        g = shaped + (1 - lam) * v_next + lam * g_next
        out.append(g)
        g_next, v_next = g, float(values[h])
    return out[::-1]


@pytest.mark.parametrize("lam", [0.0, 0.6, 1.0])
def test_bootstrap_adds_the_next_state_value_and_full_rows_are_excluded(lam):
    batch, output = _batch()
    loss_sum, count, metrics = _metrics("bootstrap", lam)
    # row 0 bootstrapped, row 1 has no position after its response: excluded; row 2 is not truncated
    assert metrics["truncated_bootstrapped"].tolist() == [1.0, 3.0]
    assert metrics["truncated_excluded"].tolist() == [1.0, 3.0]
    assert int(count) == 4 + 3
    want = _brute_returns(batch, output, 0, True, lam) + _brute_returns(batch, output, 2, False, lam)
    assert float(metrics["return_mean"][0] / metrics["return_mean"][1]) == pytest.approx(
        sum(want) / len(want), rel=1e-12
    )


def test_exclude_and_terminal():
    batch, output = _batch()
    _, count, metrics = _metrics("exclude", 1.0)
    assert int(count) == 3 and metrics["truncated_excluded"].tolist() == [2.0, 3.0]
    _, count, metrics = _metrics("terminal", 1.0)
    assert int(count) == 4 + 7 + 3 and metrics["truncated_excluded"][0] == 0
    want = sum(sum(_brute_returns(batch, output, r, False, 1.0)) for r in range(3)) / 14
    assert float(metrics["return_mean"][0] / metrics["return_mean"][1]) == pytest.approx(want, rel=1e-12)


def test_policy_metrics_separate_correct_from_incorrect_responses():
    batch, output = _batch()
    _, _, metrics = _metrics("terminal", 1.0)
    ratio = (output[..., 0] - batch["ref_logprobs"]) * batch["response_mask"]
    correct = float(ratio[0].sum())  # only row 0 has outcome reward 1 on its last token
    assert metrics["log_ratio_correct"].tolist() == pytest.approx([correct, 1.0])
    assert metrics["log_ratio_incorrect"].tolist() == pytest.approx([float(ratio[1:].sum()), 2.0])


def test_explained_variance_and_advantage_std():
    g = torch.tensor([1.0, 0.0, 0.5, 0.2])
    for v, want in ((g.clone(), 1.0), (torch.full_like(g, g.mean()), 0.0), (g + 0.3, 1.0)):
        stats = {
            "return_mean": float(g.mean()),
            "return_sq_mean": float((g * g).mean()),
            "advantage_mean": float((g - v).mean()),
            "advantage_sq_mean": float(((g - v) ** 2).mean()),
        }
        out = derived_metrics(stats)
        assert out["value_explained_var"] == pytest.approx(want, abs=1e-6)
        assert out["advantage_std"] == pytest.approx(float((g - v).std(unbiased=False)), abs=1e-6)
    assert derived_metrics({"loss": 1.0}) == {}
