"""The algorithm registry: one `Algorithm` object per objective, read by the config, the trainer and
the value analysis; a new one, registered here and nowhere else, trains end to end."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron import algorithms
from dqo_megatron.algorithms import Algorithm, LossInputs
from dqo_megatron.config import ConfigError, DataConfig, LossConfig, ModelConfig, RunConfig, TrainConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.synthetic_data import write_synthetic_dataset

SEQ = 32
MODEL = ModelConfig(
    family="llama",
    num_layers=1,
    hidden_size=32,
    ffn_hidden_size=64,
    num_attention_heads=4,
    vocab_size=256,
    seq_length=SEQ,
)


def test_builtin_algorithms_are_as_before():
    """The facts the four old dicts (NEEDS_VALUE, NEEDS_REFERENCE, BATCH_MODE, ROWS_PER_ITEM) held."""
    assert algorithms.names() == ("dqo", "dro", "dpo", "kto", "sft", "rs")
    got = {
        a.name: (a.needs_value, a.needs_reference, a.batch_mode, a.rows_per_item) for a in algorithms.all_algorithms()
    }
    assert got == {
        "dqo": (True, True, "samples", 1),
        "dro": (True, True, "samples", 1),
        "dpo": (False, True, "pairs", 2),
        "kto": (False, True, "kto", 2),
        "sft": (False, False, "samples", 1),
        "rs": (False, False, "samples", 1),
    }
    assert [a.name for a in algorithms.all_algorithms() if not a.reference_from_data] == ["kto"]
    for algorithm in algorithms.all_algorithms():
        assert algorithm.metrics and algorithm.config_keys and algorithm.summary, algorithm.name


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ValueError, match="unknown algorithm 'ppo': choose one of dqo, dro"):
        algorithms.get("ppo")
    with pytest.raises(ConfigError, match="algorithm='ppo': choose one of dqo, dro, dpo, kto, sft, rs"):
        RunConfig(model=MODEL, train=TrainConfig(seq_length=SEQ), algorithm="ppo")
    with pytest.raises(ValueError, match="already registered"):
        algorithms.register(algorithms.get("dqo"))
    with pytest.raises(ValueError, match="batch_mode='triples'"):
        Algorithm(name="x", loss=lambda x: None, batch_mode="triples")


def test_docs_table_is_the_registry():
    from pathlib import Path

    from dqo_megatron.algorithms.registry import markdown_table

    docs = Path(__file__).resolve().parents[2].joinpath("docs", "algorithms.md").read_text()
    assert markdown_table() in docs, "docs/algorithms.md's table of algorithms is stale: paste markdown_table()"


@pytest.mark.parametrize("name", ["dqo", "dro", "dpo", "kto", "sft", "rs"])
def test_each_algorithm_logs_the_metrics_it_declares(name):
    """One micro-batch of 4 rows through `Algorithm.loss`: the declared metrics are what it logs."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(4, 8)
    mask[:, 3:7] = 1
    rewards = torch.zeros(4, 8)
    rewards[::2, 6] = 1.0
    logp = (-torch.rand(4, 8, generator=gen) - 0.5).requires_grad_()
    values = torch.rand(4, 8, generator=gen).requires_grad_()
    batch = {"desirable": torch.tensor([True, False])}  # KTO: rows [0, 2) the documents, [2, 4) mismatched
    run = RunConfig(model=MODEL, train=TrainConfig(seq_length=SEQ), algorithm=name)
    inputs = LossInputs(
        run=run,
        batch=batch,
        logp=logp,
        values=values,
        ref=-torch.rand(4, 8, generator=gen) - 0.5,
        behavior=None,
        mask=mask,
        rewards=rewards,
        document_ids=None,
    )
    algorithm = algorithms.get(name)
    loss_sum, count, metrics = algorithm.loss(inputs)
    assert set(metrics) == set(algorithm.metrics)
    assert loss_sum.requires_grad and int(count) > 0
    loss_sum.backward()
    assert logp.grad.abs().sum() > 0
    assert (values.grad is not None and values.grad.abs().sum() > 0) == algorithm.needs_value


def _toy_loss(x: LossInputs):
    """NLL of the responses plus a regression of V(s_h) on the row's reward sum: a loss no built-in
    algorithm has, with a value network, and a metric of its own."""
    mask = x.mask.bool()
    nll = torch.where(mask, -x.logp, torch.zeros_like(x.logp)).sum()
    target = x.rewards.float().sum(dim=1, keepdim=True).expand_as(x.values)
    value = torch.where(mask, 0.5 * (x.values - target).square(), torch.zeros_like(x.values)).sum()
    count = mask.sum().to(torch.int32)
    metrics = {
        "toy_nll": torch.stack([nll.detach().float(), count.float()]),
        "toy_value_loss": torch.stack([value.detach().float(), count.float()]),
    }
    return x.policy_weight * nll + x.run.value.loss_coef * value, count, metrics


TOY = Algorithm(
    name="toy",
    loss=_toy_loss,
    needs_value=True,
    needs_reference=False,
    batch_mode="samples",
    metrics=("toy_nll", "toy_value_loss"),
    summary="a test's toy",
)


def _train(run: RunConfig):
    from dqo_megatron.training.trainer import train

    summary = train(run)
    chunk = summary.model_chunks[0]
    return {
        "losses": summary.losses,
        "metrics": summary.metrics,
        "steps": summary.steps,
        "value": chunk.value is not None,
        "reference": chunk.reference,
    }


@pytest.fixture
def toy():
    algorithms.register(TOY)
    yield TOY
    algorithms.unregister(TOY.name)


def test_a_registered_toy_algorithm_trains_end_to_end(toy, tmp_path):
    prefix = write_synthetic_dataset(str(tmp_path / "train"), docs=16, max_len=SEQ + 1)
    train = TrainConfig(micro_batch_size=2, global_batch_size=4, seq_length=SEQ, lr=3e-3, train_steps=3)
    run = RunConfig(
        model=MODEL, algorithm="toy", loss=LossConfig(beta=0.5), data=DataConfig(train_prefix=prefix), train=train
    )
    (result,) = run_distributed(_train, 1, run)
    assert result["steps"] == 3 and all(x == x for x in result["losses"])
    assert len(set(round(x, 6) for x in result["losses"])) == 3  # it trains
    last = result["metrics"][-1]
    assert {"toy_nll", "toy_value_loss", "loss", "grad_norm_policy", "grad_norm_value"} <= set(last), sorted(last)
    assert result["value"] and result["reference"] is None  # the trainer read needs_value / needs_reference
    algorithms.unregister("toy")
    with pytest.raises(ConfigError, match="algorithm='toy'"):
        RunConfig(model=MODEL, algorithm="toy", train=TrainConfig(seq_length=SEQ))
