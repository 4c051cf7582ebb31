"""A run's parts, built once: data -> models (policy, value, reference) -> DDP -> optimizer, schedule.

`setup(run, info)` reads the config sections whole and the algorithm's registry entry
(`dqo_megatron.algorithms`: needs_value, needs_reference, reference_from_data, batch_mode,
rows_per_item) and returns a `TrainParts`; the train loop (`trainer.py`), the checkpointer and the
metrics logger take their pieces from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from dqo_megatron.algorithms import get as get_algorithm
from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training.initial_weights import load_initial_weights
from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, build_scheduler, wrap_with_ddp
from dqo_megatron.training.policy_value import (
    build_policy_value_chunks,
    finalize_policy_value_grads,
    pipeline_micro_batch_size,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainParts:
    """Everything a run trains with, on this rank."""

    info: object
    """`parallel.initialize`'s answer: rank, world size, data-parallel rank and size, device."""
    algorithm: object
    """The `Algorithm` registered under `run.algorithm`."""
    dataset: object
    """The `TrajectoryDataset` at `data.train_prefix`."""
    batches: object
    """This data-parallel rank's `MicroBatches` (its position is checkpointed)."""
    chunks: list
    """This rank's `PolicyValueModel` chunk(s)."""
    ddp: list
    """The same chunks wrapped in Megatron's DDP."""
    optimizer: object
    scheduler: object
    num_microbatches: int
    pipeline_mbs: int
    """The micro-batch size given to Megatron's schedule (members stack along the batch dimension)."""
    value_warmup: int
    """Critic warm-up steps (policy loss weighted 0); 0 without a value network."""
    member_clips: dict | None
    """Policy's and value's own gradient clips; None: Megatron's global clip (no value network)."""

    @property
    def is_logger(self) -> bool:
        """Rank 0 prints, writes config.yaml, metrics.jsonl, TensorBoard and W&B."""
        return self.info.rank == 0


def setup(run: RunConfig, info) -> TrainParts:
    """Build the run's parts (collective): data (checked against the model first), models with their
    initial weights, DDP, optimizer, LR schedule."""
    algorithm = get_algorithm(run.algorithm)
    is_logger = info.rank == 0
    num_microbatches = run.num_microbatches(info.world_size)  # the layout's batch checks, before any weights
    dataset, batches, needs_ref_model = _data(run, info, algorithm, is_logger)
    chunks = build_policy_value_chunks(run, with_value=algorithm.needs_value, with_reference=needs_ref_model)
    initialized = load_initial_weights(run, chunks)
    if is_logger:
        logger.info("models: %s", initialized)
    t = run.train
    if t.distributed_optimizer and not torch.cuda.is_available():
        raise ConfigError(
            "train.distributed_optimizer=true needs GPUs: Megatron's distributed optimizer "
            "supports CUDA tensors only; set it to false on CPU"
        )
    ddp = wrap_with_ddp(chunks, use_distributed_optimizer=t.distributed_optimizer)
    attach_finalize(ddp, finalize_policy_value_grads)
    learns_value = algorithm.needs_value
    value_warmup = run.value.warmup_steps if learns_value else 0
    optimizer = _optimizer(run, ddp)
    # Policy and value are clipped by their own gradient norms (a large value gradient must not shrink
    # the policy's step); without a value network Megatron's own global clip is used.
    member_clips = {"policy": t.clip_grad, "value": run.value.resolved_clip_grad(t.clip_grad)} if learns_value else None
    return TrainParts(
        info=info,
        algorithm=algorithm,
        dataset=dataset,
        batches=batches,
        chunks=chunks,
        ddp=ddp,
        optimizer=optimizer,
        scheduler=_scheduler(run, optimizer, value_warmup),
        num_microbatches=num_microbatches,
        pipeline_mbs=pipeline_micro_batch_size(
            ddp[0], batches.budget_rows or t.micro_batch_size * algorithm.rows_per_item
        ),
        value_warmup=value_warmup,
        member_clips=member_clips,
    )


