"""Rank bodies for DQO/DRO step equivalence across layouts (policy + value network + reference)."""

from __future__ import annotations

from functools import partial

import torch

from dqo_megatron import parallel
from dqo_megatron.algorithms import get as get_algorithm
from dqo_megatron.config import RunConfig
from dqo_megatron.models.weights import load_full_state, local_to_global_names, shard_tensor_for_rank
from dqo_megatron.training.algorithms import rl_forward_step
from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
from dqo_megatron.training.policy_value import (
    build_policy_value_chunks,
    finalize_policy_value_grads,
    pipeline_micro_batch_size,
)
from dqo_megatron.training.step import microbatch_iterators, train_step
from tests.helpers.layouts import micro_batches

LR = 0.05
MEMBERS = ("policy", "value", "reference")


def make_rl_batch(vocab: int, rows: int, seq: int, *, with_ref: bool, seed: int = 0) -> dict:
    """Prompts of random length, responses with right padding, outcome + process rewards."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (rows, seq + 1), generator=gen)
    mask = torch.zeros(rows, seq)
    rewards = torch.zeros(rows, seq)
    for r in range(rows):
        prompt = int(torch.randint(3, seq // 2, (1,), generator=gen))
        end = seq - int(torch.randint(0, seq // 4, (1,), generator=gen))  # right padding
        mask[r, prompt - 1 : end] = 1
        rewards[r, end - 1] = float(torch.randint(0, 2, (1,), generator=gen))
        if r % 2:
            rewards[r, (prompt + end) // 2] = 0.5  # a process reward inside the response
    batch = {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).expand(rows, seq).contiguous(),
        "response_mask": mask,
        "rewards": rewards,
        "behavior_logprobs": -(torch.rand(rows, seq, generator=gen) * 2 + 4.5) * mask,
    }
    if with_ref:
        batch["ref_logprobs"] = -(torch.rand(rows, seq, generator=gen) * 2 + 4.5) * mask
    return batch


def _setup(run: RunConfig, with_reference: bool, full=None):
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    learns_value = get_algorithm(run.algorithm).needs_value
    chunks = build_policy_value_chunks(run, with_value=learns_value, with_reference=with_reference)
    if full is not None:
        for chunk in chunks:
            _load(chunk, full)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp, finalize_policy_value_grads)
    optimizer = build_optimizer(ddp, lr=LR, clip_grad=1.0, optimizer="sgd")
    return info, chunks, ddp, optimizer


@torch.no_grad()
def _load(chunk, full: dict) -> None:
    for name in MEMBERS:
        member = getattr(chunk, name)
        if member is not None:
            prefix = f"{name}."
            load_full_state(member, {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)})
    if chunk.value_head is not None:
        chunk.value_head.weight.copy_(full["value_head.weight"])
        chunk.value_head.bias.copy_(full["value_head.bias"])


def _global_names(chunk) -> dict:
    names = {}
    for name in MEMBERS:
        member = getattr(chunk, name)
        if member is not None:
            for local, full in local_to_global_names(member).items():
                names[f"{name}.{local}"] = f"{name}.{full}"
    if chunk.value_head is not None:
        names.update({"value_head.weight": "value_head.weight", "value_head.bias": "value_head.bias"})
    return names


CLIP = 0.5
"""Per-member clip of the layout tests: small enough to be active, so a norm counted wrongly under a
layout (a TP-duplicated or PP-shared parameter twice) changes the step."""


def _step(run, ddp, optimizer, mbs):
    data = microbatch_iterators(ddp, mbs)
    clips = {"policy": CLIP, "value": CLIP} if get_algorithm(run.algorithm).needs_value else None  # as the trainer does
    return train_step(
        ddp,
        optimizer,
        data,
        num_microbatches=len(mbs),
        seq_length=run.train.seq_length,
        micro_batch_size=pipeline_micro_batch_size(ddp[0], run.train.micro_batch_size),
        forward_step=partial(rl_forward_step, run),
        metric_key="loss",
        member_clips=clips,
    )


def rl_reference_step(run: RunConfig, batch: dict, with_reference: bool) -> dict:
    """One process: initial weights (value head perturbed so V != 0), loss, grads, weights after.
    `batch`: the global batch, or the list of micro-batches to step on (packed ones, say)."""
    info, chunks, ddp, optimizer = _setup(run, with_reference)
    (chunk,) = chunks
    with torch.no_grad():
        if chunk.value_head is not None:  # a zero head makes V = 0 and hides value-path bugs
            chunk.value_head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
            chunk.value_head.bias.fill_(0.1)
    initial = {n: p.detach().clone() for n, p in chunk.named_parameters()}
    mbs = batch if isinstance(batch, list) else micro_batches(batch, 0, 1, run.train.micro_batch_size)
    result = _step(run, ddp, optimizer, mbs)
    grads = {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters() if hasattr(p, "main_grad")}
    return {
        "initial": initial,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "grads": grads,
        "grad_norms": result.grad_norms,
        "after": {n: p.detach().clone() for n, p in chunk.named_parameters()},
    }


def rl_layout_step(run: RunConfig, batch: dict, with_reference: bool, reference: dict) -> dict:
    """One step of `run`'s layout from the reference's weights; max deviations on this rank's shards.
    `batch`: the global batch, cut per DP rank; a list of micro-batches (every rank); or one such
    list per data-parallel rank."""
    from megatron.core import parallel_state as ps

    info, chunks, ddp, optimizer = _setup(run, with_reference, reference["initial"])
    if isinstance(batch, dict):
        mbs = micro_batches(batch, info.dp_rank, info.dp_size, run.train.micro_batch_size)
    else:  # a list of micro-batches for every rank, or one list per data-parallel rank
        mbs = batch[info.dp_rank] if isinstance(batch[0], list) else batch
    result = _step(run, ddp, optimizer, mbs)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    dev = {"grads": 0.0, "after": 0.0, "compared": 0}
    for chunk in chunks:
        for local, param in chunk.named_parameters():
            full = _global_names(chunk)[local]
            member_name = full.split(".", 1)[1]
            pairs = [("after", param.data)] + ([("grads", param.main_grad)] if hasattr(param, "main_grad") else [])
            for key, value in pairs:
                want = shard_tensor_for_rank(reference[key][full], value, param, member_name, tp_rank, tp_size)
                dev[key] = max(dev[key], (value - want).abs().max().item())
                dev["compared"] += 1
    dev["loss"], dev["grad_norm"], dev["grad_norms"] = result.loss, result.grad_norm, result.grad_norms
    return dev
