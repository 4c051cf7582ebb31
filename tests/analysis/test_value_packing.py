"""The value analysis on packed rows (`sequence_values(..., row_length=...)`) gives every sequence the
values it gets padded: attention stops at sequence boundaries and positions restart in each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.analysis.test_value_extraction import MODEL
from tests.helpers.distributed import run_distributed

LENGTHS = (5, 17, 9, 17, 3, 12, 30, 8, 14)


def _values_body() -> dict:
    from dqo_megatron import parallel
    from dqo_megatron.analysis.value_model import ValueModel, sequence_values
    from dqo_megatron.config import ModelConfig, ParallelConfig
    from dqo_megatron.models import build_model_chunks
    from dqo_megatron.models.value_head import ValueHead
    from dqo_megatron.training.packing import first_fit_decreasing

    parallel.initialize(ParallelConfig(), seed=7)
    model = ModelConfig(**MODEL)
    (gpt,) = build_model_chunks(model, ParallelConfig())
    head = ValueHead(model.hidden_size, init_std=0.5)
    value_model = ValueModel(gpt, head)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, model.vocab_size, (n,), generator=gen).numpy() for n in LENGTHS]
    return {
        "padded": sequence_values(value_model, seqs, batch_size=3),
        "packed": sequence_values(value_model, seqs, batch_size=2, row_length=32),
        "rows": len(first_fit_decreasing(LENGTHS, 32)),
    }


def test_packed_values_equal_padded_values():
    (out,) = run_distributed(_values_body, 1)
    assert out["rows"] < len(LENGTHS), "sequences share rows"
    scale = max(np.abs(v).max() for v in out["padded"])
    assert scale > 0.1
    for i, (packed, padded) in enumerate(zip(out["packed"], out["padded"])):
        assert packed.shape == padded.shape == (LENGTHS[i],)
        np.testing.assert_allclose(packed, padded, atol=1e-5 * scale, err_msg=f"sequence {i}")


def test_packed_values_refused_on_attention_without_the_document_mask():
    """Transformer Engine's causal attention does not read a boolean mask: packing there is refused,
    not silently computed across sequence boundaries."""
    from dqo_megatron.analysis.value_model import ValueModel
    from dqo_megatron.config import ConfigError
    from dqo_megatron.models.value_head import ValueHead

    model = ValueModel(torch.nn.Linear(4, 4), ValueHead(4))  # a trunk without SDPACoreAttention
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ConfigError, match="--pack-rows"):
        model(ids, ids, ids)
