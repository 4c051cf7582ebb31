"""The value head on one process: zero init, fp32 output, gradients only from what it is given, groups."""

from __future__ import annotations

import pytest
import torch

from dqo_megatron.models.value_head import (
    VALUE_HEAD_ATTR,
    ValueHead,
    is_value_head_param,
    split_value_head_params,
    unwrap_gpt,
    value_head_param_key,
)


def test_zero_at_init_with_fp32_output_in_loss_layout():
    head = ValueHead(8)
    assert head.weight.abs().sum().item() == 0.0 and head.bias.abs().sum().item() == 0.0
    hidden = torch.randn(5, 3, 8, dtype=torch.bfloat16)  # [s, b, h]
    values = head(hidden)
    assert values.shape == (3, 5) and values.dtype == torch.float32
    assert values.abs().max().item() == 0.0
    assert head(hidden.transpose(0, 1), layout="bsh").shape == (3, 5)


def test_values_match_a_linear_map():
    head = ValueHead(6, init_std=0.5)
    with torch.no_grad():
        head.bias.fill_(0.25)
    hidden = torch.randn(4, 2, 6)
    want = torch.einsum("sbh,h->bs", hidden, head.weight[0].detach()) + 0.25
    torch.testing.assert_close(head(hidden), want)


def test_gradients_only_from_what_the_head_is_given():
    head = ValueHead(4)
    trunk = torch.nn.Linear(4, 4)
    hidden = trunk(torch.randn(3, 2, 4))  # [s, b, h], part of the trunk's graph
    # A loss that does not go through the head leaves it without gradient.
    hidden.pow(2).sum().backward(retain_graph=True)
    assert head.weight.grad is None and head.bias.grad is None
    trunk.zero_grad(set_to_none=True)
    # A value loss on detached hidden states trains the head (even from zero) and not the trunk.
    upstream = torch.randn(2, 3)
    (head(hidden.detach()) * upstream).sum().backward()
    assert trunk.weight.grad is None
    torch.testing.assert_close(head.weight.grad[0], torch.einsum("bs,sbh->h", upstream, hidden.detach()))
    torch.testing.assert_close(head.bias.grad[0], upstream.sum())


def test_parameters_are_marked_for_sp_reduction_and_their_own_group():
    class Config:
        hidden_size, sequence_parallel = 16, True

    head = ValueHead.from_config(Config())
    assert head.weight.shape == (1, 16)
    assert all(p.sequence_parallel and getattr(p, VALUE_HEAD_ATTR) for p in head.parameters())
    assert not ValueHead(4).weight.sequence_parallel
    model = torch.nn.Module()
    model.trunk, model.value_head = torch.nn.Linear(16, 16), head
    heads, rest = split_value_head_params(model)
    assert {id(p) for p in heads} == {id(head.weight), id(head.bias)} and len(rest) == 2
    key = value_head_param_key()
    assert key.matches(head.weight, "module.value_head.weight")
    assert not key.matches(model.trunk.weight, "module.trunk.weight")
    assert is_value_head_param(head.bias) and not is_value_head_param(model.trunk.bias)


def test_unwrap_needs_a_decoder():
    with pytest.raises(TypeError):
        unwrap_gpt(torch.nn.Linear(2, 2))
