"""Rank bodies for layout-equivalence tests: build a layout from full weights, take one step, compare.

`reference_step` runs on one process (TP=PP=CP=DP=1) and returns everything a layout must reproduce;
`layout_step` runs on every rank of a layout and returns the largest deviations it sees on its own
shards, so the parent test only compares numbers.
"""

from __future__ import annotations

import torch

from dqo_megatron import parallel
from dqo_megatron.config import ModelConfig, ParallelConfig
from dqo_megatron.models import build_model_chunks
from dqo_megatron.models.weights import (
    full_state_of_unsharded,
    load_full_state,
    local_to_global_names,
    shard_tensor_for_rank,
)
from dqo_megatron.parallel import cp_local_positions
from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
from dqo_megatron.training.step import (
    lm_forward_step,
    microbatch_iterators,
    slice_batch_for_context_parallel,
    train_step,
)

LR = 0.05
SEED = 1234


def make_batch(vocab: int, global_batch: int, seq: int, seed: int = 0) -> dict:
    """A global batch of random tokens with next-token labels and a loss mask with holes."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (global_batch, seq + 1), generator=gen)
    loss_mask = (torch.rand(global_batch, seq, generator=gen) > 0.2).float()
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": loss_mask,
        "position_ids": torch.arange(seq).expand(global_batch, seq).contiguous(),
    }


def micro_batches(batch: dict, dp_rank: int, dp_size: int, micro_batch_size: int) -> list[dict]:
    """This DP rank's contiguous share of the global batch, cut into micro-batches."""
    per_rank = batch["tokens"].shape[0] // dp_size
    rows = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    out = []
    for start in range(rows.start, rows.stop, micro_batch_size):
        out.append({k: v[start : start + micro_batch_size] for k, v in batch.items()})
    return out


def _logits_forward_step(data_iterator, model):
    batch = slice_batch_for_context_parallel(next(data_iterator))
    logits = model(batch["tokens"], batch["position_ids"], None)
    return logits, lambda output, non_loss_data=False: output.detach().clone()


def _collect_logits(chunks, mbs: list[dict], seq: int, mbsize: int) -> list[torch.Tensor]:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = _iterators(chunks, mbs)
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=_logits_forward_step,
            data_iterator=iterators,
            model=list(chunks),
            num_microbatches=len(mbs),
            seq_length=seq,
            micro_batch_size=mbsize,
            forward_only=True,
            collect_non_loss_data=True,
        )
    return out


def _iterators(chunks, mbs):
    return microbatch_iterators(chunks, mbs)


def _setup(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, full_state=None):
    info = parallel.initialize(parallel_cfg, seed=SEED)
    chunks = build_model_chunks(model_cfg, parallel_cfg)
    if full_state is not None:
        for chunk in chunks:
            load_full_state(chunk, full_state)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=LR, clip_grad=1.0, optimizer="sgd")
    return info, chunks, ddp, optimizer


def reference_step(model_cfg: ModelConfig, batch: dict, micro_batch_size: int = 1) -> dict:
    """Single-process run: initial weights, logits, loss, grad norm, grads and weights after a step."""
    info, chunks, ddp, optimizer = _setup(model_cfg, ParallelConfig())
    (chunk,) = chunks
    initial = full_state_of_unsharded(chunk)
    seq = batch["tokens"].shape[1]
    mbs = micro_batches(batch, 0, 1, micro_batch_size)
    logits = torch.cat(_collect_logits(ddp, mbs, seq, micro_batch_size))
    result = train_step(
        ddp,
        optimizer,
        iter(mbs),
        num_microbatches=len(mbs),
        seq_length=seq,
        micro_batch_size=micro_batch_size,
        forward_step=lm_forward_step,
    )
    grads = {n: p.main_grad.detach().clone() for n, p in chunk.named_parameters()}
    return {
        "initial": initial,
        "logits": logits,
        "loss": result.loss,
        "grad_norm": result.grad_norm,
        "grads": grads,
        "after": full_state_of_unsharded(chunk),
    }


def lm_train_step(ddp: list, optimizer, mbs: list[dict], seq: int, micro_batch_size: int):
    """One optimizer step of the language-model loss over the micro-batches `mbs` (Megatron's schedule)."""
    iterators = _iterators(ddp, mbs)
    kwargs = dict(num_microbatches=len(mbs), seq_length=seq, micro_batch_size=micro_batch_size)
    return train_step(ddp, optimizer, iterators, **kwargs, forward_step=lm_forward_step)


def logits_deviation(local: torch.Tensor, full: torch.Tensor, info) -> dict:
    """Max |local - reference| of this rank's logits ``[rows of this DP rank, seq/cp, vocab/tp]`` against
    the single-process `full` ``[rows, seq, vocab]`` cut to this rank's DP rows, CP positions and TP
    vocabulary shard; and the reference's scale."""
    from megatron.core import parallel_state as ps

    rows, seq = full.shape[0] // info.dp_size, full.shape[1]
    expected = full[info.dp_rank * rows : (info.dp_rank + 1) * rows].to(local.device)
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        expected = expected[:, cp_local_positions(seq // cp, cp, info.cp_rank, local.device)]
    vocab_shard = local.shape[-1]
    expected = expected[..., info.tp_rank * vocab_shard : (info.tp_rank + 1) * vocab_shard]
    return {"logits": (local - expected).abs().max().item(), "logits_scale": expected.abs().max().item()}


def layout_step(
    model_cfg: ModelConfig, parallel_cfg: ParallelConfig, batch: dict, reference: dict, micro_batch_size: int = 1
) -> dict:
    """One step of `parallel_cfg` from the reference's initial weights; max deviations on this rank."""
    from megatron.core import parallel_state as ps

    info, chunks, ddp, optimizer = _setup(model_cfg, parallel_cfg, reference["initial"])
    seq = batch["tokens"].shape[1]
    mbs = micro_batches(batch, info.dp_rank, info.dp_size, micro_batch_size)
    dev = {"logits": 0.0, "grads": 0.0, "after": 0.0}
    logits = _collect_logits(ddp, mbs, seq, micro_batch_size)
    if ps.is_pipeline_last_stage():
        dev.update(logits_deviation(torch.cat(logits), reference["logits"], info))
    result = lm_train_step(ddp, optimizer, mbs, seq, micro_batch_size)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        names = local_to_global_names(chunk)
        for local_name, param in chunk.named_parameters():
            full_name = names[local_name]
            for key, value in (("grads", param.main_grad), ("after", param.data)):
                want = shard_tensor_for_rank(reference[key][full_name], value, param, full_name, tp_rank, tp_size)
                dev[key] = max(dev[key], (value - want).abs().max().item())
    dev["loss"] = result.loss
    dev["grad_norm"] = result.grad_norm
    return dev