def _data(run: RunConfig, info, algorithm, is_logger: bool):
    """(dataset, this rank's MicroBatches, whether a reference model is needed in the run)."""
    from dqo_megatron.data.dataset import TrajectoryDataset
    from dqo_megatron.training.data_check import check_data_matches_model
    from dqo_megatron.training.microbatches import MicroBatches

    dataset = TrajectoryDataset(run.data.train_prefix)
    check_data_matches_model(dataset, run, log=is_logger)  # before any model is built
    has_ref = bool(dataset.manifest.get("ref_logprobs_filled", False))
    if run.data.reference == "data" and not has_ref:
        raise ConfigError(
            f"data.reference=data but {run.data.train_prefix} has no reference log-probs: run "
            "`dqo-megatron annotate` first or set data.reference=model"
        )
    if algorithm.needs_reference and not algorithm.reference_from_data and run.data.reference == "data":
        raise ConfigError(
            f"algorithm={run.algorithm} needs a reference model in the run (not all its rows are in "
            "the data: KTO's mismatched prompt/response rows): set data.reference=model or auto"
        )
    ref_from_data = has_ref and run.data.reference != "model" and algorithm.reference_from_data
    needs_ref_model = algorithm.needs_reference and not ref_from_data
    batches = MicroBatches(
        dataset,
        seq_length=run.train.seq_length,
        micro_batch_size=run.train.micro_batch_size,
        dp_rank=info.dp_rank,
        dp_size=info.dp_size,
        seed=run.train.seed,
        shuffle=run.data.shuffle,
        pad_id=run.data.pad_id,
        with_ref_logprobs=ref_from_data,
        device=info.device,
        mode=algorithm.batch_mode,
        max_pairs_per_prompt=run.loss.dpo_max_pairs_per_prompt,
        packing=run.train.packing,
        fixed_rows=run.parallel.pipeline_model_parallel_size > 1,  # stages exchange fixed shapes
        budget_rows=None
        if run.train.micro_batch_tokens is None
        else run.train.micro_batch_tokens // run.train.seq_length,
        micro_batch_multiple=run.parallel.pipeline_model_parallel_size  # the interleaved schedule's groups
        if run.parallel.virtual_pipeline_model_parallel_size is not None
        else 1,
    )
    if is_logger:
        behavior_share = float(dataset.has_behavior.mean()) if len(dataset) else 0.0
        logger.info(
            "data: %d documents from %s; reference log-probs from %s; behavior log-probs from the data for "
            "%.0f%% of documents, the reference's for the rest",
            len(dataset),
            run.data.train_prefix,
            "the data"
            if ref_from_data
            else ("a reference model in the run" if needs_ref_model else "nowhere (not needed)"),
            100 * behavior_share,
        )
    return dataset, batches, needs_ref_model


def _optimizer(run: RunConfig, ddp):
    """Megatron's optimizer from `train` and `value` (the value network's own LR and its floor)."""
    t = run.train
    return build_optimizer(
        ddp,
        lr=t.lr,
        min_lr=t.min_lr,
        clip_grad=t.clip_grad,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        value_lr=run.value.resolved_lr(t.lr),
        value_min_lr=run.value.resolved_min_lr(t.lr, t.min_lr),
        use_distributed_optimizer=t.distributed_optimizer,
    )


def _scheduler(run: RunConfig, optimizer, value_warmup: int):
    """The LR / weight-decay schedule from `train` and `value` (the policy held until the critic warm-up ends)."""
    t = run.train
    return build_scheduler(
        optimizer,
        lr=t.lr,
        min_lr=t.min_lr,
        warmup_steps=t.lr_warmup_steps,
        decay_steps=t.train_steps,
        decay_style=t.lr_decay_style,
        weight_decay=t.weight_decay,
        value_warmup_steps=run.value.lr_warmup_steps,
        value_decay_style=run.value.lr_decay_style,
        policy_delay=value_warmup,
        adam_betas=(t.adam_beta1, t.adam_beta2),
    )
