"""The fast checkpoint-record writer writes exactly what torch.save writes."""

from __future__ import annotations

import io

import pytest
import torch

from dqo_megatron.conversion.record_writer import _fast_records_ok, _record_bytes


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(1537, 3, generator=g),  # an odd size, one piece
        lambda g: torch.randn(300_000, generator=g),  # > one piece (1.2 MB)
        lambda g: torch.randn(64, 48, generator=g).to(torch.bfloat16),
        lambda g: torch.randn(40, 40, generator=g).t(),  # a non-contiguous view
        lambda g: torch.arange(7, dtype=torch.int64),
    ],
    ids=["fp32-odd", "fp32-multi-piece", "bf16", "transposed-view", "int64"],
)
def test_record_is_byte_for_byte_torch_save(make):
    tensor = make(torch.Generator().manual_seed(0))
    ours, reference = io.BytesIO(), io.BytesIO()
    torch.save(tensor, reference)
    length = _record_bytes(tensor, ours)
    assert length == len(reference.getvalue())
    assert ours.getvalue() == reference.getvalue()
    assert torch.equal(torch.load(io.BytesIO(ours.getvalue()), weights_only=True), tensor)


def test_self_check_passes_on_this_torch():
    assert _fast_records_ok()  # else every record silently takes the slow path: the benchmark would show it
