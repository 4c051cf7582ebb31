"""A few training steps of the configured model and layout on random tokens.

Checks that a layout works end to end on this machine or cluster (process groups, model split,
schedules, optimizer) before a real run, and times the step. Same code path as training:
`parallel.initialize` -> `build_model_chunks` -> Megatron DDP + optimizer -> `train_step`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from dqo_megatron.config import ConfigError, RunConfig, save_config
from dqo_megatron.training.megatron_setup import attach_finalize, build_optimizer, wrap_with_ddp
from dqo_megatron.training.step import StepResult, microbatch_iterators, train_step

logger = logging.getLogger(__name__)


@dataclass
class SmokeReport:
    """Outcome of `run_smoke` (identical on every rank)."""

    steps: list[StepResult] = field(default_factory=list)
    """One result per optimizer step."""
    step_seconds: list[float] = field(default_factory=list)
    """Wall time of each step."""
    setup_seconds: float = 0.0
    """Time from the call to the first step (process groups, model build, optimizer)."""
    world_size: int = 1
    """Processes in the run."""


def random_lm_batches(vocab: int, seq: int, micro_batch_size: int, num_microbatches: int, seed: int):
    """Micro-batches ``{"tokens","labels","loss_mask","position_ids"}`` (``[mb, seq]``) of random tokens."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_microbatches):
        tokens = torch.randint(0, vocab, (micro_batch_size, seq + 1), generator=gen)
        batches.append(
            {
                "tokens": tokens[:, :-1],
                "labels": tokens[:, 1:],
                "loss_mask": torch.ones(micro_batch_size, seq),
                "position_ids": torch.arange(seq).expand(micro_batch_size, seq).contiguous(),
            }
        )
    return batches


def run_smoke(run: RunConfig, steps: int | None = None) -> SmokeReport:
    """Initialize the layout of `run`, build the model, take `steps` optimizer steps on random tokens.

    Each data-parallel rank draws different tokens (seeded by `train.seed` and its DP rank); the
    same step sequence is reproducible. Writes the resolved config to `run.run_dir` when set.
    """
    from dqo_megatron import parallel
    from dqo_megatron.models import build_model_chunks

    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"steps={steps!r}: must be an integer >= 1 (or unset: train.train_steps)")
    start = time.perf_counter()
    info = parallel.initialize(run.parallel, seed=run.train.seed)
    num_microbatches = run.num_microbatches(info.world_size)
    if run.run_dir and info.rank == 0:
        save_config(run, run.run_dir)
    chunks = build_model_chunks(run.model, run.parallel, run.precision)
    ddp = wrap_with_ddp(chunks)
    attach_finalize(ddp)
    optimizer = build_optimizer(ddp, lr=run.train.lr, clip_grad=run.train.clip_grad)
    report = SmokeReport(world_size=info.world_size, setup_seconds=time.perf_counter() - start)
    device = info.device
    for step in range(steps if steps is not None else run.train.train_steps):
        seed = run.train.seed + 1_000_003 * step + 7919 * info.dp_rank
        mbs = random_lm_batches(
            run.model.vocab_size, run.train.seq_length, run.train.micro_batch_size, num_microbatches, seed
        )
        mbs = [{k: v.to(device) for k, v in mb.items()} for mb in mbs]
        data = microbatch_iterators(ddp, mbs)
        t0 = time.perf_counter()
        result = train_step(
            ddp,
            optimizer,
            data,
            num_microbatches=num_microbatches,
            seq_length=run.train.seq_length,
            micro_batch_size=run.train.micro_batch_size,
        )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        report.step_seconds.append(time.perf_counter() - t0)
        report.steps.append(result)
        if info.rank == 0:
            logger.info(
                "step %d  loss %.4f  grad-norm %.4f  %.1f ms",
                step + 1,
                result.loss,
                result.grad_norm,
                1e3 * report.step_seconds[-1],
            )
    return report
